"""``sensq prompts``: read a prompt source (OpenS2V, VBench, text), filter it, write the prompt file of a study."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (value or "").split(",") if name.strip())


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--type", "types", default=None, help="Keep only these OpenS2V-Eval types, comma-separated "
              "(the id's prefix: singleobj, multiobject, humanobj, singlehuman, singleface, ...).")
@click.option("--exclude-type", default=None, help="Drop these types, comma-separated.")
@click.option("--dimension", "dimensions", default=None, help="VBench full info: keep prompts that serve any of these "
              "dimensions, comma-separated (e.g. subject_consistency,overall_consistency).")
@click.option("--min-words", type=int, default=None, help="Drop prompts with fewer words.")
@click.option("--max-words", type=int, default=None, help="Drop prompts with more words.")
@click.option("--min-aesthetic", type=float, default=None, help="OpenS2V-5M: drop clips scoring lower in aesthetics.")
@click.option("--min-motion", type=float, default=None, help="OpenS2V-5M: drop clips whose motion score is lower.")
@click.option("--min-tech", type=float, default=None, help="OpenS2V-5M: drop clips whose technical score is lower.")
@click.option("--exclude", default=None, help="Drop prompts whose text matches this regex (case-insensitive), "
              "e.g. 'reference image|the image' for text-to-video.")
@click.option("--dedupe", is_flag=True, help="Drop repeated prompts (case and spacing ignored); the first is kept.")
@click.option("--per-type", type=int, default=None, help="Keep the first N prompts of each type.")
@click.option("--sample", type=int, default=None, help="Then keep N prompts drawn at random (file order kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the kept prompts here (JSON list of records; any sensq --prompts reads it).")
@click.option("--json", "as_json", is_flag=True, help="Print the kept prompts and the drop counts as JSON.")
def prompts(source, types, exclude_type, dimensions, min_words, max_words, min_aesthetic, min_motion, min_tech,
            exclude, dedupe, per_type, sample, seed, out, as_json) -> None:
    """Filter a prompt source into the prompt file of a study, and show what was kept and why the rest went.

    SOURCE is any file --prompts reads: OpenS2V-Eval (`Open-Domain_Eval.json`: {id: {prompt, img_paths,
    class_label}}; the id's prefix is the type), OpenS2V-5M metadata ({clip: {metadata: {face_cap_qwen,
    aesthetic, motion, tech}}}, or a list/JSONL of such records), VBench lists, JSON lists, text.
    Filters run in the order of the options above. The output keeps each prompt's OpenS2V id (`key`),
    type, scores and `source_index` (its index in SOURCE); indices in the output file are positions in it.

    \b
    Examples:
      sensq prompts Open-Domain_Eval.json                       # what is in it, per type
      sensq prompts Open-Domain_Eval.json --exclude-type singleface --min-words 8 --dedupe \\
          --per-type 8 --out prompts.json                        # a text-to-video set, 8 per type
      sensq prompts OpenS2V-5M_part1.json --min-aesthetic 5.5 --min-motion 2 --sample 64 --out prompts.json
      sensq prompts VBench_full_info.json --dimension subject_consistency,overall_consistency --dedupe
      sensq generate --prompts prompts.json --out runs/fp
    """
    from sensq.prompts import PromptFilter, filter_prompts, is_written_prompt_file, load_prompts, write_prompts
    from sensq.store.files import check_output_file

    if out is not None:
        check_output_file(out, None, "prompt", recognise=is_written_prompt_file)  # before any work
    loaded = load_prompts(source)
    spec = PromptFilter(
        types=_names(types), exclude_types=_names(exclude_type), dimensions=_names(dimensions), min_words=min_words,
        max_words=max_words,
        min_aesthetic=min_aesthetic, min_motion=min_motion, min_tech=min_tech, exclude=exclude, dedupe=dedupe,
        per_type=per_type, sample=sample, seed=seed,
    )
    kept, dropped = filter_prompts(loaded, spec)
    if not kept:
        from sensq.errors import InputError

        raise InputError(f"no prompt of {len(loaded)} in {str(source)!r} passes the filters ({_dropped_line(dropped)})")
    if out is not None:
        write_prompts(out, kept)
    if as_json:
        click.echo(json.dumps({"source": str(source), "total": len(loaded), "kept": len(kept), "dropped": dropped,
                               "prompts": [{"index": p.index, "key": p.key, "text": p.text, **p.meta}
                                           for p in kept]}, indent=1, ensure_ascii=False))
        return
    _summary(source, loaded, kept, dropped, out)


def _dropped_line(dropped: dict[str, int]) -> str:
    return "; ".join(f"{count} {reason}" for reason, count in dropped.items()) or "none dropped"


def _summary(source, loaded, kept, dropped, out) -> None:
    from rich.table import Table

    from sensq.cli.common import console as make_console

    console = make_console()
    types = sorted({p.meta.get("type") for p in loaded if p.meta.get("type")})
    if types:
        table = Table(title=f"{source}: prompts per type")
        for column in ("type", "in source", "kept"):
            table.add_column(column, justify="left" if column == "type" else "right")
        for name in types:
            table.add_row(name, str(sum(p.meta.get("type") == name for p in loaded)),
                          str(sum(p.meta.get("type") == name for p in kept)))
        console.print(table)
    preview = Table(title=f"kept {len(kept)} of {len(loaded)}" + (f" (first 10 of {len(kept)})" if len(kept) > 10
                                                                   else ""))
    preview.add_column("index", justify="right", no_wrap=True, min_width=5)
    preview.add_column("key", no_wrap=True, min_width=min(24, max([len(p.key) for p in kept[:10]] + [3])))
    preview.add_column("words", justify="right", no_wrap=True, min_width=5)
    preview.add_column("prompt", overflow="ellipsis", no_wrap=True, ratio=1)
    for p in kept[:10]:
        preview.add_row(str(p.index), p.key, str(len(p.text.split())), p.text)
    console.print(preview)
    console.print(f"dropped: {_dropped_line(dropped)}")
    if out is not None:
        console.print(f"wrote {len(kept)} prompts to {out}  (use: --prompts {out})")

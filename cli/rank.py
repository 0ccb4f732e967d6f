"""``sensq rank``: rank layers per expert by sensitivity."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import click

from sensq.cli.common import checkpoint_option, model_options
from sensq.metrics import DEFAULT_METRIC, METRICS
from sensq.sensitivity.e2e import GRANULARITIES, MODES
from sensq.sensitivity.local import REDUCTIONS


def _formats(ctx, param, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command()
@click.argument("probe_file", type=click.Path(path_type=Path))
@model_options(default_model=None)
@click.option("--format", "formats", default="hif4", show_default=True, callback=_formats,
              help="Format(s) for weights and activations (W4A4), comma-separated to compare: hif4,mxfp4,nvfp4,int4.")
@click.option("--metric", default=DEFAULT_METRIC, show_default=True,
              type=click.Choice(list(METRICS)),
              help=f"Default {DEFAULT_METRIC}: of the cheap signals, the one that agrees best with leave-one-in e2e "
                   "on the embedded models (docs/sensitivity.md). "
                   + "; ".join(f"{m.name}: {m.help}" for m in METRICS.values()))
@click.option("--reduce", default="mean", show_default=True, type=click.Choice(REDUCTIONS),
              help="How per-step values become one number (late-weighted: weight 1/sigma per step).")
@click.option("--expert", default="all", show_default=True, metavar="NAME",
              help="Which expert's layers to rank: a name (Wan2.2-T2V-A14B: high, low; one-expert families: "
                   "main) or all (also: both).")
@click.option("--mode", default="leave-one-in", show_default=True, type=click.Choice(MODES),
              help="e2e only: quantize just this layer, or everything but this layer.")
@click.option("--granularity", default="layer", show_default=True, type=click.Choice(GRANULARITIES),
              help="e2e only: score layers or whole blocks (blocks.N) to make big models affordable.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="e2e, grad-e2e, grad-step: use the first N prompts of the probe file (default: all).")
@click.option("--projections", type=click.IntRange(min=1), default=8, show_default=True,
              help="grad-e2e, grad-step: random projections (backward passes) per prompt; the estimate's relative "
                   "spread is about sqrt(2 / (projections x prompts)).")
@checkpoint_option("grad-e2e, grad-step")
@click.option("--validate", "validate_against", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="E2E_RANKING",
              help="Check the proxy: Spearman rho (95% bootstrap interval over layers) of this ranking against a "
                   "per-layer e2e ranking of the same probe (sensq rank --metric e2e), per expert; stored in the "
                   "ranking and warned about when weak.")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Rows of the table per expert.")
@click.option("--force", is_flag=True, help="Rank even if the probe file was made with another model.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("ranking.json"),
              show_default=True, help="The ranking JSON to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking JSON instead of the table.")
def rank(probe_file, model, device, dtype, lora_high, lora_low, formats, metric, reduce, expert, mode, granularity,
         limit, projections, checkpoint, validate_against, top, force, out, as_json) -> None:
    """Rank the layers of each expert by how much W4A4 quantization hurts them.

    The default, grad-e2e, estimates each layer's end-to-end damage (the final-latent NMSE with only
    that layer in W4A4) to first order: one forward of the probe's own trajectory per prompt with
    autograd on and --projections backward passes score every layer of every expert at once; it agrees
    with e2e at Spearman 0.90-0.95 on the embedded models, where mse reaches 0.16-0.55. e2e runs the
    model once per layer (or block) and measures the final latents: the ground truth, and the bar.
    Local metrics (mse, sqnr, cosine, weight-mse, act-mse) use the probe file's captured inputs and the
    model's weights: the layer's own output error, per step and CFG branch, reduced with --reduce.

    \b
    Examples:
      sensq rank probe.h5                                  # grad-e2e; embedded model: taken from the probe file
      sensq rank probe.h5 --metric mse                     # the layer's own output error (cheap, weak)
      sensq rank probe.h5 --model ./Wan2.2-T2V-A14B-Diffusers --lora-high high.safetensors --lora-low low.safetensors
      sensq rank probe.h5 --format hif4,mxfp4,nvfp4,int4   # formats side by side, with their agreement
      sensq rank probe.h5 --metric e2e --granularity block --limit 2
      sensq rank probe.h5 --metric e2e --out e2e.json && sensq rank probe.h5 --validate e2e.json   # proxy check
      torchrun --nproc-per-node 4 -m sensq.cli rank probe.h5 --metric e2e   # layers split across ranks
    """
    from sensq.cli.common import load_cli_model, model_named_by_file
    from sensq.sensitivity import RankRequest, rank_layers

    _refuse_options_of_other_metrics(metric)
    from sensq.sensitivity.ranking import RANKING_SCHEMA
    from sensq.store.files import check_output_file
    from sensq.store.probe_file import ProbeFile

    check_output_file(out, RANKING_SCHEMA, "ranking")  # before any work
    truth = None
    if validate_against is not None:
        from sensq.sensitivity import Ranking
        from sensq.sensitivity.validate import require_layer_e2e

        truth = Ranking.load(validate_against)
        require_layer_e2e(truth)
    with ProbeFile(probe_file) as probe:
        model = model_named_by_file(probe_file, probe.model_id, probe.loras, model, lora_high, lora_low)
        probed_trajectory = probe.attr_json("trajectory")
    loaded = load_cli_model(model, device, dtype, lora_high, lora_low)
    if truth is not None and not force:
        from sensq.sensitivity.validate import require_same_source

        require_same_source(truth, loaded.fingerprint, probed_trajectory, validate_against)
    request = RankRequest(probe_path=probe_file, model=loaded, formats=formats, metric=metric, reduce=reduce,
                          experts=None if expert in ("all", "both") else [expert], mode=mode, granularity=granularity,
                          limit=limit, force=force, projections=projections,
                          checkpoint=checkpoint)
    import os

    from sensq.cli.common import progress_bar
    from sensq.store.files import output_lock

    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes
    with output_lock(out) if writer else contextlib.nullcontext():
        with progress_bar(f"rank ({metric})", enabled=not as_json) as progress:
            ranking = rank_layers(request, progress)
        if not writer:
            return
        if truth is not None:
            from sensq.sensitivity.validate import validate_proxy

            ranking.validation = validate_proxy(ranking, truth, against=str(validate_against))
        ranking.save(out)
    if as_json:
        click.echo(json.dumps(ranking.to_dict(), indent=1))
        return
    _table(ranking, top, out, loaded.family)
    if ranking.validation:
        _validation_lines(ranking.validation, loaded.family)


def _refuse_options_of_other_metrics(metric: str) -> None:
    """Usage errors for options given that this metric does not use."""
    from sensq.cli.common import refuse_unused

    ctx = click.get_current_context()
    chosen = METRICS[metric]
    refuse_unused(ctx, chosen.operand == "latents", ("mode", "granularity"),
                  f"applies to --metric e2e only (this ranking is by {metric})")
    refuse_unused(ctx, chosen.propagated, ("projections", "checkpoint"),
                  "applies to --metric grad-e2e and grad-step only")
    refuse_unused(ctx, not chosen.local, ("limit",),
                  "applies to e2e, grad-e2e and grad-step (a local metric reads every prompt's probe samples)")
    refuse_unused(ctx, chosen.local or metric == "grad-step", ("reduce",),
                  f"applies to per-step metrics ({metric} scores the whole trajectory at once)")


def _validation_lines(validation: dict, family) -> None:
    from sensq.stats import format_interval

    for expert, result in validation["experts"].items():
        rho = result["spearman"]
        line = (f"proxy check, {family.expert_label(expert)}: {validation['metric']} vs e2e over {result['layers']} "
                f"layers, Spearman rho {format_interval(rho, 3)}, top-{result.get('top_k', 10)} overlap "
                f"{result.get('top_k_overlap', '?')}/{result.get('top_k', 10)}")
        if result["weak"]:
            worst = result["top_disagreements"][0]
            line = (f"warning: {line}: a weak proxy (the interval reaches below {validation['weak_below']}); "
                    f"plan from the e2e ranking instead. Largest disagreement: {worst['layer']} (local rank "
                    f"{worst['local_rank']}, e2e rank {worst['e2e_rank']})")
        click.echo(line, err=result["weak"])


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _table(ranking, top: int, out: Path, family) -> None:
    from rich.table import Table

    from sensq.cli.common import console as make_console

    console = make_console()
    for expert in ranking.experts:
        layers = ranking.ordered(expert)
        reduced = "" if ranking.metric in ("e2e", "grad-e2e") else f" ({ranking.reduce})"
        table = Table(title=f"{family.expert_label(expert)}: top {min(top, len(layers))} of {len(layers)} by "
                            f"{ranking.metric}{reduced}, {ranking.formats[0]}")
        table.add_column("#", justify="right")
        table.add_column("layer", no_wrap=True)
        table.add_column("role")
        table.add_column("params", justify="right")
        for fmt in ranking.formats:
            table.add_column(fmt, justify="right")
        if len(ranking.formats) > 1:
            table.add_column("ranks", justify="right")
        for layer in layers[:top]:
            role = "entrance" if layer.entrance else ("exit" if layer.exit else "")
            row = [str(layer.rank[ranking.formats[0]]), layer.name, role, f"{layer.params:,}"]
            row += [_fmt(layer.value[f]) for f in ranking.formats]
            if len(ranking.formats) > 1:
                row.append("/".join(str(layer.rank[f]) for f in ranking.formats))
            table.add_row(*row)
        console.print(table)
        for pair, info in ranking.agreement.get(expert, {}).items():
            console.print(f"  {pair}: Spearman {info['spearman']:.3f}, top-10 overlap {info['top10_overlap']}/10")
    console.print(f"ranking written to {out}")

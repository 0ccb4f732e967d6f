"""``sensq plan``: a mixed-precision plan from a ranking, or the validation of a plan against a model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sensq.cli.common import checkpoint_option
from sensq.plan import CALIBRATIONS
from sensq.plan.exports import EXPORTERS
from sensq.plan.tiers import SEARCHES


@click.command()
@click.argument("ranking_file", required=False, type=click.Path(path_type=Path))
@click.option("--budget", default=None, help="Share of each expert's quantizable parameters kept in high "
              "precision (entrance included), e.g. 5% or 0.05.")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Instead of --budget: protect the K most sensitive layers "
              "per expert (besides the entrance).")
@click.option("--tiers", default=None, metavar="FORMATS",
              help="Instead of --budget/--top-k: give each layer one of these formats (W=A), e.g. hif4,fp8_e4m3,bf16, "
                   "minimizing the ranking's predicted error within --bits per expert (the ranking must hold every "
                   "quantized tier: sensq rank --format hif4,fp8_e4m3).")
@click.option("--bits", type=float, default=None, help="With --tiers: effective bits per weight per expert, e.g. 6.")
@click.option("--search", type=click.Choice([*SEARCHES, "e2e"]), default=None,
              help="With --tiers: an exact integer program (scipy HiGHS, the default) or greedy by error removed per "
                   "bit. With --budget: e2e = search the protected set on end-to-end error with the layers' "
                   "interactions (rounds of grad-e2e re-linearized at the quantized model, each measured end to "
                   "end; runs the ranking's model on its probe's prompts: rounds x prompts x (3 + 2 projections) "
                   "generations); without it the ranking is walked in order.")
@click.option("--rounds", type=click.IntRange(min=1), default=4, show_default=True, help="--search e2e: rounds.")
@click.option("--projections", type=click.IntRange(min=0), default=8, show_default=True,
              help="--search e2e: random projections per prompt and round.")
@click.option("--limit", type=click.IntRange(min=1), default=4, show_default=True,
              help="--search e2e: the first N prompts of the probe file.")
@click.option("--probe", "probe_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--search e2e: the probe file whose trajectory and prompts to search on (default: the one the "
                   "ranking names).")
@click.option("--device", default=None, help="--search e2e: cpu, cuda, cuda:N (default: the GPU if present).")
@checkpoint_option("--search e2e")
@click.option("--pareto", is_flag=True, help="With --tiers: also record the front of predicted error vs effective "
              "bits (12 budgets) and the chosen point in the plan's source, and print it.")
@click.option("--protect-entrance/--no-protect-entrance", default=None,
              help="Keep the entrance layers (the family's; Wan: patch_embedding, condition_embedder.*, blocks.0.*) "
                   "in high precision. Default: off, the ranking decides (a grad-e2e or e2e ranking finds the "
                   "sensitive entrance layers itself); on for --budget/--top-k from a local ranking (mse, sqnr, ...: "
                   "they miss the embedders, see docs/sensitivity.md).")
@click.option("--protect", multiple=True, help="Also protect layers whose name matches this regex (repeatable).")
@click.option("--protect-steps", default=None, metavar="A-B",
              help="With --budget/--top-k: keep the chosen layers in high precision at denoising steps A..B only "
                   "(0-based over the whole trajectory; quantized at the other steps), chosen by their sensitivity "
                   "at those steps (the ranking's per-step values). E.g. 0-1: the first two high-noise steps; "
                   "'last': the last step (on the embedded 4-step students the step that matters most).")
@click.option("--calibration", type=click.Choice(CALIBRATIONS), default=None,
              help="Write this calibration into every quantizing rule (apply-plan and ablate then use it for those "
                   "layers whatever their --calibrate): e.g. gptq. Default: none written (apply-plan's --calibrate "
                   "decides).")
@click.option("--format", "fmt", default="hif4", show_default=True, help="Weight format of the other layers.")
@click.option("--act-format", default="same", show_default=True,
              help="Activation format: 'same' (W4A4), a format name, or 'none' (weight-only).")
@click.option("--rank-format", default=None, help="Which of the ranking's formats orders the layers "
              "(default: --format's own; a ranking without it is refused).")
@click.option("--validate", "validate_file", type=click.Path(path_type=Path), default=None,
              help="Check an existing plan against --model: every rule must match a layer.")
@click.option("--model", default=None,
              help="Model for --validate (default: tiny) and --search e2e (default: the ranking's embedded model; "
                   "a folder or Hub id the ranking names must be passed here).")
@click.option("--export", type=click.Choice(sorted(EXPORTERS)), default=None,
              help="Also write the plan in the library's own form, one file per expert module: torchao's "
              "serialized FqnToConfig (OUT-stem.torchao.transformer.json) or a ModelOpt PTQ recipe "
              "(OUT-stem.modelopt.transformer.yml). Exact layer names, no pipeline prefix.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("plan.json"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan (or the validation) as JSON.")
def plan(ranking_file, budget, top_k, tiers, bits, search, rounds, projections, limit, probe_file, device, checkpoint,
         pareto,
         protect_entrance, protect, protect_steps, calibration, fmt, act_format, rank_format, validate_file, model,
         export, out, as_json) -> None:
    """Choose, per expert, the layers that stay in high precision and the format of all the others.

    From a local ranking (mse, ...) the entrance layers come first (unless --no-protect-entrance);
    then the most sensitive layers of the ranking: the top --top-k, or each layer that still fits in
    --budget when walking the ranking in order. The two experts may protect different layers. The
    plan is `sensq.plan/1` JSON: ordered rules (first match wins, null = high precision), the resolved
    per-layer table and a summary.

    \b
    Examples:
      sensq plan ranking.json --budget 5% --out plan.json
      sensq plan ranking.json --budget 10% --search e2e --out plan.json   # searched on end-to-end error
      sensq plan ranking.json --top-k 4 --format nvfp4_ts --export modelopt
      sensq plan ranking.json --budget 10% --protect-steps last --out late.json   # BF16 at the last step only
      sensq plan ranking.json --tiers hif4,fp8_e4m3,bf16 --bits 6 --calibration gptq --out t6-gptq.json

    \b
    Loading an export (apply each file to its own expert module):
      quantize_(pipe.transformer, config_from_dict(json.load(open("plan.torchao.transformer.json"))),
                filter_fn=None)                                   # torchao
      mtq.quantize(pipe.transformer, load_recipe("plan.modelopt.transformer.yml").quantize, loop)  # ModelOpt
    HiF4 has no equivalent in either library: those layers are named in one line and left out.
      sensq plan --validate plan.json --model ./Wan2.2-T2V-A14B-Diffusers
    """
    from sensq.cli.common import refuse_unused
    from sensq.plan import with_calibration
    from sensq.plan.exports import build_export, check_export_paths, write_export

    ctx = click.get_current_context()
    refuse_unused(ctx, tiers is not None, ("bits", "pareto"), "goes with --tiers")
    refuse_unused(ctx, search == "e2e",
                  ("rounds", "projections", "limit", "probe_file", "device", "checkpoint"),
                  "goes with --search e2e")
    if validate_file is not None:
        _validate(validate_file, model or "tiny", as_json)
        return
    if ranking_file is None:
        raise click.UsageError("give a RANKING_FILE (from sensq rank), or --validate PLAN")
    from sensq.plan import PLAN_SCHEMA
    from sensq.sensitivity import Ranking
    from sensq.store.files import check_output_file

    ranking = Ranking.load(ranking_file)
    _check_choice(budget, top_k, tiers, bits, protect_steps, search)
    last = max((step for steps in ranking.steps.values() for step in steps), default=0)
    steps = _step_range(protect_steps, last) if protect_steps is not None else None
    check_output_file(out, PLAN_SCHEMA, "plan")  # before any work
    if export:
        from sensq.models import recorded_family

        family = recorded_family(ranking.provenance.get("family"))
        check_export_paths(out, export, family.expert_attrs, ranking.experts)
    result = _chosen_plan(ranking, ranking_file, budget=budget, top_k=top_k, tiers=tiers, bits=bits, search=search,
                          rounds=rounds, projections=projections, limit=limit, probe_file=probe_file, model=model,
                          device=device, checkpoint=checkpoint, pareto=pareto, protect_entrance=protect_entrance,
                          protect=protect, steps=steps, fmt=fmt, act_format=act_format, rank_format=rank_format,
                          quiet=as_json)
    result = with_calibration(result, calibration)
    result.source["ranking_file"] = str(ranking_file)
    exported = build_export(result, export) if export else None  # refuses before anything is written
    from sensq.store.files import output_lock

    with output_lock(out):
        result.save(out)
        paths = write_export(exported, out) if exported else {}
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
        return
    _table(result, out, exported, paths)
    _how_it_was_chosen(result, walked=budget is not None and tiers is None)


def _chosen_plan(ranking, ranking_file, *, budget, top_k, tiers, bits, search, rounds, projections, limit, probe_file,
                 model, device, checkpoint, pareto, protect_entrance, protect, steps, fmt, act_format, rank_format,
                 quiet):
    """The plan the options choose: format tiers within --bits, the e2e search within --budget, or the ranking
    walked within --budget / --top-k."""
    from sensq.plan import Plan, build_plan, entrance_by_default, parse_budget

    if tiers is not None:
        from sensq.plan.tiers import build_tier_plan, parse_tiers

        result: Plan = build_tier_plan(ranking, parse_tiers(tiers), bits, search=search or "exact",
                                       protect_entrance=bool(protect_entrance), protect=list(protect),
                                       with_pareto=pareto)
    elif search == "e2e":
        result = _searched(ranking, ranking_file, parse_budget(budget), fmt, rounds=rounds, projections=projections,
                           limit=limit, probe_file=probe_file, model=model, device=device, checkpoint=checkpoint,
                           quiet=quiet)
    else:
        result = build_plan(
            ranking, budget=parse_budget(budget) if budget is not None else None, top_k=top_k,
            protect_entrance=entrance_by_default(ranking) if protect_entrance is None else protect_entrance,
            protect=list(protect), fmt=fmt,
            act_format=None if act_format == "none" else act_format, rank_format=rank_format,
            protect_steps=steps,
        )
    return result


def _check_choice(budget, top_k, tiers, bits, protect_steps, search) -> None:
    """Raises InputError for options that do not make one choice: --budget, --top-k or --tiers (with --bits),
    and what goes with each."""
    from sensq.errors import InputError

    if tiers is not None and (budget is not None or top_k is not None):
        raise InputError("--tiers chooses every layer's format within --bits: give it without --budget/--top-k")
    if tiers is not None and bits is None:
        raise InputError("--tiers needs --bits (effective bits per weight per expert, e.g. --bits 6)")
    if budget is not None and top_k is not None:
        raise InputError("give exactly one of --budget and --top-k")
    if protect_steps is not None and tiers is not None:
        raise InputError("--protect-steps goes with --budget/--top-k, not --tiers")
    if search == "e2e" and (budget is None or tiers is not None or protect_steps is not None):
        raise InputError("--search e2e chooses the protected set within --budget: give --budget (not --top-k, "
                         "--tiers or --protect-steps)")
    if search in ("exact", "greedy") and tiers is None:
        raise InputError(f"--search {search} goes with --tiers; with --budget use --search e2e (or nothing)")


def _how_it_was_chosen(result, walked: bool) -> None:
    """After the table: what the search measured, or a hint that the walk ignores the layers' interactions."""
    if result.source.get("search") == "e2e":
        measured = ", ".join(f"{r['measured_nmse']:.4g}" for r in result.source["rounds"])
        click.echo(f"searched on end-to-end error over {result.source['prompts']} prompts: final-latent NMSE by round "
                   f"{measured} -> {result.source['searched_nmse']:.4g} with this plan "
                   f"({result.source['generations']} generations)")
    elif walked:
        click.echo("walked the ranking in order (each layer's damage as if alone); --search e2e also weighs the "
                   "layers' interactions on the model (4 prompts x 80 generations at its defaults; "
                   "docs/sensitivity.md)")


def _searched(ranking, ranking_file, budget: float, fmt: str, *, rounds: int, projections: int, limit: int,
              probe_file, model, device, checkpoint: bool, quiet: bool):
    """The plan of ``sensq plan --search e2e`` (:mod:`sensq.sensitivity.search`)."""
    from sensq.cli.common import load_cli_model, model_named_by_file, progress_bar
    from sensq.errors import InputError
    from sensq.formats import get_format
    from sensq.plan import model_layers, plan_protecting
    from sensq.sensitivity.ranking import probe_job, require_probed_model
    from sensq.sensitivity.search import search_protected
    from sensq.store.probe_file import ProbeFile

    probe_file = probe_file or ranking.provenance.get("probe_file")
    if not probe_file or not Path(probe_file).is_file():
        raise InputError(f"--search e2e runs the model on a probe's prompts and trajectory: the ranking names "
                         f"{probe_file!r}, which is not a file here; pass --probe PROBE.h5")
    name = model_named_by_file(ranking_file, str(ranking.provenance.get("model_id")),
                               ranking.provenance.get("loras") or {}, model, None, None)
    loaded = load_cli_model(name, device, None)
    with ProbeFile(probe_file) as probe:
        require_probed_model(probe, probe_file, loaded, "search with the model it was probed on (--model)")
        job = probe_job(probe, limit)
    with progress_bar("search (e2e)", enabled=not quiet) as progress:
        found = search_protected(loaded, job, get_format(fmt), budget, rounds=rounds, projections=projections,
                                 checkpoint=checkpoint, progress=progress)
    return plan_protecting(
        found.chosen, model_layers(loaded), fmt,
        model={"id": ranking.provenance.get("model_id"), "fingerprint": loaded.fingerprint,
               "loras": ranking.provenance.get("loras") or {}, "family": loaded.family.name},
        source={"ranking_metric": ranking.metric, "search": "e2e", "budget": budget, "rounds": found.rounds,
                "projections": projections, "prompts": len(job.prompts), "probe_file": str(probe_file),
                "checkpoint": checkpoint,
                "searched_nmse": found.final, "generations": found.generations,
                "probe_sha256": ranking.provenance.get("probe_sha256")})


def _step_range(text: str, last_step: int) -> tuple[int, int]:
    """``A-B``, ``A`` or ``last`` (``A`` and ``B`` may be ``last`` too: the ranking's last step)."""
    from sensq.errors import InputError

    low, dash, high = text.partition("-")
    try:
        first, last = (last_step if v.strip() == "last" else int(v) for v in (low, high if dash else low))
    except ValueError:
        raise InputError(f"--protect-steps takes A-B (step indices, e.g. 0-1, or 'last'), got {text!r}") from None
    if first < 0 or last < first:
        raise InputError(f"--protect-steps takes A-B with 0 <= A <= B, got {text!r}")
    if last > last_step:
        raise InputError(f"--protect-steps {text!r} reaches past the ranking's last step ({last_step}): give steps "
                         f"within 0-{last_step}")
    return first, last


def _validate(path: Path, model_name: str, as_json: bool) -> None:
    from sensq.models import layer_inventory
    from sensq.plan import Plan, validate_plan

    plan = Plan.load(path)
    table = validate_plan(plan, layer_inventory(model_name))
    quantized = sum(1 for row in table if row.weight is not None)
    if as_json:
        click.echo(json.dumps({"valid": True, "rules": len(plan.rules), "layers": len(table),
                               "quantized": quantized}, indent=1))
        return
    click.echo(f"{path}: valid for {model_name}: {len(plan.rules)} rules decide {len(table)} layers "
               f"({quantized} quantized, {len(table) - quantized} high precision)")


def _table(plan, out: Path, exported, paths: dict) -> None:
    from rich.table import Table

    from sensq.cli.common import console as make_console

    console = make_console()
    table = Table(title=f"plan: {out}")
    for column in ("expert", "layers", "protected", "protected params", "effective bits", "weight MB before",
                   "after"):
        table.add_column(column, justify="left" if column == "expert" else "right")
    for scope, info in plan.summary.items():
        protected = info["by_precision"].get("high-precision", {"layers": 0})["layers"]
        table.add_row(scope, str(info["layers"]), str(protected), f"{info['protected_share']:.1%}",
                      f"{info['effective_bits']:.3f}", f"{info['weight_bytes_before'] / 1e6:.3f}",
                      f"{info['weight_bytes_after'] / 1e6:.3f}")
    console.print(table)
    for expert in sorted({row.expert for row in plan.layers}):
        console.print(f"[bold]{expert}[/bold] keeps in high precision: " + ", ".join(plan.protected(expert)))
        ranged: dict[str, list[str]] = {}
        for row in (r for r in plan.layers if r.expert == expert and r.protected_range() is not None):
            ranged.setdefault(row.protected_range(), []).append(row.layer)
        for where, names in ranged.items():
            console.print(f"  and at {where} only: " + ", ".join(names))
        if plan.source.get("tiers"):
            tiers = plan.summary[expert]["by_precision"]
            console.print(f"  tiers ({plan.source['search']} search within {plan.source['budget_bits']:g} bits): "
                          + ", ".join(f"{name} {info['layers']} layers" for name, info in tiers.items()))
        front = plan.source.get("pareto", {}).get(expert)
        if front:
            console.print("  pareto (effective bits -> predicted error): " + ", ".join(
                f"{point['effective_bits']:.2f} -> {point['predicted_error']:.3g}" for point in front["front"])
                + f"; chosen {front['chosen']['effective_bits']:.2f} -> {front['chosen']['predicted_error']:.3g}")
    for warning in plan.source.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if exported is not None:
        for line in exported.unsupported_lines():
            console.print(f"[yellow]warning:[/yellow] {line}")
    written = ", ".join(f"{attr}: {path}" for attr, path in paths.items())
    console.print(f"plan written to {out}" + (f"; {exported.library} export ({written})" if paths else ""))

"""``sensq ablate``: sweep protected sets at one format; ``sensq demo``: the whole method end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from sensq.cli.common import model_options
from sensq.formats import backend_names
from sensq.plan import CALIBRATIONS
from sensq.plan.calibrations import needs_data


def _set_kinds(ctx, param, value: str | None) -> list[str] | None:
    from sensq.ablate.sets import check_set_kinds
    from sensq.errors import InputError

    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    try:
        check_set_kinds(names or [value])
    except InputError as error:
        raise click.BadParameter(str(error)) from None
    return names


def _set_kinds_help() -> str:
    from sensq.ablate import set_builders

    return ("Kinds of standard sets to include, comma-separated (default: all): "
            + "; ".join(f"{name}: {builder.help}" for name, builder in set_builders().items()) + ".")


def _ints(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command()
@click.argument("ranking_file", type=click.Path(path_type=Path))
@model_options(default_model=None)
@click.option("--format", "fmt", default="hif4", show_default=True, help="Format of every quantized layer (W4A4).")
@click.option("--top-k", "top_ks", default="2,4", show_default=True, callback=_ints,
              help="Entrance + top-k sets to include, comma-separated.")
@click.option("--budget", "budgets", default="30%", show_default=True,
              help="Budget sets to include, comma-separated (e.g. 5%,10%).")
@click.option("--protect-entrance/--no-protect-entrance", default=None,
              help="sensq's budgeted plans protect the entrance first or let the ranking alone decide. Default: as "
                   "sensq plan does (only for a local ranking such as mse).")
@click.option("--random", "random_draws", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random sets per budget with the same share of parameters protected (seeded draws).")
@click.option("--sets", "set_kinds", default=None, callback=_set_kinds, metavar="KINDS", help=_set_kinds_help())
@click.option("--plans", "plan_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Also ablate these plan files, in the same paired run as the standard sets (repeat the option; "
                   "each set is named after its file). Points of a plan --pareto front, tier plans, plans from "
                   "other rankings, plans whose rules carry a 'calibration' (then pass --probe).")
@click.option("--only-plans", is_flag=True,
              help="With --plans: measure just 'none' (the yardstick) and the plan files, not the standard sets.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Seeds per prompt: every set is generated for every prompt x seed; intervals are over them.")
@click.option("--calibrate", type=click.Choice(CALIBRATIONS), default="none", show_default=True,
              help="Calibration of every variant, as in sensq apply-plan (all but none and rotate need --probe).")
@click.option("--probe", "probe_file", type=click.Path(path_type=Path), default=None,
              help="Probe file to calibrate on (--calibrate mse/gptq); the ranking's own is not followed silently.")
@click.option("--backend", type=click.Choice(backend_names()), default="auto",
              show_default=True, help="Quantization backend, as in sensq apply-plan.")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="Prompt file (see sensq probe --help). Default: the model's built-in prompts.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--video/--no-video", default=False, show_default=True, help="Also write mp4 files.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ablation"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the ablation table as JSON.")
def ablate(ranking_file, model, device, dtype, lora_high, lora_low, fmt, top_ks, budgets, protect_entrance,
           random_draws, set_kinds, plan_files, only_plans, seeds, calibrate, probe_file, backend, prompts_path, limit,
           video, out, as_json) -> None:
    """Sweep protected sets at one format and say which differences are real: none, the entrance, entrance
    + top-k, sensq's budgeted plans, the entrance in one expert only, ModelOpt's fixed Wan recipe
    (embedders, proj_out, first and last three blocks) and sensq's plan at its budget, the first and last
    blocks at each budget, random sets, and any --plans files, all in one paired run. Generations use seeds
    the probe (and so the ranking) did not run.

    Every set is deployed as sensq apply-plan deploys it (same calibration and backend) and generated
    for every prompt x seed along the ranking's trajectory; each generation is scored against the
    full-precision one of the same prompt and seed. Tables and plots show means with 95% bootstrap
    intervals; every pair of sets is compared per generation and marked as distinguishable from noise
    or not. Rerunning reuses finished generations. Writes ablation.json, ablation.md, ablation.html.

    The model defaults to the ranking's own when it is an embedded model; for a folder or Hub id, or a
    student probed with LoRAs, pass --model and --lora-high/--lora-low yourself (the ranking names them).

    \b
    Examples:
      sensq ablate ranking.json --top-k 2,4,8 --budget 5%,10% --random 3 --out ablation/
      sensq ablate ranking.json --calibrate mse --probe probe.h5 --seeds 4 --out ablation-mse/
      sensq ablate ranking.json --budget 5%,10% --plans e2e-10pct.json --seeds 2 --out ablation/
      sensq ablate ranking.json --plans tiers-6bits.json --plans keep-13pct.json --only-plans --out ablation-plans/
      sensq ablate ranking.json --sets none,budget,recipe --budget 10% --out ablation/
    """
    from sensq.ablate import ABLATION_SCHEMA, file_sets, plan_sets, run_ablation, standard_sets
    from sensq.cli.common import load_cli_model, model_named_by_file, progress_bar
    from sensq.errors import InputError
    from sensq.plan import entrance_by_default, parse_budget
    from sensq.prompts import load_prompts
    from sensq.report.ablation import write_ablation_report
    from sensq.sensitivity import Ranking
    from sensq.store.files import check_output_folder
    from sensq.trajectory import Trajectory

    ranking = Ranking.load(ranking_file)
    check_output_folder(out, "ablation.json", ABLATION_SCHEMA, "ablation folder")  # before any work
    shares = [parse_budget(b) for b in budgets.split(",") if b.strip()]
    if needs_data(calibrate) and probe_file is None:
        raise InputError(f"--calibrate {calibrate} needs --probe PROBE.h5 (the captured inputs to calibrate on)")
    if only_plans and not plan_files:
        raise InputError("--only-plans needs --plans PLAN.json (the plan files to measure)")
    loaded = load_cli_model(model_named_by_file(ranking_file, str(ranking.provenance.get("model_id")),
                                                ranking.provenance.get("loras") or {}, model, lora_high, lora_low),
                            device, dtype, lora_high, lora_low)
    prompts = load_prompts(prompts_path, limit, procedural=loaded.procedural)
    if protect_entrance is None:
        protect_entrance = entrance_by_default(ranking)
    if only_plans:
        sets = plan_sets(loaded, list(plan_files), fmt)
    else:
        sets = standard_sets(loaded, ranking, fmt, top_ks=top_ks, budgets=shares, random_draws=random_draws,
                             protect_entrance=protect_entrance, builders=set_kinds)
        sets += file_sets(list(plan_files), sets)
    with progress_bar("ablate", enabled=not as_json) as progress:
        result = run_ablation(loaded, Trajectory.from_dict(ranking.provenance.get("trajectory") or {}), prompts,
                              sets, out, fmt=fmt, seeds=seeds, calibrate=calibrate, probe_path=probe_file,
                              backend=backend, write_video=video,
                              progress=None if progress is None else lambda name, done, total: progress(
                                  "protected sets", done, total))
    write_ablation_report(result, out, [_command_line(click.get_current_context().params, protect_entrance)])
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    _print_rows(result)
    click.echo(f"report: {out / 'ablation.html'}")


def _command_line(p: dict, protect_entrance: bool) -> str:
    """The command that reruns this ablation, every choice spelled out (for the report)."""
    parts = ["sensq ablate", str(p["ranking_file"]), "--format", p["fmt"]]
    if not p["only_plans"]:
        parts += ["--top-k", ",".join(map(str, p["top_ks"])), "--budget", p["budgets"],
                  f"--{'' if protect_entrance else 'no-'}protect-entrance", "--random", str(p["random_draws"])]
        parts += ["--sets", ",".join(p["set_kinds"])] if p["set_kinds"] else []
    for plan_file in p["plan_files"]:
        parts += ["--plans", str(plan_file)]
    parts += ["--only-plans"] if p["only_plans"] else []
    parts += ["--seeds", str(p["seeds"]), "--calibrate", p["calibrate"]]
    parts += ["--probe", str(p["probe_file"])] if p["probe_file"] else []
    parts += ["--backend", p["backend"]]
    for option, key in (("--prompts", "prompts_path"), ("--limit", "limit"), ("--model", "model")):
        parts += [option, str(p[key])] if p[key] else []
    return " ".join(parts + ["--out", str(p["out"])])


def _print_rows(result: dict) -> None:
    from rich.table import Table

    from sensq.cli.common import console as make_console
    from sensq.report.ablation import headline_lines, interval_text, kept_text

    console = make_console()
    n = result["rows"][0]["intervals"]["latent_nmse"]["n"]
    table = Table(title=f"ablation: {result['format']} W4A4 vs full precision, mean [95% interval] over {n} "
                        "generations")
    procedural = "procedural" in result["rows"][0]["metrics"]
    columns = ["protected set", "kept per expert", "bits", "latent NMSE", "PSNR", "SSIM"]
    columns += ["procedural avg"] if procedural else []
    for column in columns:
        table.add_column(column, justify="left" if column == "protected set" else "right")
    if procedural:
        table.add_row("full precision", "100% / 100%", "16.00", "0", "inf", "1",
                      interval_text(result["reference_row"], "procedural", 3))
    for row in result["rows"]:
        cells = [row["set"], kept_text(row, 0),
                 f"{row['effective_bits']:.2f}", interval_text(row, "latent_nmse", 3), interval_text(row, "psnr", 3),
                 interval_text(row, "ssim", 4)]
        if procedural:
            cells.append(interval_text(row, "procedural", 3))
        table.add_row(*cells)
    console.print(table)
    for line in headline_lines(result):
        console.print(line.replace("**", ""), highlight=False)


@click.command()
@click.option("--model", default="tiny-deep", show_default=True,
              help="Embedded model to run the method on: tiny-deep (20 blocks per expert, the entrance 8% of "
                   "the parameters as on A14B; trained on the procedural world, scored against exact ground truth), "
                   "tiny-deep-4step, tiny-trained (4 blocks), tiny-trained-4step, small, tiny, tiny-realshape.")
@click.option("--format", "fmt", default="hif4", show_default=True)
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=4, show_default=True,
              help="Built-in prompts to use.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--budget", default="10%", show_default=True, help="Protected budget of the demo plan.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Seeds per prompt in the ablation (its intervals are over prompts x seeds).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch and numba. Default: 1, unless OMP_NUM_THREADS is set (the embedded models "
                   "are too small to gain from more).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("sensq-demo"),
              show_default=True)
def demo(model, fmt, n_prompts, steps, budget, seeds, threads, out) -> None:
    """The whole method on an embedded two-expert Wan2.2 model, end to end, on the CPU:
    probe -> rank -> plan -> apply-plan (mse calibration, packed checkpoint) -> generate -> eval ->
    ablate -> report. Rerunning reuses what is finished.

    Takes about 3.5 minutes on 2 CPU cores on tiny-deep (measured 200-209 s wall with one thread on
    2026-12-07, 243 s on the first run after the install, which compiles numba's kernels; most of it is the
    ablation, 9 sets x 4 prompts x 2 seeds, each calibrated). What slows it
    is sharing the cores: with two other CPU-bound processes running, an earlier 15 s demo took 122 s with
    torch's default two threads and 39 s with one, which is why the demo runs one thread unless told
    otherwise.

    \b
    Example:
      sensq demo --out sensq-demo && open sensq-demo/ablation/ablation.html
    """
    import os

    from sensq.cli.common import progress_bar
    from sensq.demo import Demo
    from sensq.store.files import claim_output_folder

    claim_output_folder(out, ".sensq-output.json", "sensq.demo/1", "demo folder")
    if threads is not None or "OMP_NUM_THREADS" not in os.environ:
        from sensq.runtime import set_threads

        set_threads(threads or 1)  # torch's and numba's pools together
    started = time.perf_counter()

    def say(text: str) -> None:
        click.echo(f"[{time.perf_counter() - started:6.1f} s] {text}")

    _print_rows(Demo(model, fmt, n_prompts, steps, budget, seeds, out, say, progress_bar).run())
    click.echo(f"done in {time.perf_counter() - started:.1f} s. Reports: {out / 'ablation' / 'ablation.html'}, "
               f"{out / 'ranking-report' / 'report.html'}")

"""``sensq report``: plots and a self-contained page for a ranking (and the plan made from it)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("ranking_file", metavar="RANKING_OR_ABLATION", type=click.Path(path_type=Path))
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="Mark this plan's protected layers (default: the entrance layers).")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Layers in the bar charts and tables.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("report"), show_default=True,
              help="Folder for the PNGs, report.md and report.html.")
@click.option("--json", "as_json", is_flag=True, help="Print the list of written files as JSON.")
def report(ranking_file, plan_file, top, out, as_json) -> None:
    """Render a ranking: per expert, a heatmap of the metric over layers x denoising steps and a bar
    chart of the most sensitive layers with the protected set marked, as PNGs, Markdown and one
    self-contained HTML file (images embedded). Given an ablation folder (from sensq ablate or sensq
    demo), render its table and plots again into that folder.

    \b
    Examples:
      sensq report ranking.json --plan plan.json --out report/
      sensq report sensq-demo/ablation
    """
    if ranking_file.is_dir():
        from sensq.ablate import load_ablation
        from sensq.report.ablation import write_ablation_report

        files = write_ablation_report(load_ablation(ranking_file), ranking_file)
        if as_json:
            click.echo(json.dumps({"out_dir": str(ranking_file), "files": files}, indent=1))
        else:
            click.echo(f"report written to {ranking_file / 'ablation.html'} ({len(files)} files)")
        return
    from sensq.plan import Plan
    from sensq.report.ranking import write_ranking_report
    from sensq.sensitivity import Ranking

    ranking = Ranking.load(ranking_file)
    plan = Plan.load(plan_file) if plan_file is not None else None
    provenance = ranking.provenance
    commands = [f"sensq rank {provenance.get('probe_file')} --metric {ranking.metric} --reduce {ranking.reduce} "
                f"--format {','.join(ranking.formats)} --out {ranking_file}"]
    if plan is not None:
        source = plan.source
        if source.get("budget") is not None:
            choice = f"--budget {source['budget']}"
        else:
            choice = f"--top-k {source.get('top_k')}"
        commands.append(f"sensq plan {ranking_file} {choice} --out {plan_file}")
    commands.append(f"sensq report {ranking_file}" + (f" --plan {plan_file}" if plan_file else "") + f" --out {out}")
    from sensq.store.files import make_parent, output_lock

    make_parent(out)
    with output_lock(out):
        result = write_ranking_report(ranking, out, plan=plan, top=top, commands=commands)
    if as_json:
        click.echo(json.dumps({"out_dir": result.out_dir, "files": result.files, "notes": result.notes}, indent=1))
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"report written to {Path(result.out_dir) / 'report.html'} ({len(result.files)} files)")

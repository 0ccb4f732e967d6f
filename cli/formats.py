"""``sensq formats``: the format table (rich) or JSON."""

from __future__ import annotations

import json

import click

from sensq.formats import format_names, get_format
from sensq.formats.report import FORMAT_TABLE_DIM, format_rows, measure_formats


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of a rich table.")
@click.option(
    "--measure",
    is_flag=True,
    help="Also quantize seeded test tensors (Gaussian weights; heavy-tailed activations with an outlier "
    "channel) and report the SQNR in dB each format reaches.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the --measure tensors.")
def formats(as_json: bool, measure: bool, seed: int) -> None:
    """List sensq's number formats: bits per element including block metadata, block size, scale
    type, largest and smallest nonzero magnitude, and distinct values per block.

    \b
    Per-channel formats (one scale per whole row) show their bits at K=5120, the A14B hidden size.
    Example:
      sensq formats --measure
      sensq formats --json | python -m json.tool
    """
    rows = format_rows([get_format(name) for name in format_names()])
    if measure:
        for row, sqnr in zip(rows, measure_formats(format_names(), seed=seed), strict=True):
            row.update(sqnr)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from sensq.cli.common import console as make_console

    table = Table(title="sensq formats", caption=f"* per channel / per token: bits at K={FORMAT_TABLE_DIM}")
    columns = ["name", "bits/elem", "block", "scale", "largest", "smallest nonzero", "values"]
    if measure:
        columns += ["SQNR weight dB", "SQNR act dB"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "scale") else "right")
    for row in rows:
        cells = [
            row["name"],
            f"{row['bits_per_element']:.3f}" + ("*" if row["block_size"] is None else ""),
            "-" if row["block_size"] is None else str(row["block_size"]),
            row["scale"],
            f"{row['max_value']:.3g}",
            f"{row['min_nonzero']:.3g}",
            str(row["n_values"]),
        ]
        if measure:
            cells += [f"{row['sqnr_weight_db']:.2f}", f"{row['sqnr_activation_db']:.2f}"]
        table.add_row(*cells)
    make_console().print(table)

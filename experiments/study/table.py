"""The study's Table III from a finished run_study.sh folder: per step count, the original sampler, same-step
full precision and the quantized model, with every score the runs have (VBench dimensions, the procedural
evaluator's dimensions, fidelity against same-step full precision). Writes OUT/table3.md and prints it.

    python experiments/study/table.py study-tiny
"""

import argparse
import json
import re
from pathlib import Path


def _scores(run: Path) -> dict[str, float]:
    row = {}
    if (run / "vbench.json").is_file():
        for name, value in json.loads((run / "vbench.json").read_text())["dimensions"].items():
            row[f"vbench {name}"] = value["mean"]
    if (run / "procedural.json").is_file():
        for name, value in json.loads((run / "procedural.json").read_text())["aggregate"].items():
            row[name] = value
    if (run / "scores.json").is_file():
        aggregate = json.loads((run / "scores.json").read_text())["aggregate"]
        for name in ("latent_nmse", "psnr", "ssim"):
            if name in aggregate:
                row[f"{name} vs FP"] = aggregate[name]["mean"]
    return row


def table(out: Path) -> str:
    runs = out / "runs"
    rows = []
    if (runs / "original").is_dir():
        steps = json.loads((runs / "original" / "manifest.json").read_text())["config"]["trajectory"]["steps"]
        rows.append((steps, "original full precision", _scores(runs / "original")))
    found = sorted({int(m.group(1)) for p in runs.iterdir() if (m := re.fullmatch(r"fp-(\d+)", p.name))})
    for steps in found:
        rows.append((steps, "same-step full precision", _scores(runs / f"fp-{steps}")))
        if (runs / f"quantized-{steps}").is_dir():
            rows.append((steps, "quantized (plan.json)", _scores(runs / f"quantized-{steps}")))
    columns = list(dict.fromkeys(key for _, _, row in rows for key in row))
    lines = ["| steps | model | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for steps, label, row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else "" for c in columns]
        lines.append(f"| {steps} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="The OUT folder of run_study.sh.")
    args = parser.parse_args()
    text = table(args.out)
    (args.out / "table3.md").write_text(text)
    print(text, end="")
    print(f"(written to {args.out / 'table3.md'})")


if __name__ == "__main__":
    main()

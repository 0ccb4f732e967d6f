"""The Markdown table of one experiments/signals/run.sh ablation: per budget, sensq's default (grad-e2e
ranking -> plan), the e2e plans (the oracle), the old default (mse with the entrance forced), the fixed rules
and the random draws, latent NMSE mean [95%]; then the paired verdicts the issue asks for.

    python experiments/signals/table.py OUT/ablation/ablation.json [--held-out-from 8]

``--held-out-from N``: also report the verdicts on prompts N.. only (the default's ranking used prompts 0..N-1).
"""

import argparse
import json

from sensq.stats import bootstrap_mean, format_interval, paired_difference


def _values(row, keep):
    return {k: v["latent_nmse"] for k, v in row["per_item"].items() if keep(k)}


def _paired(a, b, keep):
    x, y = _values(a, keep), _values(b, keep)
    items = sorted(set(x) & set(y))
    return paired_difference([x[i] for i in items], [y[i] for i in items])


def _verdict(interval):
    if interval.low > 0:
        return f"better by {format_interval(interval, 3)}"
    if interval.high < 0:
        return f"worse by {format_interval(interval, 3)}"
    return f"within noise {format_interval(interval, 3)}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ablation")
    parser.add_argument("--held-out-from", type=int, default=None)
    args = parser.parse_args()
    result = json.load(open(args.ablation))
    rows = {r["set"]: r for r in result["rows"]}
    budgets = {"5%": ("budget 5%", "e2e-5", None, "search-5"), "10%": ("budget 10%", "e2e-10", "mse-10", "search-10"),
               "20%": ("budget 20%", "e2e-20", None, "search-20")}
    modelopt = next((n for n in rows if n.startswith("sensq at ModelOpt")), None)
    if modelopt:
        budgets["ModelOpt's"] = (modelopt, "e2e-32.5", "mse-32.5", "search-32.5")
    scopes = [("all prompts", lambda k: True)]
    if args.held_out_from is not None:
        scopes.append((f"prompts {args.held_out_from}+ only",
                       lambda k: int(k.split("@")[0]) >= args.held_out_from))
    for scope, keep in scopes:
        n = len(_values(rows["none"], keep))
        print(f"\n### {scope} ({n} generations)\n")
        print("| budget | default (grad-e2e) | plan --search e2e | e2e plan | mse plan (entrance forced) | "
              "best fixed at <= bits | random draws | default vs best fixed | default vs e2e plan | "
              "search vs best fixed | search vs e2e plan |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, (default, oracle, mse, searched) in budgets.items():
            d = rows[default]

            def cell(name, keep=keep):
                if name not in rows:
                    return ""
                return format_interval(bootstrap_mean(list(_values(rows[name], keep).values())), 3)
            fixed = [r for r in result["rows"] if r.get("kind") == "fixed"
                     and r["effective_bits"] <= d["effective_bits"] * 1.01]
            best = min(fixed, key=lambda r: bootstrap_mean(list(_values(r, keep).values())).mean) if fixed else None
            pct = label if label != "ModelOpt's" else f"{d['protected_share']['low']:.0%}"
            draws = [r for r in result["rows"] if r.get("kind") == "random" and r["set"].startswith(f"random {pct}")]
            randoms = ", ".join(f"{bootstrap_mean(list(_values(r, keep).values())).mean:.3f}" for r in draws)
            found = rows.get(searched)
            print(f"| {label} | {cell(default)} | {cell(searched)} | {cell(oracle)} | {cell(mse) if mse else ''} | "
                  f"{best['set'] + ' ' + cell(best['set']) if best else 'none fits'} | {randoms} | "
                  f"{_verdict(_paired(best, d, keep)) if best else ''} | "
                  f"{_verdict(_paired(rows[oracle], d, keep)) if oracle in rows else ''} | "
                  f"{_verdict(_paired(best, found, keep)) if best and found else ''} | "
                  f"{_verdict(_paired(rows[oracle], found, keep)) if found and oracle in rows else ''} |")
        print(f"\nnone: {format_interval(bootstrap_mean(list(_values(rows['none'], keep).values())), 3)}; "
              + "; ".join(f"{r['set']} ({r['effective_bits']:.2f} bits): "
                          f"{format_interval(bootstrap_mean(list(_values(r, keep).values())), 3)}"
                          for r in result["rows"] if r.get("kind") == "fixed"))


if __name__ == "__main__":
    main()

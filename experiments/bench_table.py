"""Turn a pytest-benchmark JSON file into the Markdown tables of docs/performance.md.

Usage: python experiments/bench_table.py bench.json
Each group's row marked ``extra_info.baseline`` is the 1.00x reference of that group.
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
          f"cores; python {machine.get('python_version')}; {data['datetime']}\n")
    for group, benches in groups.items():
        base = next(b for b in benches if b["extra_info"].get("baseline"))
        base_median = base["stats"]["median"]
        elements = 4096 * 4096
        print(f"### {group}\n")
        print("| implementation | median ms | Melem/s | time / baseline | rounds |")
        print("|---|---|---|---|---|")
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            median = b["stats"]["median"]
            name = b["name"].split("[")[0].removeprefix("test_")
            print(f"| {name} | {median * 1e3:.1f} | {elements / median / 1e6:.0f} | {median / base_median:.2f}x "
                  f"| {b['stats']['rounds']} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])

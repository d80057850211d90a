"""How often bench-ab's two 95 % intervals cover the true ratio, on A/A runs.

In `results/cpu-2core/ab-noise/runs.jsonl` both "modes" ran the same eager code (CPU), so the
true compiled/eager ratio is 1 in every run. For each run this recomputes, from its recorded
per-round images/s, the median's order-statistics interval and the crossover estimate's t
interval (`internvl_batch.bench.encoder`), and prints per layout how many runs' intervals
hold 1 and how wide they are. bench-ab alternates the order from eager-first in timed round
0, so even rounds ran compiled second.

    .venv/bin/python benchmarks/cpu/ab-noise-coverage.py results/cpu-2core/ab-noise/runs.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys

from internvl_batch.bench.common import crossover, median_ci


def main(path: str) -> int:
    rows: dict[str, list[dict]] = {}
    for line in open(path):
        d = json.loads(line)
        ratios = [c / e for e, c in zip(d["eager_images_per_s"], d["compiled_images_per_s"])]
        second = [k % 2 == 0 for k in range(len(ratios))]
        med, xo = median_ci(ratios), crossover(ratios, second)
        rows.setdefault(d["config"], []).append({
            "med_covers": med["lo"] <= 1 <= med["hi"],
            "med_hw": 100 * (med["hi"] - med["lo"]) / 2 / med["median"],
            "xo_covers": xo["lo"] <= 1 <= xo["hi"], "xo_hw": xo["half_width_pct"],
            "order": 100 * (xo["order_effect"] - 1)})
    print("| layout | runs | median's interval holds 1 | its half-width, median (range) "
          "| crossover's interval holds 1 | its half-width, median (range) "
          "| order effect %, median (range) |")
    print("|---|---|---|---|---|---|---|")
    total = {"n": 0, "med": 0, "xo": 0}
    for cfg, rs in rows.items():
        def span(k):
            xs = [r[k] for r in rs]
            return f"{statistics.median(xs):.1f} ({min(xs):.1f} to {max(xs):.1f})"
        nm, nx = sum(r["med_covers"] for r in rs), sum(r["xo_covers"] for r in rs)
        total["n"] += len(rs)
        total["med"] += nm
        total["xo"] += nx
        print(f"| {cfg} | {len(rs)} | {nm} | ±{span('med_hw')} % | {nx} | ±{span('xo_hw')} % "
              f"| {span('order')} |")
    print(f"\nall runs: the median's interval holds 1 in {total['med']} of {total['n']}, "
          f"the crossover's in {total['xo']} of {total['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/cpu-2core/ab-noise/runs.jsonl"))

"""How many seeds, and how much machine time, would a study's verdicts need to be decided?

A planning figure for the powered study (issue 24), whose "Done when" asks for at most one
"undetermined" verdict per dataset among HSL against FedAvg, FedProx and MOON. For each of those
comparisons it takes the paired per-seed difference of the headline figure (pool test AUC) over
the complete seeds of ``results.csv`` and treats its mean and spread as if they were the truth:

- seeds to show the difference: a paired t-test with 80 % power at that mean;
- seeds to show equivalence within the margin (TOST, each one-sided test at the level): possible
  only when the mean lies inside the margin, with 80 % power at that mean;
- seeds to decide: the fewer of the two.

Both at alpha 0.05 for one test and at 0.05 / family (the family of the report's corrected table;
Holm's strictest step). Per dataset, every verdict but one decided needs the second-largest of its
comparisons' seeds; the cost is what those seeds cost for the compared methods alone (mean wall
time per cell in ``results.csv``, one thread per cell), scenario by scenario.

The spread and the mean are estimated from the seeds run, so this is an order of magnitude, not
a promise.

    .venv/bin/python benchmarks/seeds_to_decide.py      # the powered study's results.csv

Prints a table and one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from hsl_lightning.benchmark.stats import seeds_needed

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"pneumonia_": "pneumonia_breast"}  # scenario prefix -> dataset; the rest are breast_pneumonia


def dataset(scenario: str) -> str:
    return next((name for prefix, name in DATASETS.items() if scenario.startswith(prefix)), "breast_pneumonia")


def cells(path: Path, metric: str) -> tuple[dict, dict]:
    """Per (method, scenario, seed): the mean over nodes of ``metric``, and the cell's wall time."""
    by_cell, wall, steps = defaultdict(list), {}, defaultdict(set)
    with path.open() as f:
        for row in csv.DictReader(f):
            steps[row["scenario"]].add(row["step"])
            key = (row["method"], row["scenario"], int(row["seed"]))
            by_cell[key].append(float(row[metric]))
            wall[key] = float(row["wall_s"])
    swept = sorted(s for s, v in steps.items() if len(v) > 1)
    if swept:
        raise SystemExit(f"{path}: scenarios {swept} have several sweep steps; this script takes one step per scenario.")
    return {k: statistics.fmean(v) for k, v in by_cell.items()}, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/heterogeneity_powered/results.csv")
    p.add_argument("--metric", default="pool_test_auc")
    p.add_argument("--method", default="hsl")
    p.add_argument("--against", nargs="+", default=["fedavg", "fedprox", "moon"])
    p.add_argument("--margin", type=float, default=0.02)
    p.add_argument("--family", type=int, default=30, help="rows of the corrected table (the report's)")
    p.add_argument("--limit", type=int, default=10000, help="report seeds above this as '>limit'")
    args = p.parse_args()

    figure, wall = cells(args.results, args.metric)
    pairs = {(m, s) for m, s, _ in figure}
    seeds = sorted({seed for _, _, seed in figure})
    complete = [seed for seed in seeds if all((m, s, seed) in figure for m, s in pairs)]
    scenarios = sorted({s for m, s in pairs if m == args.method})
    levels = {"one test": 0.05, "corrected": 0.05 / args.family}

    rows = []
    for scenario in scenarios:
        for ref in args.against:
            if (ref, scenario) not in pairs:
                continue
            diffs = [figure[(args.method, scenario, k)] - figure[(ref, scenario, k)] for k in complete]
            mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
            row = {"scenario": scenario, "reference": ref, "seeds": len(diffs), "difference": mean, "std": std}
            for name, alpha in levels.items():
                show = seeds_needed(std, abs(mean), limit=args.limit, alpha=alpha) if mean else None
                inside = args.margin - abs(mean)
                # TOST: two one-sided tests at alpha each = a two-sided test at 2 alpha against the distance to the margin
                equivalent = seeds_needed(std, inside, limit=args.limit, alpha=2 * alpha) if inside > 0 else None
                decide = min((n for n in (show, equivalent) if n is not None), default=None)
                row[name] = {"show_difference": show, "show_equivalence": equivalent, "decide": decide}
            rows.append(row)

    cost = {s: sum(statistics.fmean(wall[(m, s, k)] for k in complete) for m in [args.method, *args.against]
                   if (m, s) in pairs) for s in scenarios}
    summary = {}
    for name in levels:
        per_dataset = {}
        for data in sorted({dataset(s) for s in scenarios}):
            mine = [r for r in rows if dataset(r["scenario"]) == data]
            need = sorted((r[name]["decide"] or args.limit + 1) for r in mine)
            allowed_one = need[-2] if len(need) > 1 else need[0]  # every verdict but one decided
            # each scenario runs until its own comparisons, bar the one left open, are decided
            worst = max(mine, key=lambda r: r[name]["decide"] or args.limit + 1)
            seconds = 0.0
            for s in sorted({r["scenario"] for r in mine}):
                own = [(r[name]["decide"] or args.limit + 1) for r in mine if r["scenario"] == s and r is not worst]
                more = max(0, max(own, default=0) - len(complete))
                seconds += more * cost[s]
            per_dataset[data] = {"seeds_for_all_but_one": allowed_one, "left_open": f"{worst['scenario']} vs "
                                 f"{worst['reference']}", "extra_cell_hours": round(seconds / 3600, 1)}
        summary[name] = per_dataset

    print(f"{args.metric}, {args.method} minus reference, {len(complete)} complete seeds ({complete[0]}..{complete[-1]})")
    print("| scenario | reference | difference | std | seeds to decide (one test) | seeds to decide (corrected) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells_ = [str(r[n]["decide"]) if r[n]["decide"] is not None else f">{args.limit}" for n in levels]
        print(f"| {r['scenario']} | {r['reference']} | {r['difference']:+.3f} | {r['std']:.3f} | {cells_[0]} | {cells_[1]} |")
    print("seconds per seed (these methods, one cell each):", {s: round(c) for s, c in cost.items()})
    for name, per_dataset in summary.items():
        for data, s in per_dataset.items():
            print(f"{name}: {data}: {s['seeds_for_all_but_one']} seeds for all verdicts but one "
                  f"({s['left_open']} left open): about {s['extra_cell_hours']} more cell-hours")
    print("RESULT " + json.dumps({"metric": args.metric, "complete_seeds": complete, "rows": rows,
                                  "seconds_per_seed": cost, "summary": summary}))


if __name__ == "__main__":
    main()

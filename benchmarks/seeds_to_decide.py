"""How many seeds, and how much machine time, would a study's verdicts need to be decided?

A planning figure for the powered study (issue 24), whose "Done when" asks for at most one
"undetermined" verdict per dataset among HSL against FedAvg, FedProx and MOON. For each of those
comparisons it takes the paired per-seed difference of the headline figure (pool test AUC) over
the seeds where both cells ran, and treats its mean and spread as if they were the truth:

- seeds to show the difference: a paired t-test with 80 % power at that mean;
- seeds to show equivalence within the margin (TOST, each one-sided test at the level): possible
  only when the mean lies inside the margin; approximated as one test at twice the level against
  the distance to the nearer margin, 80 % power at that mean (slightly optimistic near zero);
- seeds to decide: the fewer of the two.

Both at alpha 0.05 for one test and at 0.05 / family (the family of the report's corrected table;
Holm's strictest step). Per dataset, "every verdict but one decided" leaves open the comparison
that needs the most seeds (which minimises seeds, not hours) and needs the largest count of the
rest. Each remaining comparison then has 80 % power on its own; all of them together less.

What the seeds cost (mean wall time per cell in ``results.csv``, one thread per cell), three ways:
- each scenario stops at its own count, only the compared methods run (the least, but the grid
  has one seed list for every scenario, and the report counts a seed only when all its cells ran);
- the same count for every scenario of the dataset, only the compared methods;
- the grid as it stands: every cell of every scenario and method, both datasets, up to the larger
  dataset's count (thread-count reruns not included).

The spread is estimated from the seeds run (n - 1 degrees of freedom), and the seeds needed grow
with its square, so the printed range (the spread's 95 % interval) is what the counts could be.
Adding seeds until verdicts are decided is optional stopping: an extension should fix its number of
seeds in advance from a figure like this one.

    .venv/bin/python benchmarks/seeds_to_decide.py      # the powered study's results.csv

Prints a table and one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from scipy import stats as scipy_stats

from hsl_lightning.benchmark import Grid
from hsl_lightning.benchmark.results import _key, read_csv
from hsl_lightning.benchmark.sections import dataset
from hsl_lightning.benchmark.stats import ALPHA, MARGIN, Stats, interval, seeds_needed
from hsl_lightning.benchmark.verdicts import comparisons

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/benchmarks/heterogeneity_powered.yaml",
                   help="the grid (run from the repository root, as its paths are)")
    p.add_argument("--results", type=Path, help="its results.csv (default: the grid's out folder)")
    p.add_argument("--metric", default="pool_test_auc")
    p.add_argument("--against", nargs="+", default=["fedavg", "fedprox", "moon"])
    p.add_argument("--limit", type=int, default=10000, help="report seeds above this as '>limit'")
    args = p.parse_args()

    grid = Grid.load(args.config)
    path = args.results or grid.out / "results.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run the grid's report first (hsl benchmark --report-only).")
    table = read_csv(path)
    # the report's comparisons, paired by seed, and its family of corrected rows
    compared = comparisons(grid, Stats(table, args.metric))
    family = sum(len(d) >= 2 for _, _, d in compared)
    me = grid.compare["method"]
    levels = {"one test": ALPHA, "corrected": ALPHA / family}
    never = args.limit + 1  # past the limit

    rows = []
    for scenario, ref, diffs in compared:
        if ref not in args.against or len(diffs) < 3:
            continue
        mean, std, _ = interval(diffs)
        row = {"scenario": scenario, "reference": ref, "seeds": len(diffs), "difference": mean, "std": std}
        for name, alpha in levels.items():
            show = seeds_needed(std, abs(mean), limit=args.limit, alpha=alpha) if mean else None
            inside = MARGIN - abs(mean)
            equivalent = seeds_needed(std, inside, limit=args.limit, alpha=2 * alpha) if inside > 0 else None
            decide = min((n for n in (show, equivalent) if n is not None), default=None)
            row[name] = {"show_difference": show, "show_equivalence": equivalent, "decide": decide}
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no comparison of {me} against {args.against} has 3 paired seeds yet.")
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))

    cells = {_key(r): r["wall_s"] for r in table}  # one wall time per cell
    walls, seeds_of = defaultdict(float), defaultdict(set)
    for (m, s, _, seed), w in cells.items():
        walls[(m, s)] += w
        seeds_of[(m, s)].add(seed)
    per_seed = {k: walls[k] / len(seeds_of[k]) for k in walls}  # a seed's cells of (method, scenario), sweeps included

    compared = {s: sum(per_seed.get((m, s), 0.0) for m in [me, *args.against]) for s in scenarios}
    every_cell = sum(per_seed.values())  # a whole seed of the grid, every method and scenario
    run = {s: max(r["seeds"] for r in rows if r["scenario"] == s) for s in scenarios}
    df = min(r["seeds"] for r in rows) - 1
    spread = (df / scipy_stats.chi2.ppf(0.975, df), df / scipy_stats.chi2.ppf(0.025, df))  # seeds scale with std^2

    summary = {}
    for name in levels:
        per_dataset = {}
        for data in sorted({dataset(grid, s) for s in scenarios}):
            mine = [r for r in rows if dataset(grid, r["scenario"]) == data]
            open_ = max(mine, key=lambda r: r[name]["decide"] or never)
            rest = [r for r in mine if r is not open_]
            target = max((r[name]["decide"] or never for r in rest), default=0)
            own = {s: max([r[name]["decide"] or never for r in rest if r["scenario"] == s], default=0)
                   for s in {r["scenario"] for r in mine}}
            per_dataset[data] = {
                "seeds_for_all_but_one": target, "left_open": f"{open_['scenario']} vs {open_['reference']}",
                "cell_hours_per_scenario_compared_only": sum(max(0, n - run[s]) * compared[s] for s, n in own.items()) / 3600,
                "cell_hours_same_seeds_compared_only": sum(max(0, target - run[s]) * compared[s] for s in own) / 3600,
            }
        target = max(d["seeds_for_all_but_one"] for d in per_dataset.values())
        summary[name] = {"datasets": per_dataset, "seeds_whole_grid": target,
                         "cell_hours_whole_grid": max(0, target - min(run.values())) * every_cell / 3600}

    def count(n: int | None) -> str:
        return f">{args.limit}" if n is None or n > args.limit else str(n)

    print(f"{args.metric}, {me} minus reference, paired seeds per comparison; corrected: alpha {ALPHA}/{family}")
    print("| scenario | reference | seeds | difference | std | seeds to decide (one test) | seeds to decide (corrected) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['reference']} | {r['seeds']} | {r['difference']:+.3f} | {r['std']:.3f} | "
              f"{count(r['one test']['decide'])} | {count(r['corrected']['decide'])} |")
    print("cell-seconds per seed, compared methods:", {s: round(c) for s, c in compared.items()},
          f"every cell of the grid: {round(every_cell)}")
    print(f"the spread's 95 % interval ({df} degrees of freedom) puts every seed count at {spread[0]:.2f} to "
          f"{spread[1]:.2f} times the figure")
    for name, entry in summary.items():
        for data, d in entry["datasets"].items():
            print(f"{name}: {data}: {count(d['seeds_for_all_but_one'])} seeds for every verdict but one "
                  f"({d['left_open']} left open); more cell-hours: "
                  f"{d['cell_hours_per_scenario_compared_only']:.1f} (each scenario its own seeds, compared methods), "
                  f"{d['cell_hours_same_seeds_compared_only']:.1f} (same seeds in every scenario, compared methods)")
        print(f"{name}: the whole grid to {count(entry['seeds_whole_grid'])} seeds: "
              f"{entry['cell_hours_whole_grid']:.1f} more cell-hours")
    print("RESULT " + json.dumps({"metric": args.metric, "rows": rows, "seconds_per_seed_compared": compared,
                                  "seconds_per_seed_whole_grid": every_cell, "seed_count_factor_95": spread,
                                  "summary": summary}))


if __name__ == "__main__":
    main()

"""The long table of a benchmark grid's results: one row per method, scenario, sweep step, seed and
node, read from the cells' summaries (``collect``), written to ``results.csv`` and read back from it
(an older study kept without its runs), and the seeds every reported cell of which has a row
(``complete_seeds``: the seeds the verdicts use)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from hsl_lightning.benchmark.grid import Grid, result
from hsl_lightning.benchmark.tuning import replay

#: the columns of results.csv, in order
COLUMNS = ["method", "strategy", "scenario", "step", "step_index", "seed", "node", "n_train", "n_val", "n_test",
           "val_auc", "test_auc", "best_round", "rounds", "rounds_run", "external_auc", "wall_s", "bytes_per_round",
           "pool_test_auc", "n_pool_test", "deploy_round", "val_best_round", "cpu"]


def collect(grid: Grid, cells=None) -> list[dict]:
    """One row per method, scenario, sweep step, seed and node, from the cells' summaries
    (``cells``: default the reported ones)."""
    rows = []
    for cell in grid.cells() if cells is None else cells:
        summary = result(grid.out, cell)
        if summary is None:
            continue
        for node in summary["nodes"]:
            rows.append({"method": cell.method, "strategy": summary["method"], "scenario": cell.scenario,
                         "step": cell.step, "step_index": cell.step_index, "seed": cell.seed, "node": node["name"],
                         "n_train": node["n_train"], "n_val": node["n_val"], "n_test": node["n_test"],
                         "val_auc": node["val_auc"], "test_auc": node["test_auc"],
                         "best_round": summary["best_round"], "rounds": summary["rounds"],
                         "rounds_run": summary.get("rounds_run", summary["rounds"]),
                         "external_auc": _external(summary), "wall_s": summary["wall_s"],
                         "bytes_per_round": summary.get("bytes_sent_per_node_per_round", math.nan),
                         "pool_test_auc": node.get("pool_test_auc", math.nan),
                         "n_pool_test": node.get("n_pool_test", math.nan),
                         "deploy_round": summary.get("deploy_round", "best_auc"),
                         "val_best_round": _val_best_round(summary), "cpu": summary.get("cpu", "")})
    return rows


def _val_best_round(summary: dict) -> float:
    """The (1-based) round of best mean node validation AUC over every round the cell ran, whatever
    round it deployed: under ``deploy_round: last`` the convergence check (NaN without the curve)."""
    curve = (summary.get("curves") or {}).get("mean_val_auc") or [h.get("mean_val_auc")
                                                                  for h in summary.get("history") or []]
    return replay(curve, None) + 1 if curve else math.nan


def _external(summary: dict) -> float:
    """The cell's AUC on its (first) external site: the mean over the nodes' deployed models."""
    sites = summary.get("external") or []
    return float(sites[0]["auc"]) if sites else math.nan


def write_csv(rows: list[dict], path: Path) -> None:
    """Write ``rows`` (from :func:`collect`) to the CSV file ``path``, creating its folder: a header
    of :data:`COLUMNS`, then one line per row in that column order (a key a row lacks is written
    empty; a key outside the columns raises ``ValueError``). An existing file is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """The rows of a results.csv (numbers as numbers): an older study's results whose run folders
    are gone can still be reported."""
    numeric = {"step_index", "seed", "n_train", "n_val", "n_test", "val_auc", "test_auc", "best_round", "rounds",
               "rounds_run", "external_auc", "wall_s", "bytes_per_round", "pool_test_auc", "n_pool_test",
               "val_best_round"}
    rows = []
    for row in csv.DictReader(open(path)):
        for key in numeric & set(row):
            value = float(row[key]) if row[key] not in ("", None) else math.nan
            row[key] = int(value) if key in {"step_index", "seed"} else value
        rows.append(row)
    return rows


def _key(r: dict) -> tuple:
    return r["method"], r["scenario"], r["step"], r["seed"]


def complete_seeds(grid: Grid, rows: list[dict]) -> list[int]:
    """The reported seeds every reported cell of which has a row: the seeds the verdicts use, so
    that a grid stopped part way draws no verdict from a seed some of whose cells are missing."""
    done = {_key(r) for r in rows}
    return [seed for seed in grid.seeds
            if all((c.method, c.scenario, c.step, c.seed) in done for c in grid.cells() if c.seed == seed)]

"""Choosing each searched method's settings on validation data (the grid's ``search`` and ``tune``).

A candidate's score for a (method, scenario) is the mean over the tuning seeds of its cell's
``mean_val_auc``: the mean node validation AUC of the round the cell deploys. Test AUCs are never
read. The best score wins; a tie goes to the candidate listed first, so the choice is repeatable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hsl_lightning.benchmark.grid import Grid, run_dir
from hsl_lightning.errors import HSLError


def _score(directory: Path) -> float | None:
    file = directory / "summary.json"
    if not file.is_file():
        return None
    value = json.loads(file.read_text()).get("mean_val_auc")
    return None if value is None or math.isnan(float(value)) else float(value)


def scores(grid: Grid) -> dict[tuple[str, str], list[dict]]:
    """(method, scenario) -> one entry per candidate: its label, settings, validation AUC per
    finished tuning seed, and their mean (NaN when none finished)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for cell in grid.tuning_cells():
        entries = out.setdefault((cell.method, cell.scenario), [])
        entry = next((e for e in entries if e["candidate"] == cell.candidate), None)
        if entry is None:
            settings = dict(grid.candidates(cell.method))[cell.candidate]
            entry = {"candidate": cell.candidate, "settings": settings, "val_auc": {}, "step": cell.step}
            entries.append(entry)
        value = _score(run_dir(grid.out, cell))
        if value is not None:
            entry["val_auc"][cell.seed] = value
    for entries in out.values():
        for e in entries:
            values = list(e["val_auc"].values())
            e["mean_val_auc"] = sum(values) / len(values) if values else math.nan
    return out


def choose(grid: Grid, write: bool = True) -> dict[tuple[str, str], dict]:
    """(method, scenario) -> the settings of the candidate with the best mean validation AUC over
    the tuning seeds; writes every candidate's score and the choice to ``<out>/tuning.json``."""
    table = scores(grid)
    chosen, record = {}, []
    missing = []
    for (method, scenario), entries in table.items():
        finished = [e for e in entries if not math.isnan(e["mean_val_auc"])]
        if not finished:
            missing.append(f"{method}/{scenario}")
            continue
        best = max(finished, key=lambda e: e["mean_val_auc"])  # max keeps the first of equals
        chosen[(method, scenario)] = best["settings"]
        record.append({"method": method, "scenario": scenario, "step": best["step"], "chosen": best["candidate"],
                       "settings": best["settings"], "candidates": entries})
    if write and table:
        grid.out.mkdir(parents=True, exist_ok=True)
        (grid.out / "tuning.json").write_text(json.dumps(
            {"tuning_seeds": grid.tune.get("seeds"), "reported_seeds": grid.seeds, "choices": record}, indent=2))
    if missing:
        raise HSLError(f"No tuning cell finished for {', '.join(missing)}, so there is nothing to choose from; "
                       f"see {grid.out / 'failures.jsonl'} and rerun the grid.")
    return chosen

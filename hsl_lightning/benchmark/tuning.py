"""Choosing each searched method's settings on validation data (the grid's ``search`` and ``tune``),
and the deployed-round rule (the grid's ``pilot``).

A candidate's score for a (method, scenario) is the mean over the tuning seeds of its cell's
``mean_val_auc``: the mean node validation AUC of the round the cell deploys. Test AUCs are never
read. The best score wins; a tie goes to the candidate listed first, so the choice is repeatable.

The pilot (:func:`choose_rule`) compares deployed-round rules on validation data alone, without
favouring the rule that picks its round by the figure it is scored on: every node's validation set
is split in two fixed, class-stratified halves (recorded every round), each rule picks its round on
half A (``best_auc``: the best mean node AUC with the grid's patience; ``best_loss``: the least
summed loss with the same patience; ``last``: the round of best mean half-A AUC averaged over the
*other* pilot seeds, so a fixed number chosen elsewhere) and is scored by the mean node AUC of half
B at that round. The rule of best mean half-B score over every pilot cell (every method and
scenario alike) wins; a tie goes to the rule listed first. Under ``last`` the number of rounds of a
(method, scenario) is then the round of best mean node validation AUC (whole sets) averaged over
the pilot seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hsl_lightning.benchmark.grid import Cell, Grid, result
from hsl_lightning.errors import HSLError


def _score(out: Path, cell: Cell) -> float | None:
    summary = result(out, cell)
    value = None if summary is None else summary.get("mean_val_auc")
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
        value = _score(grid.out, cell)
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


def _number(value) -> float:
    return math.nan if value is None else float(value)


def replay(values: list, patience: int | None) -> int:
    """The 0-based round a run deploys when it keeps the best of ``values`` (higher is better; a
    NaN never beats a number) and stops once ``patience`` rounds passed since it, as the Federation
    does (:meth:`Federation._patience_spent`)."""
    best, best_r = -math.inf, -1
    for r, value in enumerate(values):
        if patience is not None and best_r >= 0 and r - 1 - best_r >= patience:
            break
        value = _number(value)
        value = -math.inf if math.isnan(value) else value
        if value > best or best_r < 0:
            best, best_r = value, r
    return best_r


def _mean_curve(curves: list[list]) -> list[float]:
    """Round by round, the mean of the defined values of ``curves`` (NaN where none is)."""
    out = []
    for r in range(max((len(c) for c in curves), default=0)):
        values = [_number(c[r]) for c in curves if r < len(c) and not math.isnan(_number(c[r]))]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def _pilot_rounds(rule: str, curves: dict, others: list[dict], patience: int | None) -> int:
    """The 0-based round ``rule`` deploys in a pilot cell, chosen on validation half A."""
    if rule == "best_auc":
        return replay(curves["mean_val_auc_a"], patience)
    if rule == "best_loss":
        return replay([-_number(v) for v in curves["sum_val_loss_a"]], patience)
    # last: a fixed number of rounds chosen on the other pilot seeds (on this one when it is alone)
    pool = [c["mean_val_auc_a"] for c in others] or [curves["mean_val_auc_a"]]
    return replay(_mean_curve(pool), None)


def _pilot_curves(grid: Grid, chosen: dict, every_scenario: bool) -> list[tuple[Cell, dict]]:
    """Each finished pilot cell with its validation curves."""
    finished = []
    for cell in grid.pilot_cells(chosen, every_scenario):
        summary = result(grid.out, cell)
        if summary is not None and "curves" in summary:
            finished.append((cell, summary["curves"]))
        elif summary is not None:  # a summary.json without its record: the curves from its history
            finished.append((cell, {k: [h.get(k) for h in summary["history"]]
                                    for k in ("mean_val_auc", "mean_val_auc_a", "mean_val_auc_b", "sum_val_loss_a")}))
    return finished


def choose_rule(grid: Grid, chosen: dict[tuple[str, str], dict], write: bool = True) -> str:
    """The deployed-round rule the pilot's validation data favour (see the module's docstring),
    from the pilot cells of the pilot's scenarios. Writes every pilot cell's rounds and scores,
    each rule's mean and the choice to ``<out>/pilot.json``."""
    rules = list(grid.pilot["rules"])
    reported = {(c.method, c.scenario): dict(c.settings) for c in grid.cells(chosen)}
    finished = _pilot_curves(grid, chosen, every_scenario=False)
    if not finished:
        raise HSLError(f"No pilot cell finished, so there is no deployed-round rule to choose; see "
                       f"{grid.out / 'failures.jsonl'} and rerun the grid.")
    cells, scores = [], {rule: [] for rule in rules}
    for cell, curves in finished:
        patience = reported[(cell.method, cell.scenario)].get("federation.patience")
        others = [c for o, c in finished if (o.method, o.scenario, o.step) == (cell.method, cell.scenario,
                                                                                     cell.step) and o.seed != cell.seed]
        entry = {"cell": cell.key, "rounds_run": len(curves["mean_val_auc"])}
        for rule in rules:
            r = _pilot_rounds(rule, curves, others, patience)
            score = _number(curves["mean_val_auc_b"][r])
            entry[rule] = {"round": r + 1, "val_auc_b": score}
            if not math.isnan(score):
                scores[rule].append(score)
        cells.append(entry)
    means = {rule: sum(v) / len(v) if v else -math.inf for rule, v in scores.items()}
    winner = max(rules, key=lambda rule: means[rule])  # max keeps the first of equals
    if write:
        grid.out.mkdir(parents=True, exist_ok=True)
        (grid.out / "pilot.json").write_text(json.dumps(
            {"pilot_seeds": grid.pilot["seeds"], "scenarios": grid.pilot_scenarios(), "rules": rules,
             "chosen": winner, "mean_val_auc_b": {r: (None if math.isinf(m) else m) for r, m in means.items()},
             "scored_cells": {r: len(v) for r, v in scores.items()}, "cells": cells}, indent=1))
    return winner


def rule_settings(grid: Grid, chosen: dict[tuple[str, str], dict], rule: str) -> dict[tuple[str, str], dict]:
    """``chosen`` with the deployed-round rule added for every method and scenario alike; under
    ``last``, each (method, scenario)'s number of rounds: the round of best mean node validation
    AUC averaged over its pilot cells (every scenario's pilot cells must have run)."""
    out = {}
    finished = _pilot_curves(grid, chosen, every_scenario=True) if rule == "last" else []
    rounds = {}
    for cell in grid.cells(chosen):
        key = (cell.method, cell.scenario)
        if key in out:
            continue
        out[key] = {**chosen.get(key, {}), "federation.deploy_round": rule}
        if rule == "last":
            curves = [c["mean_val_auc"] for o, c in finished if (o.method, o.scenario) == key]
            if not curves:
                raise HSLError(f"No pilot cell of {key[0]}/{key[1]} finished, so its number of rounds under "
                               "deploy_round 'last' cannot be chosen; see failures.jsonl and rerun the grid.")
            rounds[f"{key[0]}/{key[1]}"] = replay(_mean_curve(curves), None) + 1
            out[key].update({"federation.rounds": rounds[f"{key[0]}/{key[1]}"], "federation.patience": None})
    if rounds:
        record = grid.out / "pilot.json"
        data = json.loads(record.read_text()) if record.is_file() else {}
        record.write_text(json.dumps({**data, "rounds_under_last": rounds}, indent=1))
    return out

"""What a benchmark grid measured: a long CSV, a Markdown report and plots.

Statistics, for one method, scenario and sweep step: per seed, the mean of the nodes' test AUCs,
the worst node's AUC and the standard deviation across nodes (the paper's "stability"); then the
mean and standard deviation of each over seeds. A scenario's figure averages its sweep steps
within each seed first. Nodes whose test AUC is undefined (one class) are left out, and counted.

Verdicts (``compare`` in the grid): the per-seed difference of scenario means between the compared
method and each reference (paired by seed), with a 95 % t-interval over seeds, and one of four
outcomes, each test corrected by Holm over every row of its table (family-wise error 5 %):
"better" or "worse" (the paired t-test of no difference rejects), "equivalent" (within
:data:`MARGIN` AUC: both one-sided tests of TOST reject a difference of at least the margin), or
"undetermined" (neither: the seeds cannot tell); "n/a" with fewer than two seeds. Each row also
gives the minimum detectable difference: the true difference the paired t-test finds with 80 %
power at alpha 0.05 (two-sided, uncorrected) with the seeds run and the spread observed. The
tests need SciPy (the ``analysis`` extra).

Two test figures: each node's test AUC on its own test set, and the pool figure (its deployed
model on the whole test pool seen through its scanner, ``pool_test_auc``), which has the same
expectation from several times the images; the headline uses the pool figure when the cells
have it (older studies do not: their headline is the node test figure).

A grid stopped part way: the report opens with how far it got (tuning, pilot, reported cells, and
which seeds are complete, i.e. every reported cell of the seed finished), and the verdicts use the
complete seeds only, so no verdict rests on a seed some of whose cells are missing; with no
complete seed there is no verdict. The figures tables use every finished cell (with seed counts).
The thread-count rerun section gives how far each rerun cell's figures moved and which headline
verdicts (complete seeds) change with the rerun cells swapped in; the convergence table gives the
share of cells whose round of best validation AUC is the last they ran (under ``deploy_round:
last``, where every cell deploys its last round, the check that the fixed number was not too few).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from hsl_lightning.benchmark.grid import Grid, result
from hsl_lightning.benchmark.tuning import replay

#: strategies that are not distributed training methods (bounds and the frozen-encoder baseline)
NOT_DISTRIBUTED = {"local", "central", "foundation"}
# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}
#: the equivalence margin of the verdicts (AUC): within it, two methods count as equivalent
MARGIN = 0.02
#: the power and (two-sided) level of the minimum detectable difference
POWER, ALPHA = 0.8, 0.05

COLUMNS = ["method", "strategy", "scenario", "step", "step_index", "seed", "node", "n_train", "n_val", "n_test",
           "val_auc", "test_auc", "best_round", "rounds", "rounds_run", "external_auc", "wall_s", "bytes_per_round",
           "pool_test_auc", "n_pool_test", "deploy_round", "val_best_round"]


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
                         "val_best_round": _val_best_round(summary)})
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _nanfree(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan  # no spread from one seed


class Stats:
    """Per-seed node statistics, grouped, with the summaries the report prints."""

    def __init__(self, rows: list[dict], metric: str = "test_auc"):
        self.nodes = defaultdict(list)  # (method, scenario, step, seed) -> node AUCs
        self.undefined = defaultdict(int)
        self.steps = defaultdict(dict)  # scenario -> {step index: label}
        self.strategy = {}
        for r in rows:
            key = (r["method"], r["scenario"], r["step"], r["seed"])
            self.steps[r["scenario"]][r["step_index"]] = r["step"]
            self.strategy[r["method"]] = r["strategy"]
            auc = r.get(metric)
            if auc is None or math.isnan(float(auc)):
                self.undefined[(r["method"], r["scenario"])] += 1
                self.nodes.setdefault(key, [])
            else:
                self.nodes[key].append(float(auc))

    def per_seed(self, method: str, scenario: str, step: str | None = None) -> dict[int, dict]:
        """seed -> {mean, worst, spread}; with ``step`` None, averaged over the scenario's steps."""
        steps = [step] if step is not None else [self.steps[scenario][i] for i in sorted(self.steps[scenario])]
        by_seed = defaultdict(list)
        for (m, s, st, seed), aucs in self.nodes.items():
            if m == method and s == scenario and st in steps and aucs:
                arr = np.asarray(aucs)
                by_seed[seed].append((arr.mean(), arr.min(), arr.std()))
        return {seed: {"mean": float(np.mean([v[0] for v in vals])), "worst": float(np.mean([v[1] for v in vals])),
                       "spread": float(np.mean([v[2] for v in vals]))}
                for seed, vals in by_seed.items() if len(vals) == len(steps)}

    def summary(self, method: str, scenario: str, step: str | None = None) -> dict:
        seeds = self.per_seed(method, scenario, step)
        out = {"seeds": len(seeds)}
        for k in ("mean", "worst", "spread"):
            out[k], out[f"{k}_std"] = _mean_std([v[k] for v in seeds.values()])
        return out


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean difference, std over seeds, 95 % t-interval half-width; NaN with fewer than 2)."""
    if not diffs:
        return math.nan, math.nan, math.nan
    mean, std = _mean_std(diffs)
    if len(diffs) < 2:
        return mean, std, math.nan
    df = len(diffs) - 1
    t = T95.get(df) or T95[max(k for k in T95 if k <= df)]
    return mean, std, t * std / math.sqrt(len(diffs))


def detectable(std: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The minimum detectable difference of a paired t-test over ``n`` seeds whose differences
    spread by ``std``: (t_{1-alpha/2} + t_{power}) * std / sqrt(n), n - 1 degrees of freedom."""
    if n < 2 or math.isnan(std):
        return math.nan
    from scipy import stats as scipy_stats

    df = n - 1
    return float((scipy_stats.t.ppf(1 - alpha / 2, df) + scipy_stats.t.ppf(power, df)) * std / math.sqrt(n))


def seeds_needed(std: float, target: float, limit: int = 1000) -> int | None:
    """The fewest seeds whose minimum detectable difference is at most ``target`` (None past ``limit``)."""
    if math.isnan(std):
        return None
    if std == 0:
        return 2
    return next((n for n in range(2, limit + 1) if detectable(std, n) <= target), None)


def tost_p(diffs: list[float], margin: float = MARGIN) -> float:
    """Two one-sided t-tests of equivalence within ``margin``: the larger of the p-values of
    "difference <= -margin" and "difference >= +margin" (small: the difference lies within)."""
    if len(diffs) < 2:
        return math.nan
    mean, std = _mean_std(diffs)
    if std == 0:
        return 0.0 if abs(mean) < margin else 1.0
    from scipy import stats as scipy_stats

    se, df = std / math.sqrt(len(diffs)), len(diffs) - 1
    return float(max(scipy_stats.t.sf((mean + margin) / se, df), scipy_stats.t.cdf((mean - margin) / se, df)))


def outcomes(diffs: list[list[float]], margin: float = MARGIN) -> list[str]:
    """One of "better", "worse", "equivalent", "undetermined" (or "n/a" under 2 seeds) per row of a
    table of paired differences: the difference test and the equivalence test are each corrected by
    Holm over the table's rows."""
    different = holm([p_value(d) for d in diffs])
    equivalent = holm([tost_p(d, margin) for d in diffs])
    out = []
    for d, (_, diff), (_, eq) in zip(diffs, different, equivalent):
        if len(d) < 2:
            out.append("n/a")
        elif diff:
            out.append("better" if np.mean(d) > 0 else "worse")
        else:
            out.append("equivalent" if eq else "undetermined")
    return out


def p_value(diffs: list[float]) -> float:
    """Two-sided paired t-test of mean difference zero (NaN with fewer than 2 differences)."""
    if len(diffs) < 2:
        return math.nan
    mean, std = _mean_std(diffs)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    from scipy import stats as scipy_stats

    t = mean / (std / math.sqrt(len(diffs)))
    return float(2 * scipy_stats.t.sf(abs(t), len(diffs) - 1))


def holm(ps: list[float], alpha: float = 0.05) -> list[tuple[float, bool]]:
    """Holm's step-down correction: (p, rejected) per test, the family-wise error held at ``alpha``
    over the tests with a p-value (NaN ones are left out and never rejected)."""
    tested = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
    rejected = [False] * len(ps)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - rank):
            break  # step-down: every larger p-value is kept too
        rejected[i] = True
    return list(zip(ps, rejected))


def _fmt(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def coinciding(grid: Grid, stats: Stats) -> dict[tuple[str, str], str]:
    """(method, scenario) -> an earlier method whose every node test AUC in every cell of the scenario is
    exactly the same (e.g. Personalized and Swarm at two nodes, where 0.5 own + 0.5 other is the mean):
    one method run twice, which the report names once instead of ranking it twice."""
    same = {}
    for scenario in grid.scenarios:
        keys = {m: sorted(k for k in stats.nodes if k[0] == m and k[1] == scenario) for m in grid.methods}
        methods = [m for m in grid.methods if keys[m]]
        for i, method in enumerate(methods):
            for other in methods[:i]:
                if (other, scenario) in same or len(keys[other]) != len(keys[method]):
                    continue
                pairs = zip(keys[method], keys[other])
                if all(a[2:] == b[2:] and stats.nodes[a] == stats.nodes[b] for a, b in pairs):
                    same[(method, scenario)] = other
                    break
    return same


def headline(grid: Grid, stats: Stats, same: dict | None = None) -> str:
    """Mean node AUC ± std over seeds, per method (rows) and scenario (columns); a method that
    coincides with an earlier one in a scenario shows "= that method"."""
    same = same or {}
    scenarios = [s for s in grid.scenarios if s in stats.steps]
    lines = ["| method | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for method in grid.methods:
        cells = []
        for s in scenarios:
            x = stats.summary(method, s)
            text = _fmt(x["mean"], x["mean_std"])
            cells.append(f"= {same[(method, s)]}" if (method, s) in same and text != "-" else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def convergence(grid: Grid, rows: list[dict]) -> list[str]:
    """Per method: how many cells deployed the last round of their budget (not shown converged)."""
    cells, peaks, fixed = {}, {}, set()
    for r in rows:
        key = (r["method"], r["scenario"], r["step"], r["seed"])
        cells[key] = (int(r["best_round"]), int(r["rounds"]), int(r["rounds_run"]))
        peaks[key] = _nan(r.get("val_best_round"))
        if r.get("deploy_round") == "last":
            fixed.add(key)
    lines = ["## Convergence", "",
             "A cell that deploys the last round of its budget may have stopped improving only because the budget "
             "ran out; the study's rule is at most 10 % of any method's cells. Early stopping ends a cell once its "
             "patience has passed since the round of best mean node validation AUC. A cell whose best round is "
             "the first never improved on it: stopped early, but not trained to convergence either.", "",
             "A cell that ran its whole budget without early stopping ('ran the whole budget') was still improving "
             "within its patience when the budget ended, even if its deployed round is earlier.", "",
             "'Best validation AUC in the last round': the cells whose round of best mean node validation AUC, over "
             "every round they ran, is the last one they ran (curve still rising at its end). Under the rule 'last' "
             "every cell deploys its last round by design, so this column is the convergence check there.", "",
             "| method | cells | deployed the last round | share | ran the whole budget | best round 1 | mean rounds run "
             "| budget (rounds) | best validation AUC in the last round |", "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for method in grid.methods:
        mine = [v for k, v in cells.items() if k[0] == method]
        if not mine:
            continue
        last = sum(best == budget for best, budget, _ in mine)
        worst = max(worst, last / len(mine))
        budgets = sorted({budget for _, budget, _ in mine})
        first = sum(best == 1 < budget for best, budget, _ in mine)
        whole = sum(run >= budget for _, budget, run in mine)
        known = [(peaks[k], cells[k][2]) for k in cells if k[0] == method and not math.isnan(peaks[k])]
        rising = sum(peak == run for peak, run in known)
        lines.append(f"| {method} | {len(mine)} | {last} | {100 * last / len(mine):.0f} % | "
                     f"{whole} ({100 * whole / len(mine):.0f} %) | {first} | "
                     f"{np.mean([run for _, _, run in mine]):.1f} | {', '.join(map(str, budgets))} | "
                     + (f"{rising} of {len(known)} ({100 * rising / len(known):.0f} %)" if known else "-") + " |")
    lines += ["", f"Largest share of any method deploying the last round: {100 * worst:.0f} %"
              + (f" ({len(fixed)} of {len(cells)} cells deploy the last round by the rule 'last')." if fixed else ".")]
    return lines + [""]


def cost(grid: Grid, rows: list[dict]) -> list[str]:
    """Per method: a cell's mean wall time and what a node sends per round."""
    cells = {}
    for r in rows:
        cells[(r["method"], r["scenario"], r["step"], r["seed"])] = (float(r.get("wall_s", math.nan)),
                                                                     float(r.get("bytes_per_round", math.nan)))
    lines = ["## Cost", "", "Wall time per cell on the machine above (cells ran side by side, so compare within this "
             "table only) and what each node sends per round.", "",
             "| method | mean wall time per cell (s) | MB sent per node per round |", "|---|---|---|"]
    for method in grid.methods:
        mine = [v for k, v in cells.items() if k[0] == method]
        if mine:
            wall, sent = _nanfree(w for w, _ in mine), _nanfree(b for _, b in mine)
            lines.append(f"| {method} | {f'{np.mean(wall):.0f}' if wall else '-'} | "
                         f"{f'{np.mean(sent) / 1e6:.2f}' if sent else '-'} |")
    return lines + [""]


def unfinished(grid: Grid) -> list[str]:
    """The reported cells without a summary, and the last error of those that failed."""
    missing = [c for c in grid.cells() if result(grid.out, c) is None]
    if not missing:
        return []
    errors = {}
    failures = grid.out / "failures.jsonl"
    if failures.is_file():
        for line in failures.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                errors[record["cell"]] = record["error"]
    failed = [c for c in missing if c.key in errors]
    lines = ["## Unfinished cells", "", f"{len(missing)} reported cells have no result; {len(failed)} of them failed"
             + (" (last error below)" if failed else "") + ", the rest have not run yet.", ""]
    lines += [f"- {c.key}: {errors[c.key]}" for c in failed]
    return lines + [""]


def _key(r: dict) -> tuple:
    return r["method"], r["scenario"], r["step"], r["seed"]


def complete_seeds(grid: Grid, rows: list[dict]) -> list[int]:
    """The reported seeds every reported cell of which has a row: the seeds the verdicts use, so
    that a grid stopped part way draws no verdict from a seed some of whose cells are missing."""
    done = {_key(r) for r in rows}
    return [seed for seed in grid.seeds
            if all((c.method, c.scenario, c.step, c.seed) in done for c in grid.cells() if c.seed == seed)]


def _stored(grid: Grid, name: str) -> dict | None:
    """A choice the grid recorded under its ``out`` (``tuning.json``, ``pilot.json``), or None."""
    file = grid.out / name
    return json.loads(file.read_text()) if file.is_file() else None


def _finished(grid: Grid, cells) -> int:
    return sum(result(grid.out, c) is not None for c in cells)


def progress(grid: Grid, rows: list[dict], reruns: list[dict]) -> list[str]:
    """How far the grid got, stage by stage (tuning, pilot, reported cells seed by seed, reruns),
    and which seeds the verdicts use."""
    reported = grid.cells()
    done = {_key(r) for r in rows}
    complete = complete_seeds(grid, rows)
    per_seed = {seed: sum((c.method, c.scenario, c.step, c.seed) in done for c in reported if c.seed == seed)
                for seed in grid.seeds}
    size = {seed: sum(c.seed == seed for c in reported) for seed in grid.seeds}
    lines = ["## How far the grid got", ""]
    if grid.tune:
        tuning = grid.tuning_cells()
        by_data = defaultdict(lambda: [0, 0])
        for c in tuning:
            by_data[dataset(grid, c.scenario)][0] += result(grid.out, c) is not None
            by_data[dataset(grid, c.scenario)][1] += 1
        finished = sum(v[0] for v in by_data.values())
        lines.append(f"- Tuning (seeds {grid.tune.get('seeds')}, not reported): {finished} of {len(tuning)} cells ("
                     + ", ".join(f"{name} {a} of {b}" for name, (a, b) in by_data.items()) + "); settings "
                     + ("chosen (below)." if (grid.out / "tuning.json").is_file() and finished == len(tuning)
                        else "not chosen yet: the reported cells wait for them."))
    if grid.pilot:
        pilot = grid.pilot_cells()
        chosen = (_stored(grid, "pilot.json") or {}).get("chosen")
        lines.append(f"- Pilot of the deployed-round rules (seeds {grid.pilot.get('seeds')}, not reported): "
                     f"{_finished(grid, pilot)} of {len(pilot)} cells; "
                     + (f"rule chosen: {chosen} (below)." if chosen else
                        "no rule chosen yet: the reported cells wait for it."))
    started = [s for s in grid.seeds if 0 < per_seed[s] < size[s]]
    lines.append(f"- Reported cells: {len(done)} of {len(reported)}. Seeds complete (every reported cell finished): "
                 + (f"{len(complete)} of {len(grid.seeds)} ({', '.join(map(str, complete))})" if complete else
                    f"none of {len(grid.seeds)}") + "; part done: "
                 + (", ".join(f"seed {s} ({per_seed[s]} of {size[s]} cells)" for s in started) or "none") + ".")
    if grid.rerun:
        sample = grid.rerun_cells(reported)
        lines.append(f"- Thread-count reruns: {len({_key(r) for r in reruns})} of {len(sample)} cells.")
    if not complete:
        lines += ["", "No seed is complete, so this report draws no verdict: the verdict tables below stay empty "
                  "until a whole seed has run (the figures above it, if any, are from unfinished seeds)."]
    elif started or len(complete) < len({r["seed"] for r in rows}):
        lines += ["", f"Verdicts use the complete seeds only ({', '.join(map(str, complete))}); the cells of the "
                  "seeds that are part done enter the figures (each figure gives its seed count) but no verdict."]
    else:
        lines += ["", f"Verdicts use the complete seeds ({', '.join(map(str, complete))})."]
    return lines + [""]


def edges(grid: Grid, method: str, settings: dict) -> list[str]:
    """The chosen settings that lie at the low or high end of a searched range of 3 or more numbers:
    the best value may lie beyond it. (A 2-value search has no inside, so it is not flagged.)"""
    out = []
    for key, value in settings.items():
        values = grid.methods.get(method, {}).get("search", {}).get(key) or []
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) < 3 or len(numbers) != len(values) or not isinstance(value, (int, float)):
            continue
        if value == min(numbers) or value == max(numbers):
            out.append(f"{key.split('.')[-1]} {'lowest' if value == min(numbers) else 'highest'}")
    return out


def tuning_section(grid: Grid) -> list[str]:
    """The values chosen on validation data (``tuning.json``), with every candidate's score and the
    choices that lie at an end of their searched range."""
    record = _stored(grid, "tuning.json")
    if record is None:
        return []
    lines = ["## Settings chosen on validation data", "",
             f"Tuning seeds {record['tuning_seeds']} (never reported); reported seeds {record['reported_seeds']}. "
             "Each candidate ran on every tuning seed at the scenario's tuning step; the one of best mean node "
             "validation AUC (averaged over the tuning seeds) is used for every reported cell of the scenario. No "
             "test AUC entered a choice.", "",
             "| method | scenario (step) | chosen | val AUC | at a range's end | candidates (val AUC) |",
             "|---|---|---|---|---|---|"]
    at_end = 0
    for c in record["choices"]:
        chosen = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in c["settings"].items())
        best = next(e for e in c["candidates"] if e["candidate"] == c["chosen"])
        others = "; ".join(f"{', '.join(str(v) for v in e['settings'].values())}: {_fmt(e['mean_val_auc'])}"
                           for e in c["candidates"])
        ends = edges(grid, c["method"], c["settings"])
        at_end += bool(ends)
        lines.append(f"| {c['method']} | {c['scenario']} ({c['step']}) | {chosen} | {_fmt(best['mean_val_auc'])} | "
                     f"{', '.join(ends) or '-'} | {others} |")
    lines += ["", f"{at_end} of {len(record['choices'])} choices put a setting at the lowest or highest value of a "
              "searched range of 3 or more values, where a value beyond the range might have scored better.", "",
              "Candidates per scenario (the tuning budget; more candidates fit validation noise more closely, which "
              "raises the validation AUC of the choice but not, on average, its test AUC): " +
              ", ".join(f"{m} {len(grid.candidates(m))}" for m, e in grid.methods.items() if e["search"]) + ".", ""]
    return lines


def markdown(grid: Grid, rows: list[dict], command: str = "", machine: str = "",
             reruns: list[dict] | None = None) -> str:
    """The report; ``reruns``: the rows of the thread-count rerun cells (see ``Grid.rerun_cells``)."""
    stats = Stats(rows)
    pool = Stats(rows, "pool_test_auc")
    has_pool = any(pool.nodes.values())
    done = {(r["method"], r["scenario"], r["step"], r["seed"]) for r in rows}
    total = len(grid.cells())
    parts = [f"# Benchmark: {grid.source.stem if grid.source else grid.out.name}", ""]
    if grid.description:
        parts += [grid.description.strip(), ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    if machine:
        parts += [f"Machine: {machine}", ""]
    parts += [f"Cells finished: {len(done)} of {total}; seeds {grid.seeds}. Figures: mean over nodes, "
              "mean ± std over seeds (sweeps averaged over their steps within each seed); a method's figure uses "
              "the seeds for which all its cells of the scenario finished (the per-scenario tables give the count).", ""]
    parts += progress(grid, rows, reruns or [])
    complete = set(complete_seeds(grid, rows))
    whole = [r for r in rows if r["seed"] in complete]  # the rows the verdicts use
    same = coinciding(grid, stats)
    if not rows:
        parts += ["No reported cell has finished yet, so there are no figures and no verdicts.", ""]
    elif has_pool:
        parts += ["## Mean pool test AUC (the headline figure)", "",
                  "Every node's deployed model scored on the whole test pool of its source (every node's test "
                  "images, before any scanner) seen through the node's own scanner: the same expectation as the "
                  "node's own test AUC (same scanner, same class-conditional images; the positive rate does not "
                  "move an AUC's expectation), from several times the images, so a lower-variance figure. The "
                  "headline verdicts use it.", "", headline(grid, pool, same), ""]
    if rows:
        parts += ["## Mean node test AUC", "", "Each node's deployed model on its own test set." +
                  (" The first figure, kept beside the pool figure." if has_pool else ""), "",
                  headline(grid, stats, same), ""]
    if same:
        parts += ["\"= X\": every node test AUC of every cell equals method X's, so the two are one method in that "
                  "scenario (" + "; ".join(f"{m} = {o} in {s}" for (m, s), o in same.items()) + ").", ""]
    external = Stats(rows, "external_auc")
    scored_external = any(external.nodes.values())  # some cell scored an external site
    if scored_external:
        parts += ["## Unseen site: test AUC", "",
                  "An institution that never trained (its own scanner and positive rate, images disjoint from every "
                  "node's), scored with what each cell deploys; methods that deploy a model per node give the mean "
                  "over their nodes' models.", "", headline(grid, external, same), ""]
    if rows:
        parts += ["## Mean node validation AUC", "",
                  "At the deployed round (chosen by it under the rule best_auc, so then optimistic, alike for every "
                  "method): the figure to choose variants and settings by, leaving the test sets out of every "
                  "choice.", "", headline(grid, Stats(rows, "val_auc"), same), ""]
        parts += convergence(grid, rows) + cost(grid, rows)
    parts += unfinished(grid)
    parts += tuning_section(grid)
    parts += pilot_section(grid)
    if grid.compare and complete:
        if has_pool:
            parts += _verdicts(grid, Stats(whole, "pool_test_auc"), "pool test AUC", headline=True)
        parts += _verdicts(grid, Stats(whole), "mean node test AUC", headline=not has_pool)
        if scored_external:
            parts += _verdicts(grid, Stats(whole, "external_auc"), "unseen site AUC")
        if reruns:
            parts += rerun_section(grid, rows, reruns, "pool_test_auc" if has_pool else "test_auc", complete)
    for scenario in grid.scenarios:
        if scenario not in stats.steps:
            continue
        parts += [f"## {scenario}", "",
                  "| method | step | mean node AUC | worst node | across-node std | seeds |", "|---|---|---|---|---|---|"]
        steps = [stats.steps[scenario][i] for i in sorted(stats.steps[scenario])]
        for method in grid.methods:
            for step in (steps if len(steps) > 1 else [None]):
                x = stats.summary(method, scenario, step)
                if not x["seeds"]:
                    continue
                parts.append(f"| {method} | {step or '-'} | {_fmt(x['mean'], x['mean_std'])} | "
                             f"{_fmt(x['worst'], x['worst_std'])} | {_fmt(x['spread'], x['spread_std'])} | {x['seeds']} |")
        undefined = {m: n for (m, s), n in stats.undefined.items() if s == scenario}
        if undefined:
            parts += ["", "Nodes with an undefined test AUC (one class in the test set), left out: " +
                      ", ".join(f"{m}: {n}" for m, n in undefined.items()) + "."]
        parts.append("")
    return "\n".join(parts)


def dataset(grid: Grid, scenario: str) -> str:
    """The data a scenario runs on: its own data config's name, else the grid's."""
    own = [c for c in grid.scenarios[scenario]["configs"] if "/data/" in c.replace("\\", "/")]
    return Path((own or grid.data or ["-"])[-1]).stem


def comparisons(grid: Grid, stats: Stats) -> list[tuple[str, str, list[float]]]:
    """(scenario, reference, per-seed differences of the compared method minus the reference), for
    every scenario that runs both, paired by seed."""
    me, out = grid.compare["method"], []
    for scenario in grid.scenarios:
        if not grid.runs(me, scenario):
            continue
        mine = stats.per_seed(me, scenario)
        for ref in grid.compare.get("against", []):
            if grid.runs(ref, scenario):
                theirs = stats.per_seed(ref, scenario)
                out.append((scenario, ref, [mine[s]["mean"] - theirs[s]["mean"]
                                            for s in sorted(set(mine) & set(theirs))]))
    return out


def _verdicts(grid: Grid, stats: Stats, what: str = "mean node test AUC", headline: bool = False) -> list[str]:
    me, against = grid.compare["method"], grid.compare.get("against", [])
    rows = comparisons(grid, stats)
    words = outcomes([d for _, _, d in rows])
    title = f"## {me} against the references: {what}" + (" (headline)" if headline else "")
    lines = [title, "",
             f"Per-seed difference of the scenario's {what} ({me} minus reference, paired by seed), mean ± std over "
             f"seeds and 95 % t-interval half-width; the minimum detectable difference (MDD: found with "
             f"{POWER:.0%} power by a two-sided paired t-test at alpha {ALPHA}, with these seeds and this spread); "
             f"the p-values of the paired t-test of no difference and of equivalence within {MARGIN} AUC (TOST); "
             "and the verdict, both tests corrected by Holm over every row of this table: better or worse (a "
             f"difference), equivalent (within ±{MARGIN}), or undetermined (the seeds cannot tell either).", "",
             "| scenario | reference | seeds | difference | ± 95 % | MDD | p (difference) | p (equivalence) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    matrix = {}
    for (scenario, ref, diffs), word in zip(rows, words):
        mean, std, half = interval(diffs)
        mdd = detectable(std, len(diffs))
        p, q = p_value(diffs), tost_p(diffs)
        lines.append(f"| {scenario} | {ref} | {len(diffs)} | {_fmt(mean, std)} | {_fmt(half)} | {_fmt(mdd)} | "
                     f"{'-' if math.isnan(p) else f'{p:.3g}'} | {'-' if math.isnan(q) else f'{q:.3g}'} | {word} |")
        matrix[(ref, scenario)] = "-" if math.isnan(mean) else f"{mean:+.3f} {word} (MDD {_fmt(mdd)})"
    scenarios = [s for s in grid.scenarios if any(r[0] == s for r in rows)]
    lines += ["", f"In short ({me} minus reference, mean over seeds, the verdict, and the minimum detectable "
              "difference):", "", "| reference | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    lines += [f"| {ref} | " + " | ".join(matrix.get((ref, s), "not run") for s in scenarios) + " |" for ref in against]
    by_data = defaultdict(lambda: defaultdict(int))
    for (scenario, _, _), word in zip(rows, words):
        by_data[dataset(grid, scenario)][word] += 1
    lines += ["", "Verdicts per dataset: " + "; ".join(
        f"{name}: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())) for name, counts in by_data.items())
        + ".", ""]
    lines += ["Seeds the spread observed here would need for a minimum detectable difference of 0.02 and 0.03 "
              "(a planning figure: the spread itself is estimated from these seeds):", "",
              "| scenario | reference | std of the difference | seeds run | MDD | seeds for 0.02 | seeds for 0.03 |",
              "|---|---|---|---|---|---|---|"]
    for scenario, ref, diffs in rows:
        _, std, _ = interval(diffs)
        need = [seeds_needed(std, t) for t in (0.02, 0.03)]
        lines.append(f"| {scenario} | {ref} | {_fmt(std)} | {len(diffs)} | {_fmt(detectable(std, len(diffs)))} | "
                     + " | ".join("-" if n is None else str(n) for n in need) + " |")
    # the best other distributed method: neither a bound (local, central) nor a variant of the method itself
    distributed = [m for m in grid.methods if stats.strategy.get(m) not in NOT_DISTRIBUTED
                   and stats.strategy.get(m) != stats.strategy.get(me) and m != me]
    lines += ["", f"{me} against every distributed method ({what}, mean over seeds) and against central:", ""]
    for scenario in grid.scenarios:
        x = stats.summary(me, scenario)
        if not x["seeds"]:
            continue
        others = {m: stats.summary(m, scenario)["mean"] for m in distributed}
        others = {m: v for m, v in others.items() if not math.isnan(v)}
        best = max(others, key=others.get) if others else None
        central = [m for m in grid.methods if stats.strategy.get(m) == "central" and grid.runs(m, scenario)]
        gap = x["mean"] - stats.summary(central[0], scenario)["mean"] if central else math.nan
        above = best is not None and x["mean"] > others[best]
        lines.append(f"- {scenario}: {me} {_fmt(x['mean'])}; best other distributed method "
                     f"{best or '-'} {_fmt(others.get(best, math.nan))} ({'above' if above else 'not above'}); "
                     f"{me} minus central {_fmt(gap)}.")
    return lines + [""]


def pilot_section(grid: Grid) -> list[str]:
    """What the pilot of deployed-round rules showed (``pilot.json``)."""
    record = _stored(grid, "pilot.json")
    if record is None:
        return []
    lines = ["## The deployed round: the pilot", "",
             f"Pilot seeds {record['pilot_seeds']} (never reported), scenarios {', '.join(record.get('scenarios', []))}, "
             "every method at its tuned settings, run for the whole budget. Each rule picks its round on one fixed, "
             "class-stratified half of every node's validation set (best_auc and best_loss with the study's "
             "patience; last: the round of best mean half-A AUC on the other pilot seeds) and is scored by the mean "
             "node AUC of the other half at that round; validation data only.", "",
             "| rule | mean node AUC on the other half | cells scored | mean round picked | cells picking round 1 |",
             "|---|---|---|---|---|"]
    for rule in record["rules"]:
        picked = [c[rule]["round"] for c in record.get("cells", []) if rule in c]
        lines.append(f"| {rule} | {_fmt(_nan(record['mean_val_auc_b'].get(rule)))} | "
                     f"{record['scored_cells'].get(rule, 0)} | {f'{np.mean(picked):.1f}' if picked else '-'} | "
                     f"{sum(r == 1 for r in picked)} |")
    lines += ["", f"Chosen, and applied to every method alike: **{record['chosen']}**."]
    if record.get("rounds_under_last"):
        rounds, budget = record["rounds_under_last"], grid.settings.get("federation.rounds")
        capped = [k for k, v in rounds.items() if v == budget]
        lines += ["Rounds per method and scenario under 'last' (best mean validation AUC over the pilot seeds): "
                  + ", ".join(f"{k} {v}" for k, v in rounds.items()) + "."
                  + (f" {len(capped)} of {len(rounds)} at the whole budget of {budget} rounds ({', '.join(capped)}): "
                     "their curve had not peaked within it." if capped else "")]
    return lines + [""]


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _cell_figure(rows: list[dict], metric: str) -> dict[tuple, tuple[float, int]]:
    """(method, scenario, step, seed) -> (mean over nodes of ``metric``, deployed round)."""
    groups = defaultdict(list)
    rounds = {}
    for r in rows:
        key = (r["method"], r["scenario"], r["step"], r["seed"])
        rounds[key] = int(r["best_round"])
        value = _nan(r.get(metric))
        if not math.isnan(value):
            groups[key].append(value)
    return {k: (float(np.mean(groups[k])) if groups[k] else math.nan, rounds[k]) for k in rounds}


def rerun_section(grid: Grid, rows: list[dict], reruns: list[dict], metric: str, seeds: set[int]) -> list[str]:
    """How far the thread-count rerun moved each cell's figures (every rerun cell whose first run
    finished), and whether a headline verdict changed (over the complete ``seeds``, as the verdicts)."""
    threads = grid.rerun.get("threads")
    lines = [f"## The same cells on {threads} threads", "",
             f"A sample of the reported cells ran again with {threads} CPU threads instead of the grid's, which "
             "changes float rounding as another CPU does. Per cell: the figure's difference (rerun minus "
             "first run) and whether the deployed round moved; then the headline verdicts recomputed with the "
             "rerun cells in place of the first ones.", "",
             "| figure | cells | mean difference | mean abs. difference | largest abs. difference | deployed round moved |",
             "|---|---|---|---|---|---|"]
    for name in ("pool_test_auc", "test_auc"):
        first, again = _cell_figure(rows, name), _cell_figure(reruns, name)
        keys = [k for k in again if k in first and not math.isnan(first[k][0]) and not math.isnan(again[k][0])]
        if not keys:
            continue
        gaps = [again[k][0] - first[k][0] for k in keys]
        moved = sum(again[k][1] != first[k][1] for k in keys)
        lines.append(f"| {name} | {len(keys)} | {np.mean(gaps):+.4f} | {np.mean(np.abs(gaps)):.4f} | "
                     f"{np.max(np.abs(gaps)):.4f} | {moved} of {len(keys)} |")
    rows, reruns = [r for r in rows if r["seed"] in seeds], [r for r in reruns if r["seed"] in seeds]
    replaced = {_key(r) for r in reruns}
    swapped = [r for r in rows if _key(r) not in replaced] + reruns
    before = comparisons(grid, Stats(rows, metric))
    after = comparisons(grid, Stats(swapped, metric))
    words = outcomes([d for _, _, d in before]), outcomes([d for _, _, d in after])
    changed = [f"{s} vs {ref}: {a} -> {b}" for (s, ref, _), a, b in zip(before, *words) if a != b]
    if not reruns:
        return lines + ["", "No rerun cell of a complete seed yet, so no verdict has been recomputed.", ""]
    lines += ["", f"Headline verdicts ({metric}, complete seeds, {len(replaced)} cells swapped) that "
              "change with the rerun cells in place: " + ("; ".join(changed) if changed else "none") + ".", ""]
    return lines


def plots(grid: Grid, rows: list[dict]) -> list[Path]:
    """Per-node AUC box plots per scenario; AUC against the sweep step for swept scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = Stats(rows)
    out = grid.out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    methods = [m for m in grid.methods if any(k[0] == m for k in stats.nodes)]
    for scenario in grid.scenarios:
        if scenario not in stats.steps:
            continue
        data = [[a for (m, s, _, _), aucs in stats.nodes.items() if m == method and s == scenario for a in aucs]
                for method in methods]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(methods) + 2), 4))
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right")
        ax.set_ylabel("node test AUC")
        ax.set_title(f"{scenario}: per-node test AUC (all seeds{', all steps' if grid.steps(scenario)[0][1] is not None else ''})")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files.append(out / f"{scenario}_nodes.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
        steps = [stats.steps[scenario][i] for i in sorted(stats.steps[scenario])]
        if len(steps) > 1:
            fig, ax = plt.subplots(figsize=(7, 4))
            n = len(methods)  # a colour per method (20 of them) and a marker shape to tell lines apart
            ax.set_prop_cycle(color=[plt.cm.tab20.colors[i % 20] for i in range(n)],
                              marker=[("o", "s", "^", "D")[i % 4] for i in range(n)])
            for method in methods:
                xs, ys, es = [], [], []
                for i, step in enumerate(steps):
                    x = stats.summary(method, scenario, step)
                    if x["seeds"]:
                        xs.append(i), ys.append(x["mean"]), es.append(x["mean_std"])
                if xs:
                    ys, es = np.asarray(ys), np.asarray(es)
                    ax.plot(xs, ys, label=method)
                    ax.fill_between(xs, ys - es, ys + es, alpha=0.1)
            ax.set_xticks(range(len(steps)), steps)
            ax.set_xlabel(grid.scenarios[scenario]["sweep"]["key"])
            ax.set_ylabel("mean node test AUC")
            ax.set_title(f"{scenario}: AUC along the gradient (mean ± std over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            files.append(out / f"{scenario}_gradient.png")
            fig.savefig(files[-1], dpi=120)
            plt.close(fig)
    return files


def log_to_wandb(grid: Grid, report: str, files: list[Path], mode: str) -> None:
    from hsl_lightning.federation.loggers import resolve_wandb_mode

    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return
    import wandb

    run = wandb.init(project="hsl_lightning", name=f"benchmark-{grid.out.name}", dir=str(grid.out),
                     mode=resolved, job_type="benchmark", reinit="finish_previous")
    run.log({f"plots/{f.stem}": wandb.Image(str(f)) for f in files})
    run.summary["report"] = report
    run.finish()


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


def _record_choices(grid: Grid) -> None:
    """``tuning.json`` and ``pilot.json`` from the finished cells when a stage has finished but its
    file is missing (a clone that holds the cells' records only), so the report shows the choices
    the grid's next run will make; a stage part done writes nothing (the report gives its progress)."""
    from hsl_lightning.benchmark.tuning import choose, choose_rule, rule_settings

    if not grid.tune or _finished(grid, grid.tuning_cells()) < len(grid.tuning_cells()):
        return
    chosen = choose(grid, write=not (grid.out / "tuning.json").is_file())
    pilot = grid.pilot_cells(chosen)
    if not grid.pilot or (grid.out / "pilot.json").is_file() or _finished(grid, pilot) < len(pilot):
        return
    rule = choose_rule(grid, chosen)
    every = grid.pilot_cells(chosen, every_scenario=True)
    if rule == "last" and _finished(grid, every) == len(every):
        rule_settings(grid, chosen, rule)


def write_report(grid: Grid, command: str = "", machine: str = "", wandb_mode: str = "disabled") -> dict:
    """results.csv, report.md and plots/ under the grid's ``out``; returns their paths. With no
    finished cell on disk but a results.csv (an older study kept without its runs), the report is
    written from that file, which is left as it is."""
    _record_choices(grid)
    rows = collect(grid)
    if not rows and (grid.out / "results.csv").is_file():
        rows = read_csv(grid.out / "results.csv")
    else:
        write_csv(rows, grid.out / "results.csv")
    reruns = collect(grid, grid.rerun_cells(grid.cells())) if grid.rerun else []
    if reruns:
        write_csv(reruns, grid.out / "reruns.csv")
    text = markdown(grid, rows, command, machine, reruns)
    (grid.out / "report.md").write_text(text)
    files = plots(grid, rows) if rows else []
    log_to_wandb(grid, text, files, wandb_mode)
    return {"csv": grid.out / "results.csv", "report": grid.out / "report.md", "plots": files, "rows": len(rows)}

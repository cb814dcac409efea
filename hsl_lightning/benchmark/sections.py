"""The sections of a benchmark report that describe the grid and its figures, each a list of Markdown
lines: how far the grid got stage by stage (``progress``), a figure per method and scenario
(``headline``, a method identical to an earlier one named once: ``coinciding``), convergence, cost,
the cells without a result, and the choices the grid made on validation data (``tuning_section``,
``pilot_section``); with the number formatting every table of the report uses (``_fmt``)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from hsl_lightning.benchmark.grid import Grid, result
from hsl_lightning.benchmark.results import _key, complete_seeds
from hsl_lightning.benchmark.stats import Stats, _nanfree

def _fmt(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def dataset(grid: Grid, scenario: str) -> str:
    """The data a scenario runs on: its own data config's name, else the grid's."""
    own = [c for c in grid.scenarios[scenario]["configs"] if "/data/" in c.replace("\\", "/")]
    return Path((own or grid.data or ["-"])[-1]).stem


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


#: the convergence rule: at most this share of a method's cells may end on a still rising curve
RULE_SHARE = 0.10


def convergence(grid: Grid, rows: list[dict]) -> list[str]:
    """Per method: how many cells deployed the last round of their budget (not shown converged)."""
    if rows and not all(r.get("rounds") not in (None, "") for r in rows):
        return ["## Convergence", "", "Not shown: this study's results.csv predates the columns 'rounds' and "
                "'rounds_run' (each cell's budget and the rounds it ran), and its runs are not kept to recover them.", ""]
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
    worst, over = 0.0, []
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
        share = rising / len(known) if fixed and known else last / len(mine)
        if share > RULE_SHARE:
            over.append(f"{method} ({100 * share:.0f} %)")
        lines.append(f"| {method} | {len(mine)} | {last} | {100 * last / len(mine):.0f} % | "
                     f"{whole} ({100 * whole / len(mine):.0f} %) | {first} | "
                     f"{np.mean([run for _, _, run in mine]):.1f} | {', '.join(map(str, budgets))} | "
                     + (f"{rising} of {len(known)} ({100 * rising / len(known):.0f} %)" if known else "-") + " |")
    lines += ["", f"Largest share of any method deploying the last round: {100 * worst:.0f} %"
              + (f" ({len(fixed)} of {len(cells)} cells deploy the last round by the rule 'last')." if fixed else ".")]
    check = "best validation AUC in the last round" if fixed else "deployed the last round"
    lines += ["", f"Above the study's rule of at most {100 * RULE_SHARE:.0f} % ({check}): "
              + (", ".join(over) + ": their figures may be short of convergence." if over else "none.")]
    return lines + [""]


def cost(grid: Grid, rows: list[dict]) -> list[str]:
    """Per method: a cell's mean wall time in each scenario (methods run different scenario mixes,
    so one mean over all of them would not compare) and what a node sends per round."""
    cells = {}
    for r in rows:
        cells[(r["method"], r["scenario"], r["step"], r["seed"])] = (_nan(r.get("wall_s")),
                                                                     _nan(r.get("bytes_per_round")))
    scenarios = [s for s in grid.scenarios if any(k[1] == s for k in cells)]
    lines = ["## Cost", "", "Mean wall time per cell (s) in each scenario, on the machines the cells ran on (cells ran "
             "side by side, so compare within this table only), and what each node sends per round.", "",
             "| method | " + " | ".join(scenarios) + " | MB sent per node per round |",
             "|---|" + "---|" * (len(scenarios) + 1)]
    for method in grid.methods:
        mine = {k: v for k, v in cells.items() if k[0] == method}
        if not mine:
            continue
        walls = []
        for scenario in scenarios:
            wall = _nanfree(w for k, (w, _) in mine.items() if k[1] == scenario)
            walls.append(f"{np.mean(wall):.0f}" if wall else "-")
        sent = _nanfree(b for _, b in mine.values())
        lines.append(f"| {method} | " + " | ".join(walls) + f" | {f'{np.mean(sent) / 1e6:.2f}' if sent else '-'} |")
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


def _stored(grid: Grid, name: str) -> dict | None:
    """A choice the grid recorded under its ``out`` (``tuning.json``, ``pilot.json``), or None."""
    file = grid.out / name
    return json.loads(file.read_text()) if file.is_file() else None


def _finished(grid: Grid, cells) -> int:
    return sum(result(grid.out, c) is not None for c in cells)


def _compute(tuning: list[dict | None], pilot: list[dict | None], rows: list[dict], reruns: list[dict]) -> str:
    """The hours the finished cells ran, stage by stage (their own wall times, summed); ``tuning`` and
    ``pilot``: those stages' results (None for a cell not finished)."""
    def stored(results) -> float:
        return sum(float((r or {}).get("wall_s") or 0.0) for r in results) / 3600

    def rowed(table) -> float:
        return sum(_nan(r.get("wall_s")) for r in {_key(r): r for r in table}.values()
                   if not math.isnan(_nan(r.get("wall_s")))) / 3600

    parts = {"tuning": stored(tuning), "pilot": stored(pilot), "reported": rowed(rows),
             "thread-count reruns": rowed(reruns)}
    return (f"- Compute: the finished cells' own wall times add up to {sum(parts.values()):.2f} h ("
            + ", ".join(f"{k} {v:.2f} h" for k, v in parts.items() if v or k == "reported")
            + "). Cells that ran side by side each count in full, so the machine's time is about this sum over the "
              "number of cells run at a time (one thread each, a rerun cell its own thread count).")


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
    # each tuning and pilot cell's result, read once (the counts and the compute line both use them)
    tuned = {c.key: result(grid.out, c) for c in grid.tuning_cells()} if grid.tune else {}
    pilot_results = {c.key: result(grid.out, c) for c in grid.pilot_cells(every_scenario=True)} if grid.pilot else {}
    if grid.tune:
        tuning = grid.tuning_cells()
        by_data = defaultdict(lambda: [0, 0])
        for c in tuning:
            by_data[dataset(grid, c.scenario)][0] += tuned[c.key] is not None
            by_data[dataset(grid, c.scenario)][1] += 1
        finished = sum(v[0] for v in by_data.values())
        lines.append(f"- Tuning (seeds {grid.tune.get('seeds')}, not reported): {finished} of {len(tuning)} cells ("
                     + ", ".join(f"{name} {a} of {b}" for name, (a, b) in by_data.items()) + "); settings "
                     + ("chosen (below)." if (grid.out / "tuning.json").is_file() and finished == len(tuning)
                        else "not chosen yet: the reported cells wait for them."))
    if grid.pilot:
        pilot = grid.pilot_cells()
        chosen = (_stored(grid, "pilot.json") or {}).get("chosen")
        others = grid.pilot_cells_elsewhere()
        def finished(cells) -> int:
            return sum(pilot_results[c.key] is not None for c in cells)

        lines.append(f"- Pilot of the deployed-round rules (seeds {grid.pilot.get('seeds')}, not reported): "
                     f"{finished(pilot)} of {len(pilot)} cells; "
                     + (f"rule chosen: {chosen} (below)" if chosen else
                        "no rule chosen yet: the reported cells wait for it")
                     + (f"; under 'last', {finished(others)} of {len(others)} more cells set the other "
                        "scenarios' numbers of rounds." if chosen == "last" and others else "."))
    started = [s for s in grid.seeds if 0 < per_seed[s] < size[s]]
    lines.append(f"- Reported cells: {len(done)} of {len(reported)}. Seeds complete (every reported cell finished): "
                 + (f"{len(complete)} of {len(grid.seeds)} ({', '.join(map(str, complete))})" if complete else
                    f"none of {len(grid.seeds)}") + "; part done: "
                 + (", ".join(f"seed {s} ({per_seed[s]} of {size[s]} cells)" for s in started) or "none") + ".")
    if grid.rerun:
        sample = grid.rerun_cells(reported)
        lines.append(f"- Thread-count reruns: {len({_key(r) for r in reruns})} of {len(sample)} cells.")
    lines.append(_compute(list(tuned.values()), list(pilot_results.values()), rows, reruns))
    if not complete:
        lines += ["", "No seed is complete, so this report draws no verdict: the verdict tables below stay empty "
                  "until a whole seed has run (the figures above it, if any, are from unfinished seeds)."]
    elif started or len(complete) < len({r["seed"] for r in rows}):
        lines += ["", f"Figures and verdicts use the complete seeds only ({', '.join(map(str, complete))}); the "
                  "finished cells of the seeds that are part done are kept for the next report but enter neither."]
    else:
        lines += ["", f"Figures and verdicts use the complete seeds ({', '.join(map(str, complete))})."]
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
    chosen, cells = record["chosen"], record.get("cells", [])
    for rule in record["rules"]:
        pairs = [c[chosen]["val_auc_b"] - c[rule]["val_auc_b"] for c in cells if chosen in c and rule in c
                 and not math.isnan(_nan(c[chosen]["val_auc_b"])) and not math.isnan(_nan(c[rule]["val_auc_b"]))]
        if rule == chosen or len(pairs) < 2:
            continue
        mean, std = float(np.mean(pairs)), float(np.std(pairs, ddof=1))
        lines.append(f"{chosen} minus {rule}, paired by cell: {mean:+.4f} ± {std:.3f} (std over {len(pairs)} cells; "
                     f"95 % interval of the mean ± {1.96 * std / math.sqrt(len(pairs)):.4f}).")
    if record.get("rounds_under_last"):
        rounds, budget = record["rounds_under_last"], grid.settings.get("federation.rounds")
        capped = [k for k, v in rounds.items() if v == budget]
        single = [k for k, v in rounds.items() if v == 1]
        lines += ["Rounds per method and scenario under 'last' (best mean validation AUC over the pilot seeds): "
                  + ", ".join(f"{k} {v}" for k, v in rounds.items()) + "."
                  + (f" {len(capped)} of {len(rounds)} at the whole budget of {budget} rounds ({', '.join(capped)}): "
                     "their curve had not peaked within it." if capped else "")
                  + (f" {len(single)} of {len(rounds)} train for a single round ({', '.join(single)}): their "
                     "validation curve over the pilot seeds was best at round 1, so their cells deploy a model "
                     "trained for one round; read their figures as that." if single else "")]
    return lines + [""]

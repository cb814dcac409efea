"""What a benchmark grid measured: a long CSV, a Markdown report and plots.

Statistics, for one method, scenario and sweep step: per seed, the mean of the nodes' test AUCs,
the worst node's AUC and the standard deviation across nodes (the paper's "stability"); then the
mean and standard deviation of each over seeds. A scenario's figure averages its sweep steps
within each seed first. Nodes whose test AUC is undefined (one class) are left out, and counted.

Verdicts (``compare`` in the grid): the per-seed difference of scenario means between the compared
method and each reference, with a 95 % t-interval over seeds: "wins" when the interval lies above
zero, "loses" when below, "ties" otherwise (and "n/a" with one seed). As a table holds many such
comparisons, each also gets its t-test p-value and a verdict after Holm's correction over the
table (family-wise error 5 %), which needs SciPy (the ``analysis`` extra).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from hsl_lightning.benchmark.grid import Grid, result

#: strategies that are not distributed training methods (bounds and the frozen-encoder baseline)
NOT_DISTRIBUTED = {"local", "central", "foundation"}
# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}

COLUMNS = ["method", "strategy", "scenario", "step", "step_index", "seed", "node", "n_train", "n_val", "n_test",
           "val_auc", "test_auc", "best_round", "rounds", "rounds_run", "external_auc", "wall_s", "bytes_per_round",
           "pool_test_auc", "n_pool_test", "deploy_round"]


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
                         "deploy_round": summary.get("deploy_round", "best_auc")})
    return rows


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
            auc = r[metric]
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


def verdict(diffs: list[float]) -> tuple[str, float, float, float]:
    """(verdict, mean difference, std over seeds, 95 % half-width)."""
    if not diffs:
        return "n/a", math.nan, math.nan, math.nan
    mean, std = _mean_std(diffs)
    if len(diffs) < 2:
        return "n/a", mean, std, math.nan
    df = len(diffs) - 1
    t = T95.get(df) or T95[max(k for k in T95 if k <= df)]
    half = t * std / math.sqrt(len(diffs))
    word = "wins" if mean - half > 0 else "loses" if mean + half < 0 else "ties"
    return word, mean, std, half


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
    cells = {}
    for r in rows:
        cells[(r["method"], r["scenario"], r["step"], r["seed"])] = (int(r["best_round"]), int(r["rounds"]),
                                                                     int(r["rounds_run"]))
    lines = ["## Convergence", "",
             "A cell that deploys the last round of its budget may have stopped improving only because the budget "
             "ran out; the study's rule is at most 10 % of any method's cells. Early stopping ends a cell once its "
             "patience has passed since the round of best mean node validation AUC. A cell whose best round is "
             "the first never improved on it: stopped early, but not trained to convergence either.", "",
             "A cell that ran its whole budget without early stopping ('ran the whole budget') was still improving "
             "within its patience when the budget ended, even if its deployed round is earlier.", "",
             "| method | cells | deployed the last round | share | ran the whole budget | best round 1 | mean rounds run "
             "| budget (rounds) |", "|---|---|---|---|---|---|---|---|"]
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
        lines.append(f"| {method} | {len(mine)} | {last} | {100 * last / len(mine):.0f} % | "
                     f"{whole} ({100 * whole / len(mine):.0f} %) | {first} | "
                     f"{np.mean([run for _, _, run in mine]):.1f} | {', '.join(map(str, budgets))} |")
    lines += ["", f"Largest share of any method: {100 * worst:.0f} %.", ""]
    return lines


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
    file = grid.out / "tuning.json"
    if not file.is_file():
        return []
    record = json.loads(file.read_text())
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


def markdown(grid: Grid, rows: list[dict], command: str = "", machine: str = "") -> str:
    stats = Stats(rows)
    done = {(r["method"], r["scenario"], r["step"], r["seed"]) for r in rows}
    total = len(grid.cells())
    parts = [f"# Benchmark: {grid.source.stem if grid.source else grid.out.name}", ""]
    if grid.description:
        parts += [grid.description.strip(), ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    if machine:
        parts += [f"Machine: {machine}", ""]
    parts += [f"Cells finished: {len(done)} of {total}; seeds {grid.seeds}. Figures: mean node test AUC, "
              "mean ± std over seeds (sweeps averaged over their steps within each seed); a method's figure uses "
              "the seeds for which all its cells of the scenario finished (the per-scenario tables give the count).", ""]
    same = coinciding(grid, stats)
    parts += ["## Mean node test AUC", "", headline(grid, stats, same), ""]
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
    parts += ["## Mean node validation AUC", "",
              "At the deployed round (chosen by it, so optimistic, alike for every method): the figure to choose "
              "variants and settings by, leaving the test sets out of every choice.", "",
              headline(grid, Stats(rows, "val_auc"), same), ""]
    parts += convergence(grid, rows) + cost(grid, rows) if rows else []
    parts += unfinished(grid)
    parts += tuning_section(grid)
    if grid.compare:
        parts += _verdicts(grid, stats)
        if scored_external:
            parts += _verdicts(grid, external, "unseen site AUC")
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


def _verdicts(grid: Grid, stats: Stats, what: str = "mean node AUC") -> list[str]:
    me, against = grid.compare["method"], grid.compare.get("against", [])
    lines = [f"## {me} against the references: {what}", "",
             f"Per-seed difference of the scenario's {what} ({me} minus reference), mean ± std over seeds, "
             "95 % t-interval half-width; verdict by whether the interval excludes zero; then the paired t-test's "
             "p-value and the verdict after Holm's correction over every row of this table.", "",
             "| scenario | reference | difference | ± 95 % | verdict | p | after Holm |", "|---|---|---|---|---|---|---|"]
    rows = []
    for scenario in grid.scenarios:
        mine = stats.per_seed(me, scenario)
        for ref in against:
            theirs = stats.per_seed(ref, scenario)
            diffs = [mine[s]["mean"] - theirs[s]["mean"] for s in sorted(set(mine) & set(theirs))]
            rows.append((scenario, ref, diffs, *verdict(diffs)))
    held = holm([p_value(r[2]) for r in rows])
    matrix = {}
    for (scenario, ref, diffs, word, mean, std, half), (p, after) in zip(rows, held):
        final = "n/a" if word == "n/a" else ("wins" if mean > 0 else "loses") if after else "ties"
        lines.append(f"| {scenario} | {ref} | {_fmt(mean, std)} | {_fmt(half)} | {word} | "
                     f"{'-' if math.isnan(p) else f'{p:.3g}'} | {final} |")
        matrix[(ref, scenario)] = "-" if math.isnan(mean) else f"{mean:+.3f} {final}"
    scenarios = list(grid.scenarios)
    lines += ["", f"In short ({me} minus reference, mean over seeds, and the verdict after Holm's correction):", "",
              "| reference | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    lines += [f"| {ref} | " + " | ".join(matrix[(ref, s)] for s in scenarios) + " |" for ref in against]
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
        central = [m for m in grid.methods if stats.strategy.get(m) == "central"]
        gap = x["mean"] - stats.summary(central[0], scenario)["mean"] if central else math.nan
        above = best is not None and x["mean"] > others[best]
        lines.append(f"- {scenario}: {me} {_fmt(x['mean'])}; best other distributed method "
                     f"{best or '-'} {_fmt(others.get(best, math.nan))} ({'above' if above else 'not above'}); "
                     f"{me} minus central {_fmt(gap)}.")
    return lines + [""]


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


def write_report(grid: Grid, command: str = "", machine: str = "", wandb_mode: str = "disabled") -> dict:
    """results.csv, report.md and plots/ under the grid's ``out``; returns their paths."""
    rows = collect(grid)
    write_csv(rows, grid.out / "results.csv")
    text = markdown(grid, rows, command, machine)
    (grid.out / "report.md").write_text(text)
    files = plots(grid, rows) if rows else []
    log_to_wandb(grid, text, files, wandb_mode)
    return {"csv": grid.out / "results.csv", "report": grid.out / "report.md", "plots": files, "rows": len(rows)}

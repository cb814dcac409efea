"""What a benchmark grid measured: a long CSV, a Markdown report and plots (``write_report``).

The report is put together here (``markdown``) from its parts: the results table
(:mod:`~hsl_lightning.benchmark.results`), the statistics and tests
(:mod:`~hsl_lightning.benchmark.stats`), the sections on the grid and its figures
(:mod:`~hsl_lightning.benchmark.sections`), the verdicts (:mod:`~hsl_lightning.benchmark.verdicts`)
and the plots (:mod:`~hsl_lightning.benchmark.plots`). The names those modules held here before
are imported here too, so ``hsl_lightning.benchmark.report`` still gives them.

Two test figures: each node's test AUC on its own test set, and the pool figure (its deployed
model on the whole test pool seen through its scanner, ``pool_test_auc``), which has the same
expectation from several times the images; the headline uses the pool figure when the cells
have it (older studies do not: their headline is the node test figure).

A grid stopped part way: the report opens with how far it got (tuning, pilot, reported cells, and
which seeds are complete, i.e. every reported cell of the seed finished), and the verdicts use the
complete seeds only, so no verdict rests on a seed some of whose cells are missing; with no
complete seed there is no verdict. The figures use the complete seeds too (before any seed is
complete, every finished cell, with seed counts), so a table and a verdict never disagree.
The convergence table gives the share of cells whose round of best validation AUC is the last they
ran (under ``deploy_round: last``, where every cell deploys its last round, the check that the
fixed number was not too few).
"""

from __future__ import annotations

from pathlib import Path

from hsl_lightning.benchmark.grid import Grid
from hsl_lightning.benchmark.plots import plots
from hsl_lightning.benchmark.results import COLUMNS, _key, collect, complete_seeds, read_csv, write_csv
from hsl_lightning.benchmark.sections import (_finished, _fmt, coinciding, convergence, cost, dataset, edges, headline,
                                              pilot_section, progress, tuning_section, unfinished)
from hsl_lightning.benchmark.stats import (ALPHA, MARGIN, POWER, Stats, detectable, holm, interval, outcomes, p_value,
                                           seeds_needed, tost_p)
from hsl_lightning.benchmark.verdicts import NOT_DISTRIBUTED, comparisons, rerun_section, verdict_section

#: what this module gives: its own names and those of the modules it was split into
__all__ = ["write_report", "markdown", "log_to_wandb", "plots", "COLUMNS", "collect", "complete_seeds", "read_csv",
           "write_csv", "coinciding", "convergence", "cost", "dataset", "edges", "headline", "pilot_section",
           "progress", "tuning_section", "unfinished", "ALPHA", "MARGIN", "POWER", "Stats", "detectable", "holm",
           "interval", "outcomes", "p_value", "seeds_needed", "tost_p", "NOT_DISTRIBUTED", "comparisons",
           "rerun_section", "verdict_section"]


def markdown(grid: Grid, rows: list[dict], command: str = "", machine: str = "",
             reruns: list[dict] | None = None) -> str:
    """The report; ``reruns``: the rows of the thread-count rerun cells (see ``Grid.rerun_cells``)."""
    done = {(r["method"], r["scenario"], r["step"], r["seed"]) for r in rows}
    total = len(grid.cells())
    complete = set(complete_seeds(grid, rows))
    whole = [r for r in rows if r["seed"] in complete]  # the rows every figure and verdict uses
    cpus = sorted({str(r["cpu"]) for r in rows if r.get("cpu")})
    unrecorded = len({_key(r) for r in rows if not r.get("cpu")})
    every = rows
    rows = whole or rows  # before any seed is complete, the figures show the finished cells
    stats = Stats(rows)
    pool = Stats(rows, "pool_test_auc")
    has_pool = any(pool.nodes.values())
    parts = [f"# Benchmark: {grid.source.stem if grid.source else grid.out.name}", ""]
    if grid.description:
        parts += [grid.description.strip(), ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    if machine:
        parts += [f"Report written on: {machine}", ""]
    if every:
        parts += ["Cells ran on: " + ("; ".join(cpus) if cpus else "not recorded")
                  + (f" ({unrecorded} cells from before record.json kept the CPU: not recorded)" if cpus and unrecorded
                     else "") + ".", ""]
    parts += [f"Cells finished: {len(done)} of {total}; seeds {grid.seeds}. Figures: mean over nodes, "
              "mean ± std over seeds (sweeps averaged over their steps within each seed), over the complete seeds "
              "only, as the verdicts (before any seed is complete: over the finished cells).", ""]
    parts += progress(grid, every, reruns or [])
    same = coinciding(grid, stats)
    if not rows:
        parts += ["No reported cell has finished yet, so there are no figures and no verdicts.", ""]
    elif has_pool:
        parts += ["## Mean pool test AUC (the headline figure)", "",
                  "Every node's deployed model scored on the whole test pool of its source (every node's test "
                  "images, before any scanner) seen through the node's own scanner: the same expectation as the "
                  "node's own test AUC (same scanner, same class-conditional images; the positive rate does not "
                  "move an AUC's expectation), from more images (every node's test images: with k nodes about k "
                  "times a node's own when the nodes' test sets are alike in size), so a lower-variance figure. "
                  "The headline verdicts use it.", "", headline(grid, pool, same), ""]
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
        fixed = all(r.get("deploy_round") == "last" for r in rows)
        parts += ["## Mean node validation AUC", "",
                  ("At the deployed round (the last of each cell's fixed number of rounds, under the rule 'last')"
                   if fixed else "At the deployed round (chosen by it under the rule best_auc, so then optimistic, "
                   "alike for every method)") + ": the figure to choose variants and settings by, leaving the test "
                  "sets out of every choice.", "", headline(grid, Stats(rows, "val_auc"), same), ""]
        parts += convergence(grid, rows) + cost(grid, rows)
    parts += unfinished(grid)
    parts += tuning_section(grid)
    parts += pilot_section(grid)
    if grid.compare and complete:
        if has_pool:
            parts += verdict_section(grid, Stats(whole, "pool_test_auc"), "pool test AUC", headline=True)
        parts += verdict_section(grid, Stats(whole), "mean node test AUC", headline=not has_pool)
        if scored_external:
            parts += verdict_section(grid, Stats(whole, "external_auc"), "unseen site AUC")
        if reruns:
            parts += rerun_section(grid, every, reruns, "pool_test_auc" if has_pool else "test_auc", complete)
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


def log_to_wandb(grid: Grid, report: str, files: list[Path], mode: str) -> None:
    """Log the report's text (run summary ``report``) and its plots (``plots/<name>``) to a W&B run
    named after the grid's out folder; ``mode``: online, offline, disabled (nothing logged) or auto
    (online when logged in, else offline; see ``resolve_wandb_mode``)."""
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

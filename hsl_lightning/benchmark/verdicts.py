"""The verdicts of a benchmark report (``compare`` in the grid), and the thread-count rerun's check of them.

The per-seed difference of scenario means between the compared method and each reference (paired
by seed), with a 95 % t-interval over seeds, and one of four outcomes, each test corrected by Holm
over every row of its table (family-wise error 5 %): "better" or "worse" (the paired t-test of no
difference rejects; marked "within ±margin" when equivalence is shown as well), "equivalent"
(within :data:`~hsl_lightning.benchmark.stats.MARGIN` AUC: both one-sided tests of TOST reject a
difference of at least the margin), or "undetermined" (neither:
the seeds cannot tell); "n/a" with fewer than two seeds. Each row also gives the minimum detectable
difference: the true difference the paired t-test finds with 80 % power (two-sided) with the seeds
run and the spread observed, at alpha 0.05 for one test and at alpha 0.05 / rows (Holm's strictest
step).

The thread-count rerun section gives how far each rerun cell's figures moved and which headline
verdicts (complete seeds) change with the rerun cells swapped in.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from hsl_lightning.benchmark.grid import Grid
from hsl_lightning.benchmark.results import _key
from hsl_lightning.benchmark.sections import _fmt, _nan, dataset
from hsl_lightning.benchmark.stats import (ALPHA, MARGIN, POWER, Stats, detectable, interval, outcomes, p_value,
                                           seeds_needed, tost_p)

#: strategies that are not distributed training methods (bounds and the frozen-encoder baseline)
NOT_DISTRIBUTED = {"local", "central", "foundation"}


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


def verdict_section(grid: Grid, stats: Stats, what: str = "mean node test AUC", headline: bool = False) -> list[str]:
    """The compared method against each reference on ``what`` (a figure's name): the table of
    differences and verdicts, a matrix of them, the seeds a smaller detectable difference would
    need, and the gap to the best other distributed method and to central."""
    me, against = grid.compare["method"], grid.compare.get("against", [])
    rows = comparisons(grid, stats)
    words = outcomes([d for _, _, d in rows])
    family = sum(len(d) >= 2 for _, _, d in rows)  # the rows Holm corrects over
    strict = ALPHA / max(1, family)  # Holm's first, strictest step (Bonferroni's level)
    title = f"## {me} against the references: {what}" + (" (headline)" if headline else "")
    lines = [title, "",
             f"Per-seed difference of the scenario's {what} ({me} minus reference, paired by seed), mean ± std over "
             f"seeds and 95 % t-interval half-width; the p-values of the paired t-test of no difference and of "
             f"equivalence within {MARGIN} AUC (TOST: two one-sided tests, each at the level, i.e. a 90 % interval "
             f"inside ±{MARGIN}); and the verdict, each test corrected by Holm over the {family} rows of this table "
             "(every scenario and reference in it; the difference tests and the equivalence tests are corrected "
             "apart): better or worse (a difference shown; marked 'within ±"
             f"{MARGIN}' when equivalence is shown too), equivalent (within ±{MARGIN}), or undetermined (the seeds "
             "cannot tell either). The minimum detectable difference (MDD: the true difference a two-sided paired "
             f"t-test finds with {POWER:.0%} power, with these seeds and this spread) is given at alpha {ALPHA} for "
             f"one test, and corrected: at alpha {ALPHA}/{family}, the level of Holm's first and strictest step, "
             "so a difference that large is found with that power even there; Holm's later steps test at looser "
             "levels, so the two MDDs bracket what the table can detect.", "",
             "| scenario | reference | seeds | difference | ± 95 % | MDD (one test) | MDD (corrected) | p (difference) "
             "| p (equivalence) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    matrix = {}
    for (scenario, ref, diffs), word in zip(rows, words):
        mean, std, half = interval(diffs)
        mdd, mdd_c = detectable(std, len(diffs)), detectable(std, len(diffs), alpha=strict)
        p, q = p_value(diffs), tost_p(diffs)
        lines.append(f"| {scenario} | {ref} | {len(diffs)} | {_fmt(mean, std)} | {_fmt(half)} | {_fmt(mdd)} | "
                     f"{_fmt(mdd_c)} | {'-' if math.isnan(p) else f'{p:.3g}'} | "
                     f"{'-' if math.isnan(q) else f'{q:.3g}'} | {word} |")
        matrix[(ref, scenario)] = ("-" if math.isnan(mean) else
                                   f"{mean:+.3f} {word} (MDD {_fmt(mdd)}, corrected {_fmt(mdd_c)})")
    scenarios = [s for s in grid.scenarios if any(r[0] == s for r in rows)]
    lines += ["", f"In short ({me} minus reference, mean over seeds, the verdict, and the minimum detectable "
              "difference for one test and corrected):", "", "| reference | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    lines += [f"| {ref} | " + " | ".join(matrix.get((ref, s), "not run") for s in scenarios) + " |" for ref in against]
    by_data = defaultdict(lambda: defaultdict(int))
    for (scenario, _, _), word in zip(rows, words):
        by_data[dataset(grid, scenario)][word] += 1
    lines += ["", "Verdicts per dataset: " + "; ".join(
        f"{name}: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items())) for name, counts in by_data.items())
        + ".", ""]
    lines += ["Seeds the spread observed here would need for a minimum detectable difference of 0.02 and 0.03, for "
              f"one test and corrected (alpha {ALPHA}/{family}; a planning figure: the spread itself is estimated "
              "from these seeds; '-': more than 1000):", "",
              "| scenario | reference | std of the difference | seeds run | MDD (one test) | seeds for 0.02 | "
              "seeds for 0.03 | MDD (corrected) | seeds for 0.02 (corrected) | seeds for 0.03 (corrected) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, ref, diffs in rows:
        _, std, _ = interval(diffs)
        need = [seeds_needed(std, t) for t in (0.02, 0.03)]
        need_c = [seeds_needed(std, t, alpha=strict) for t in (0.02, 0.03)]
        lines.append(f"| {scenario} | {ref} | {_fmt(std)} | {len(diffs)} | {_fmt(detectable(std, len(diffs)))} | "
                     + " | ".join("-" if n is None else str(n) for n in need)
                     + f" | {_fmt(detectable(std, len(diffs), alpha=strict))} | "
                     + " | ".join("-" if n is None else str(n) for n in need_c) + " |")
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
        ahead = x["mean"] - others[best] if best is not None else math.nan
        lines.append(f"- {scenario}: {me} {_fmt(x['mean'])}; best other distributed method "
                     f"{best or '-'} {_fmt(others.get(best, math.nan))} ({me} minus it {_fmt(ahead)}); "
                     f"{me} minus central {_fmt(gap)}.")
    lines += ["", "These gaps are means over seeds, not tested; the verdicts above are the tests."]
    return lines + [""]


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

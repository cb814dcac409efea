"""The statistics of a benchmark report.

Per method, scenario and sweep step (:class:`Stats`): per seed, the mean of the nodes' test AUCs,
the worst node's AUC and the standard deviation across nodes (the paper's "stability"); then the
mean and standard deviation of each over seeds. A scenario's figure averages its sweep steps
within each seed first. Nodes whose test AUC is undefined (one class) are left out, and counted.

The tests behind a verdict, on the per-seed paired differences of two methods: the 95 %
t-interval (``interval``), the paired t-test of no difference (``p_value``), the two one-sided
tests of equivalence within :data:`MARGIN` AUC (``tost_p``), Holm's correction over the rows of a
table (``holm``), the four outcomes they give (``outcomes``), and the minimum detectable
difference at :data:`POWER` and level :data:`ALPHA` (``detectable``, ``seeds_needed``). The tests
need SciPy (the ``analysis`` extra).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}
#: the equivalence margin of the verdicts (AUC): within it, two methods count as equivalent
MARGIN = 0.02
#: the power and (two-sided) level of the minimum detectable difference
POWER, ALPHA = 0.8, 0.05


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


def seeds_needed(std: float, target: float, limit: int = 1000, alpha: float = ALPHA) -> int | None:
    """The fewest seeds whose minimum detectable difference (at level ``alpha``) is at most ``target``
    (None past ``limit``)."""
    if math.isnan(std):
        return None
    if std == 0:
        return 2
    if detectable(std, limit, alpha=alpha) > target:
        return None
    low, high = 2, limit  # the MDD falls as seeds are added: the first n at or below target, by bisection
    while low < high:
        middle = (low + high) // 2
        if detectable(std, middle, alpha=alpha) <= target:
            high = middle
        else:
            low = middle + 1
    return low


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
    Holm over the table's rows. When both reject (a difference shown, and shown to lie within the
    margin) the verdict is the difference, marked "(within ±margin)"."""
    different = holm([p_value(d) for d in diffs])
    equivalent = holm([tost_p(d, margin) for d in diffs])
    out = []
    for d, (_, diff), (_, eq) in zip(diffs, different, equivalent):
        if len(d) < 2:
            out.append("n/a")
        elif diff:  # a difference shown; also inside the margin when both tests reject
            out.append(("better" if np.mean(d) > 0 else "worse") + (f" (within ±{margin})" if eq else ""))
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

"""The plots of a benchmark report, under ``plots/`` in the grid's ``out``: per scenario, a box plot
of every node's test AUC per method, and for a swept scenario the mean node test AUC along the
sweep (mean ± std over seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsl_lightning.benchmark.grid import Grid
from hsl_lightning.benchmark.stats import Stats

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

"""Scoring a binary classifier: per-node metrics, the federation-wide summary, a model's
predictions over a loader and the threshold chosen on validation data.

Every node is scored on its own data with torchmetrics (AUROC, accuracy, sensitivity,
specificity). A node whose labels hold a single class has no defined AUC: it is reported as
NaN with the reason, and summaries skip it rather than crash or count it as 0.5.

This module imports no other part of the package: the round loop (``federation``), a deployment
(``flower``) and the use of a trained model (``inference``) all score with it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryRecall, BinarySpecificity


class NodeMetrics:
    """Accumulates one node's predictions for one split; ``compute`` returns plain floats."""

    def __init__(self, threshold: float = 0.5):
        # Each rank scores its own nodes: torchmetrics must not sync states across ranks.
        local = dict(sync_on_compute=False)
        self.collection = MetricCollection({
            "auc": BinaryAUROC(**local),
            "acc": BinaryAccuracy(threshold=threshold, **local),
            "sensitivity": BinaryRecall(threshold=threshold, **local),
            "specificity": BinarySpecificity(threshold=threshold, **local),
        })
        self.n_pos = 0
        self.n_neg = 0
        self.n_not_finite = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.detach().float().cpu(), target.detach().long().cpu()
        self.collection.update(torch.sigmoid(logits), target)
        self.n_pos += int(target.sum())
        self.n_neg += int(target.numel() - target.sum())
        self.n_not_finite += int((~torch.isfinite(logits)).sum())

    def compute(self) -> dict[str, float | str]:
        if self.n_pos + self.n_neg == 0:
            return {"auc": math.nan, "acc": math.nan, "sensitivity": math.nan, "specificity": math.nan,
                    "auc_undefined": "no samples"}
        with warnings.catch_warnings():
            # torchmetrics warns about a missing class; we report that below, with the reason.
            warnings.simplefilter("ignore", UserWarning)
            values = {k: float(v) for k, v in self.collection.compute().items()}
        if self.n_pos == 0 or self.n_neg == 0:
            values["auc"] = math.nan
            values["auc_undefined"] = f"only one class present ({self.n_pos} positive, {self.n_neg} negative)"
            if self.n_pos == 0:
                values["sensitivity"] = math.nan
            else:
                values["specificity"] = math.nan
        if self.n_not_finite:  # NaN scores sort in an arbitrary order: any AUC of them would be an artefact
            values = {k: math.nan for k in values}
            values["auc_undefined"] = (f"the model's outputs are not finite for {self.n_not_finite} of "
                                       f"{self.n_pos + self.n_neg} images")
        return values

    def reset(self) -> None:
        self.collection.reset()
        self.n_pos = self.n_neg = self.n_not_finite = 0


def summarize(aucs: Sequence[float]) -> dict[str, float]:
    """Mean, (population) standard deviation and minimum over the nodes whose AUC is defined."""
    defined = [a for a in aucs if not math.isnan(a)]
    if not defined:
        return {"mean": math.nan, "std": math.nan, "min": math.nan}
    mean = sum(defined) / len(defined)
    std = math.sqrt(sum((a - mean) ** 2 for a in defined) / len(defined))
    return {"mean": mean, "std": std, "min": min(defined)}


#: probability cuts tried when choosing the threshold (resolution 0.001)
GRID = torch.linspace(0, 1, 1001, dtype=torch.float64)


@torch.no_grad()
def predictions(module, loader, fabric=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s logits over an evaluation ``loader`` and the targets, on the CPU, in eval mode
    (``fabric``: the device and autocast of a run; None for a module on the CPU, as ``hsl test``)."""
    module.eval()
    logits, targets = [], []
    for i, batch in enumerate(loader):
        if fabric is not None:
            batch = fabric.to_device(batch)
        with fabric.autocast() if fabric is not None else contextlib.nullcontext():
            out = module.validation_step(batch, i)
        logits.append(out["logits"].float().cpu())
        targets.append(out["target"].cpu())
    if not logits:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def counts(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Positives and negatives at or above each cut of :data:`GRID`, then the class totals: one row
    (2 * len(GRID) + 2,) that adds up over nodes, so thresholds can pool nodes hosted on any rank."""
    probs, target = probs.double().cpu(), target.long().cpu()
    above = probs[:, None] >= GRID[None, :]
    pos, neg = target == 1, target == 0
    return torch.cat([above[pos].sum(0).double(), above[neg].sum(0).double(),
                      torch.tensor([pos.sum(), neg.sum()], dtype=torch.float64)])


def youden(row: torch.Tensor) -> float:
    """The cut of best sensitivity + specificity - 1 (Youden's J) for one :func:`counts` row (summed
    rows pool nodes); among equally good cuts the middle one; 0.5 when a class is missing."""
    k = len(GRID)
    pos_above, neg_above, (n_pos, n_neg) = row[:k], row[k: 2 * k], row[2 * k:].tolist()
    if n_pos == 0 or n_neg == 0:
        return 0.5
    j = pos_above / n_pos - neg_above / n_neg
    best = torch.nonzero(j >= j.max() - 1e-12).flatten()
    return float(GRID[best[len(best) // 2]])

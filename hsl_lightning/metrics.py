"""Per-node binary classification metrics and the federation-wide summary.

Every institution is scored on its own data with torchmetrics (AUROC, accuracy, sensitivity,
specificity). A node whose labels hold a single class has no defined AUC: it is reported as
NaN with the reason, and summaries skip it rather than crash or count it as 0.5.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryRecall, BinarySpecificity


class NodeMetrics:
    """Accumulates one node's predictions for one split; ``compute`` returns plain floats."""

    def __init__(self, threshold: float = 0.5):
        # Each rank scores its own institutions: torchmetrics must not sync states across ranks.
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

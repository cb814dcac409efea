"""Scoring: each node's metrics with the model it deploys, gathered on every rank."""

from __future__ import annotations

import contextlib
import math

import torch

from hsl_lightning.deploy.checkpoints import GRID, counts
from hsl_lightning.federation.randomness import adopt
from hsl_lightning.metrics import NodeMetrics, summarize

METRICS = ("auc", "acc", "sensitivity", "specificity")


@torch.no_grad()
def predictions(module, loader, fabric=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s logits over an evaluation ``loader`` and the targets, on the CPU, in eval mode
    (``fabric``: the device and autocast of a run; None for a module on the CPU, as ``hsl test``)."""
    module.eval()
    logits, targets = [], []
    for i, batch in enumerate(adopt(loader)):
        if fabric is not None:
            batch = fabric.to_device(batch)
        with fabric.autocast() if fabric is not None else contextlib.nullcontext():
            out = module.validation_step(batch, i)
        logits.append(out["logits"].float().cpu())
        targets.append(out["target"].cpu())
    if not logits:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def evaluate(fabric, module, dm, node: int, split: str) -> dict:
    """``module``'s metrics on one node's ``split`` (``val``, ``test``, or ``external``: the data
    module's external site, its images tagged as this node's)."""
    loader = dm.external_loader(node) if split == "external" else dm.eval_loader(node, split)
    logits, target = predictions(module, loader, fabric)
    metrics = NodeMetrics()
    if len(target):
        metrics.update(logits, target)
    return metrics.compute()


def threshold_counts(run, trainees: dict, merged: torch.Tensor) -> torch.Tensor:
    """Per node, with the model it deploys, its validation images at or above every probability cut
    (:func:`hsl_lightning.deploy.checkpoints.counts`), the same on every rank: rows add up, so a
    threshold can pool any nodes."""
    rows = torch.zeros(len(run.owner), 2 * len(GRID) + 2, dtype=torch.float64)

    def node_counts(module, i):
        logits, target = predictions(module, run.dm.eval_loader(i, "val"), run.fabric)
        return counts(torch.sigmoid(logits), target)

    for i, row in each_node(run, trainees, merged, node_counts):
        rows[i] = row
    return gather(run.fabric, rows, run.owner)


def each_node(run, trainees: dict, merged: torch.Tensor, fn) -> list[tuple[int, object]]:
    """``(i, fn(module, i))`` for every node i of this rank's trainees, the module holding the model
    the node's trainee deploys; in the run's workers when it has them (a trainee per worker)."""
    def trainee(module, t):
        trainees[t].load_deployed(module, run.packer, merged)
        return [(i, fn(module, i)) for i in run.plan[t]]

    if run.workers is None:
        rows = [trainee(run.module, t) for t in run.mine]
    else:
        rows = list(run.workers.map(trainee, run.mine))
    return [row for rows_of_trainee in rows for row in rows_of_trainee]


def local_val_auc(fabric, module, dm, nodes) -> float:
    """Mean validation AUC of ``module`` over a trainee's nodes, for choosing its best epoch
    (-inf when undefined, so any defined epoch beats it)."""
    auc = summarize([evaluate(fabric, module, dm, i, "val")["auc"] for i in nodes])["mean"]
    return -math.inf if math.isnan(auc) else auc


def evaluate_trainees(run, trainees: dict, merged: torch.Tensor, split: str) -> list[dict]:
    """Every node's metrics with the model it deploys (``trainees``: this rank's TraineeStates;
    ``merged``: the federation's merged state), one dict per node, the same on every rank.
    ``split`` ``external``: every node's deployed model on the external site."""
    values = torch.full((len(run.owner), len(METRICS)), math.nan, dtype=torch.float64)

    def node_metrics(module, i):
        m = evaluate(run.fabric, module, run.dm, i, split)
        return torch.tensor([m[k] for k in METRICS], dtype=torch.float64)

    for i, row in each_node(run, trainees, merged, node_metrics):
        values[i] = row
    values = gather(run.fabric, values, run.owner)
    return [{k: float(values[i, j]) for j, k in enumerate(METRICS)} for i in range(len(run.owner))]


def external_result(run, trainees: dict, merged: torch.Tensor) -> list[dict]:
    """``summary.json``'s ``external``: the external site scored with every node's deployed model
    (one model for methods that deploy one, so the node AUCs then agree); ``auc`` is their mean."""
    if getattr(run.dm, "external_data", None) is None:
        return []
    metrics = evaluate_trainees(run, trainees, merged, "external")
    site = run.dm.external_data
    aucs = [m["auc"] for m in metrics]
    return [{"name": run.dm.external.name, "n": len(site), "positives": site.positives,
             "auc": summarize(aucs)["mean"], "node_aucs": dict(zip(run.names, aucs))}]


def gather(fabric, values: torch.Tensor, owner: dict[int, int]) -> torch.Tensor:
    """Rows per node, each taken from the rank that hosts the node (a collective: every rank calls it)."""
    if fabric.world_size == 1:
        return values
    gathered = fabric.all_gather(values.to(fabric.device)).cpu()  # (world, nodes, k)
    return torch.stack([gathered[owner[i], i] for i in range(values.shape[0])])

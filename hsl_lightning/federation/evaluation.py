"""Scoring: each node's metrics with the model it deploys, gathered on every rank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hsl_lightning.federation.randomness import adopt
from hsl_lightning.metrics import GRID, NodeMetrics, counts, predictions, summarize

METRICS = ("auc", "acc", "sensitivity", "specificity")
#: what validation adds per node: the summed loss (for ``deploy_round: best_loss``) and the AUC and
#: loss of two fixed, class-stratified halves of the validation set (a deployed-round rule can be
#: chosen on one half and scored on the other: see ``hsl_lightning.benchmark.tuning``)
VAL_EXTRAS = ("loss", "n", "auc_a", "auc_b", "loss_a")


def evaluate(fabric, module, dm, node: int, split: str) -> dict:
    """``module``'s metrics on one node's ``split`` (``val``, ``test``, ``external``: the data
    module's external site, its images tagged as this node's, or ``pool``: the test pool of every
    node seen through this node's scanner, :meth:`FederatedDataModule.pool_loader`)."""
    loader = (dm.external_loader(node) if split == "external" else dm.pool_loader(node) if split == "pool"
              else dm.eval_loader(node, split))
    return _metrics(*predictions(module, adopt(loader), fabric))


def unscored(keys: tuple[str, ...]) -> dict:
    """The metrics of a node nobody could score (a site that left a deployment): NaN for every key."""
    return {k: math.nan for k in keys}


def _metrics(logits: torch.Tensor, target: torch.Tensor) -> dict:
    metrics = NodeMetrics()
    if len(target):
        metrics.update(logits, target)
    return metrics.compute()


def halves(target: torch.Tensor) -> torch.Tensor:
    """A fixed, class-stratified split of an evaluation set in two: True for half A (every other
    image of each class, in the loader's order, which is the same every round)."""
    half = torch.zeros(len(target), dtype=torch.bool)
    for cls in (0, 1):
        where = torch.nonzero(target == cls).flatten()
        half[where[0::2]] = True
    return half


def validation_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """A node's validation metrics (:data:`METRICS`) plus :data:`VAL_EXTRAS`: its summed binary
    cross-entropy, its image count, and AUC and loss on the halves of :func:`halves`."""
    out = _metrics(logits, target)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    a = halves(target)
    out.update({"loss": float(loss.sum()), "n": float(len(target)), "auc_a": _metrics(logits[a], target[a])["auc"],
                "auc_b": _metrics(logits[~a], target[~a])["auc"], "loss_a": float(loss[a].sum())})
    return out


def validate_trainees(run, trainees: dict, merged: torch.Tensor) -> list[dict]:
    """Every node's validation metrics with the model it deploys (:func:`validation_metrics`),
    one dict per node, the same on every rank."""
    def node_metrics(module, i):
        return validation_metrics(*predictions(module, adopt(run.dm.eval_loader(i, "val")), run.fabric))

    return per_node(run, trainees, merged, METRICS + VAL_EXTRAS, node_metrics)


def per_node(run, trainees: dict, merged: torch.Tensor, keys: tuple[str, ...], fn) -> list[dict]:
    """``fn(module, i)`` (a dict holding ``keys``) for every node with the model it deploys, one
    dict of floats per node, gathered so that every rank holds every node's."""
    values = torch.full((len(run.owner), len(keys)), math.nan, dtype=torch.float64)

    def row(module, i):
        m = fn(module, i)
        return torch.tensor([m[k] for k in keys], dtype=torch.float64)

    for i, values_i in each_node(run, trainees, merged, row):
        values[i] = values_i
    values = gather(run.fabric, values, run.owner)
    return [{k: float(values[i, j]) for j, k in enumerate(keys)} for i in range(len(run.owner))]


def threshold_counts(run, trainees: dict, merged: torch.Tensor) -> torch.Tensor:
    """Per node, with the model it deploys, its validation images at or above every probability cut
    (:func:`hsl_lightning.metrics.counts`), the same on every rank: rows add up, so a
    threshold can pool any nodes."""
    rows = torch.zeros(len(run.owner), 2 * len(GRID) + 2, dtype=torch.float64)

    def node_counts(module, i):
        logits, target = predictions(module, adopt(run.dm.eval_loader(i, "val")), run.fabric)
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
    ``split`` ``external``: every node's deployed model on the external site. ``test`` also gives
    ``pool_auc``, the AUC on the node's view of the whole test pool, when the data module has one
    (``pool_loader``): the same expectation as the node's test AUC from more images (every node's)."""
    pool = split == "test" and hasattr(run.dm, "pool_loader") and getattr(run.dm, "test_pool", None) is not None

    def node_metrics(module, i):
        m = evaluate(run.fabric, module, run.dm, i, split)
        if pool:
            m["pool_auc"] = evaluate(run.fabric, module, run.dm, i, "pool")["auc"]
        return m

    return per_node(run, trainees, merged, METRICS + (("pool_auc",) if pool else ()), node_metrics)


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

"""Issue 24's figures: the pool test figure (same expectation as a node's own test AUC, more
images) and the deployed-round rules (best mean validation AUC, least summed validation loss, last)."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from hsl_lightning import ClassifierModule, Federation, FederatedDataModule, HSLError, Scenario, SyntheticLesions
from hsl_lightning.federation.evaluation import halves, validation_metrics
from hsl_lightning.federation.state import round_score

from conftest import tiny_data


def _auc_and_se(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """AUC and its Hanley-McNeil (1982) standard error."""
    auc = float(binary_auroc(scores, labels))
    n1, n0 = int(labels.sum()), int((1 - labels).sum())
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2)) / (n1 * n0)
    return auc, math.sqrt(var)


def _edge_score(images: torch.Tensor) -> torch.Tensor:
    """A fixed, untrained score: the Laplacian's magnitude relative to contrast (irregular margins
    have more edges); weak (AUC near 0.6), but the same function on every image."""
    x = images.float().mean(1)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, 2:, 1:-1] - x[:, :-2, 1:-1] - x[:, 1:-1, 2:] - x[:, 1:-1, :-2]
    return lap.abs().mean((1, 2)) / x.std((1, 2)).clamp_min(1e-3)


def _scores(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, labels, brightness = [], [], []
    for batch in loader:
        scores.append(_edge_score(batch["image"])), labels.append(batch["label"])
        brightness.append(batch["image"].float().mean((1, 2, 3)))
    return torch.cat(scores), torch.cat(labels), torch.cat(brightness)


# three scanners and unequal positive rates; and the study's combined scenario (five scanners twice as
# strong, positive rates 0.2 to 0.45, unequal node sizes, evaluation sets sized apart from training sets)
SCENARIOS = {"three nodes": Scenario(num_nodes=3, feature_skew=0.3, prevalence=[0.2, 0.5, 0.8]),
             "combined": Scenario(num_nodes=5, sizes=[938, 665, 60, 60, 4279], eval_sizes=[3, 3, 1, 1, 4],
                                  prevalence=[0.2, 0.3, 0.45, 0.35, 0.25], feature_skew=0.7)}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_pool_figure_agrees_with_the_node_test_auc_within_sampling_error(scenario):
    # a large source: the pool (every node's test images, seen through one node's scanner) must give
    # that node's own test AUC up to sampling error
    dm = FederatedDataModule(primary=SyntheticLesions(num_samples=6000, size=28, seed=3), use_sat=False,
                             splits="pooled", scenario=SCENARIOS[scenario], seed=5)
    dm.setup()
    assert len(dm.test_pool) == sum(len(n.test) for n in dm.nodes)
    brightness = []
    for i, node in enumerate(dm.nodes):
        own_scores, own_labels, own_bright = _scores(dm.eval_loader(i, "test"))
        pool_scores, pool_labels, pool_bright = _scores(dm.pool_loader(i))
        own, own_se = _auc_and_se(own_scores, own_labels)
        pool, pool_se = _auc_and_se(pool_scores, pool_labels)
        assert own > 0.52  # the score sees the task (weakly)
        assert len(pool_labels) > 2.5 * len(node.test) and pool_se < own_se
        # the node's test set is part of the pool, so the two errors are not independent; the
        # independent bound is the conservative one
        assert abs(pool - own) < 3 * math.hypot(own_se, pool_se), (i, own, pool)
        # the pool is seen through this node's scanner: its images look like the node's own
        assert float(pool_bright.mean()) == pytest.approx(float(own_bright.mean()), abs=0.01)
        brightness.append(float(pool_bright.mean()))
    assert max(brightness) - min(brightness) > 0.02  # three scanners, three views of one pool


def test_every_node_is_scored_on_the_pool_and_the_summary_records_it(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(use_sat=False)
    summary = Federation(strategy="local", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False,
                         checkpoint=False).fit(ClassifierModule(backbone="test_resnet"), dm)
    pool_size = sum(len(n.test) for n in dm.nodes)
    for i, node in enumerate(summary["nodes"]):
        assert node["n_pool_test"] == pool_size > node["n_test"]
        assert 0 <= node["pool_test_auc"] <= 1
    pools = [n["pool_test_auc"] for n in summary["nodes"]]
    assert summary["mean_pool_test_auc"] == pytest.approx(sum(pools) / 3) and len(set(pools)) > 1
    assert summary["deploy_round"] == "best_auc"


def test_the_pool_figure_is_the_deployed_models_auc_on_the_pool(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(use_sat=False)
    model = ClassifierModule(backbone="test_resnet")
    fed = Federation(strategy="fedavg", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False,
                     checkpoint=False)
    summary = fed.fit(model, dm)  # one node's model stays in ``model``: with fedavg, every node's
    model.eval()
    for i, node in enumerate(summary["nodes"]):
        logits, labels = [], []
        with torch.no_grad():
            for batch in dm.pool_loader(i):
                logits.append(model.primary_logits(batch)), labels.append(batch["label"])
        assert float(binary_auroc(torch.cat(logits), torch.cat(labels))) == pytest.approx(node["pool_test_auc"], abs=1e-6)


# ---------------------------------------------------------------- the deployed round
def test_validation_halves_are_fixed_disjoint_and_stratified():
    target = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0])
    a = halves(target)
    assert torch.equal(a, halves(target))
    assert int(target[a].sum()) == 2 and int((1 - target[a]).sum()) == 3
    assert int(target[~a].sum()) == 2 and int((1 - target[~a]).sum()) == 3
    logits = torch.linspace(-2, 2, 10)
    m = validation_metrics(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    assert m["loss"] == pytest.approx(float(bce.sum())) and m["loss_a"] == pytest.approx(float(bce[a].sum()))
    assert m["auc_a"] == pytest.approx(float(binary_auroc(logits[a], target[a])))
    assert m["auc_b"] == pytest.approx(float(binary_auroc(logits[~a], target[~a]))) and m["n"] == 10


def test_round_scores_follow_the_rule():
    nodes = [{"loss": 2.0}, {"loss": 3.0}]
    assert round_score("best_auc", nodes, 0.7, 4) == 0.7
    assert round_score("best_auc", nodes, math.nan, 4) == -math.inf
    assert round_score("best_loss", nodes, 0.7, 4) == -5.0
    assert round_score("last", nodes, 0.7, 4) == 4.0 > round_score("last", nodes, 0.99, 3)
    with pytest.raises(HSLError, match="deploy_round must be one of"):
        round_score("best", nodes, 0.7, 4)
    with pytest.raises(HSLError, match="deploy_round must be one of"):
        Federation(deploy_round="best")


def _fit(tmp_path, rule: str, rounds: int = 4, **kwargs) -> dict:
    torch.manual_seed(0)
    fed = Federation(strategy="fedavg", rounds=rounds, run_dir=str(tmp_path / rule), wandb="disabled", progress=False,
                     checkpoint=False, deploy_round=rule, **kwargs)
    return fed.fit(ClassifierModule(backbone="test_resnet", lr=0.05), tiny_data(use_sat=False))


@pytest.mark.slow
def test_deploy_round_best_loss_deploys_the_round_of_least_summed_validation_loss(tmp_path):
    summary = _fit(tmp_path, "best_loss")
    losses = [h["sum_val_loss"] for h in summary["history"]]
    assert summary["best_round"] == 1 + min(range(len(losses)), key=lambda r: (losses[r], r))
    assert summary["deploy_round"] == "best_loss"
    node = summary["history"][0]
    assert node["sum_val_loss"] == pytest.approx(sum(node[f"{n['name']}/val_loss"] for n in summary["nodes"]))
    for key in ("sum_val_loss_a", "mean_val_auc_a", "mean_val_auc_b"):
        assert key in node
    # the training is the rule's own business only through the deployed round: the same history
    auc = _fit(tmp_path, "best_auc")
    assert [h["mean_val_auc"] for h in auc["history"]] == [h["mean_val_auc"] for h in summary["history"]]


@pytest.mark.slow
def test_deploy_round_last_runs_every_round_and_deploys_the_last(tmp_path):
    summary = _fit(tmp_path, "last", rounds=4, patience=1)
    assert summary["best_round"] == 4 == summary["rounds_run"] and not summary["stopped_early"]
    assert summary["deploy_round"] == "last"
    assert summary["mean_val_auc"] == summary["history"][-1]["mean_val_auc"]

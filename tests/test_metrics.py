import math

import torch

from hsl_lightning.metrics import NodeMetrics, summarize


def auc_by_hand(scores, labels):
    """Probability that a random positive outscores a random negative (ties count 1/2)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_node_auc_equals_hand_computation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(57, generator=g)
    labels = (torch.rand(57, generator=g) < 0.4).long()
    m = NodeMetrics()
    m.update(logits[:30], labels[:30])  # accumulates over batches
    m.update(logits[30:], labels[30:])
    assert math.isclose(m.compute()["auc"], auc_by_hand(logits.tolist(), labels.tolist()), rel_tol=1e-6)


def test_sensitivity_and_specificity_at_half():
    m = NodeMetrics()
    m.update(torch.tensor([2.0, -1.0, 1.0, -3.0, 0.5]), torch.tensor([1, 1, 0, 0, 0]))
    out = m.compute()
    assert math.isclose(out["sensitivity"], 0.5) and math.isclose(out["specificity"], 1 / 3, rel_tol=1e-6)
    assert math.isclose(out["acc"], 2 / 5, rel_tol=1e-6)


def test_single_class_node_has_undefined_auc_with_reason():
    m = NodeMetrics()
    m.update(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    out = m.compute()
    assert math.isnan(out["auc"]) and "one class" in out["auc_undefined"]


def test_summary_skips_undefined_nodes():
    s = summarize([0.8, math.nan, 0.6])
    assert math.isclose(s["mean"], 0.7) and math.isclose(s["std"], 0.1) and s["min"] == 0.6


def test_non_finite_outputs_give_no_auc_rather_than_the_sort_order_of_nans():
    # A model whose BatchNorm variance went negative (say under DP noise) outputs NaN for every image;
    # ranking NaNs gives an arbitrary "AUC" (0.42 on a real run), so none is reported, with the reason.
    m = NodeMetrics()
    m.update(torch.tensor([float("nan"), 0.3, float("inf"), -1.0]), torch.tensor([1, 0, 1, 0]))
    out = m.compute()
    assert all(math.isnan(out[k]) for k in ("auc", "acc", "sensitivity", "specificity"))
    assert "not finite for 2 of 4 images" in out["auc_undefined"]
    m.reset()
    m.update(torch.tensor([2.0, -1.0]), torch.tensor([1, 0]))
    assert m.compute()["auc"] == 1.0

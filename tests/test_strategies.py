"""Each strategy's defining rule, pinned on tiny models with hand-computed expectations."""

import pytest
import timm
import torch
from torch import nn

from hsl_lightning import ClassifierModule, Federation, HSLError
from hsl_lightning.federation.strategies import STRATEGIES, get_strategy
from hsl_lightning.federation.sync import StatePacker

from conftest import tiny_data, tiny_hsl


def flat_states(n=3, size=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]


def test_personalized_keeps_half_own_and_half_mean_of_others():
    s = get_strategy("personalized")
    a, b, c = flat_states()
    total = a + b + c  # unit weights
    assert torch.allclose(s.combine(a, total, 1.0, 3.0), 0.5 * a + 0.5 * (b + c) / 2)
    assert torch.allclose(s.combine(c, total, 1.0, 3.0), 0.5 * c + 0.5 * (a + b) / 2)
    assert torch.equal(s.combine(a, a, 1.0, 1.0), a)  # alone: nothing to mix with


def test_fedprox_gradient_carries_mu_times_distance_to_global():
    s = get_strategy("fedprox", {"mu": 0.3})
    model = nn.Linear(4, 2)
    s.begin_local(model)
    received = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    s.local_loss(model).backward()
    for p, p0 in zip(model.parameters(), received):
        assert torch.allclose(p.grad, 0.3 * (p.detach() - p0), atol=1e-6)
    assert s.weight(40) == 40.0  # FedAvg aggregation


def test_fedprox_with_mu_zero_adds_nothing():
    s = get_strategy("fedprox", {"mu": 0.0})
    model = nn.Linear(2, 1)
    s.begin_local(model)
    assert s.local_loss(model) is None


def test_fedbn_keeps_every_batchnorm_entry_local():
    model = timm.create_model("test_resnet", num_classes=1, in_chans=1)
    shared = set(get_strategy("fedbn").shared_keys(model))
    bn = {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for k in m.state_dict()}
    assert bn and not (bn & shared)
    assert shared | bn == set(model.state_dict())  # everything else is averaged


def test_fedper_keeps_the_head_local():
    model = ClassifierModule(backbone="test_resnet")
    shared = get_strategy("fedper").shared_keys(model)
    assert not any(k.startswith("head.") for k in shared)
    assert set(model.state_dict()) - set(shared) == {"head.1.weight", "head.1.bias"}
    with pytest.raises(HSLError, match="head_prefixes"):
        get_strategy("fedper").shared_keys(nn.Linear(2, 1))


def test_swarm_is_the_unweighted_mean_of_last_states():
    s = get_strategy("swarm")
    a, b, c = flat_states()
    total = sum(s.weight(n) * x for n, x in zip((500, 50, 5), (a, b, c)))
    assert torch.allclose(s.combine(a, total, 1.0, 3.0), (a + b + c) / 3)
    assert s.default_contribution == "last"


def test_strategy_options_are_checked():
    with pytest.raises(HSLError, match="it takes: mu"):
        get_strategy("fedprox", {"nu": 1})
    with pytest.raises(HSLError, match="no options"):
        get_strategy("swarm", {"mu": 1})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_one_round(tmp_path, name):
    torch.manual_seed(0)
    if name == "hsl":
        model, data = tiny_hsl(), tiny_data()
    else:
        model, data = ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False)
    summary = Federation(strategy=name, rounds=1, run_dir=str(tmp_path), wandb="disabled",
                         progress=False).fit(model, data)
    assert summary["method"] == name and len(summary["nodes"]) == 3
    assert all(0 <= n["test_auc"] <= 1 for n in summary["nodes"])
    strategy = get_strategy(name)
    template = model.state_dict()
    expected = StatePacker(template, strategy.shared_keys(model)).nbytes if len(strategy.plan(3)) > 1 else 0
    assert summary["bytes_sent_per_node_per_round"] == expected
    if strategy.personal or expected < sum(v.numel() * v.element_size() for v in template.values()):
        assert len(list((tmp_path / "nodes").iterdir())) == len(strategy.plan(3))  # per-node state is kept


def test_personalized_nodes_end_with_different_models(tmp_path):
    torch.manual_seed(0)
    Federation(strategy="personalized", rounds=2, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
        ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False))
    states = [torch.load(p, weights_only=True)["state"] for p in sorted((tmp_path / "nodes").iterdir())]
    assert len(states) == 3
    assert not torch.allclose(states[0]["head.1.weight"], states[1]["head.1.weight"])

"""Each strategy's defining rule, pinned on tiny models with hand-computed expectations."""

import pytest
import timm
import torch
from torch import nn

import math

from hsl_lightning import ClassifierModule, Federation, FoundationProbe, HSLError, SplitClassifier
from hsl_lightning.federation.strategies import STRATEGIES, consensus_coefficients, get_strategy
from hsl_lightning.federation.sync import StatePacker

from conftest import tiny_classifier, tiny_data, tiny_hsl


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
    s.begin_local(model, trainee=0)
    received = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    s.local_loss(model, batch=None).backward()
    for p, p0 in zip(model.parameters(), received):
        assert torch.allclose(p.grad, 0.3 * (p.detach() - p0), atol=1e-6)
    assert s.weight(40) == 40.0  # FedAvg aggregation


def test_fedprox_with_mu_zero_adds_nothing():
    s = get_strategy("fedprox", {"mu": 0.0})
    model = nn.Linear(2, 1)
    s.begin_local(model, trainee=0)
    assert s.local_loss(model, batch=None) is None


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


def test_register_makes_a_class_a_strategy_and_what_it_overrides_decides_fusing(monkeypatch):
    from hsl_lightning.federation.strategies import base as strategies  # the registry's own module
    from hsl_lightning.federation.merge import Mean, Personal, Server

    monkeypatch.setattr(strategies, "STRATEGIES", dict(STRATEGIES))  # registered here, forgotten after

    @strategies.register
    class Halved(strategies.Strategy):
        name = "halved"

        def local_loss(self, module, batch):
            return None

    assert strategies.STRATEGIES["halved"] is Halved and isinstance(get_strategy("halved"), Halved)
    assert list(strategies.STRATEGIES)[-1] == "halved"  # listed in the order of registration
    assert Halved.local_hooks() == ["local_loss"] and not Halved.fusable()
    with pytest.raises(ValueError, match="'hsl' is taken"):
        strategies.register(type("Other", (strategies.Strategy,), {"name": "hsl"}))
    with pytest.raises(TypeError, match="Strategy subclass with a name"):
        strategies.register(type("Nameless", (strategies.Strategy,), {}))
    with pytest.raises(TypeError, match="sets personal, which no longer exist: set merge_kind = Personal"):
        type("OldStyle", (strategies.Strategy,), {"name": "old", "personal": True})
    # the built-ins: which fuse, and which merge kind each selects
    assert sorted(n for n, kind in STRATEGIES.items() if kind.fusable()) == sorted(
        ["hsl", "fedavg", "swarm", "personalized", "fedbn", "fedper", "splitavg", "fedcome", "foundation", "local",
         "central"])
    assert STRATEGIES["ditto"].local_hooks() == ["local_loss", "begin_personal", "end_personal"]
    assert {n: kind.merge_kind for n, kind in STRATEGIES.items() if kind.merge_kind is not Mean} == {
        "personalized": Personal, "fedcome": Server}


# the fast tier runs a few (test_privacy.py runs every strategy's round too); the slow tier all
@pytest.mark.parametrize("name", [n if n in ("hsl", "fedavg", "scaffold", "ditto") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(STRATEGIES)])
def test_every_strategy_runs_one_round(tmp_path, name):
    torch.manual_seed(0)
    if name == "hsl":
        model, data = tiny_hsl(), tiny_data()
    elif name == "splitavg":
        model, data = SplitClassifier(backbone="test_resnet"), tiny_data(use_sat=False)
    elif name == "foundation":
        model, data = FoundationProbe(backbone="test_vit", in_chans=1, pretrained=False), tiny_data(use_sat=False,
                                                                                                   image_size=32)
    else:
        model, data = tiny_classifier(name), tiny_data(use_sat=False)
    epochs = 2 if name == "fedrep" else 1  # FedRep trains the head, then the body
    summary = Federation(strategy=name, rounds=1, local_epochs=epochs, run_dir=str(tmp_path), wandb="disabled",
                         progress=False).fit(model, data)
    assert summary["method"] == name and len(summary["nodes"]) == 3
    assert all(0 <= n["test_auc"] <= 1 for n in summary["nodes"])
    strategy = get_strategy(name)
    template = model.state_dict()
    expected = StatePacker(template, strategy.shared_keys(model)).nbytes + 4 * strategy.extra_size(model)
    expected = expected if len(strategy.plan(3)) > 1 else 0
    assert summary["bytes_sent_per_node_per_round"] == expected
    one_model = len(strategy.plan(3)) == 1 or (strategy.merge_kind.one_model and not strategy.personal_model and
                                               set(strategy.shared_keys(model)) == set(template))
    if one_model:  # every node deploys the same model: one checkpoint
        assert (tmp_path / "model.ckpt").is_file() and not (tmp_path / "nodes").exists()
    else:  # a checkpoint per node
        assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == [f"node{i}.ckpt" for i in range(3)]
        assert not (tmp_path / "model.ckpt").exists()


@pytest.mark.slow
def test_personalized_nodes_end_with_different_models(tmp_path):
    torch.manual_seed(0)
    Federation(strategy="personalized", rounds=2, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
        ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False))
    states = [torch.load(p, weights_only=True)["state_dict"] for p in sorted((tmp_path / "nodes").iterdir())]
    assert len(states) == 3
    assert not torch.allclose(states[0]["head.1.weight"], states[1]["head.1.weight"])


def sgd_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 1)


def test_scaffold_corrects_each_step_by_the_control_variates():
    s = get_strategy("scaffold")
    model = sgd_model()
    s.begin_local(model, trainee=0)
    n = sum(p.numel() for p in model.parameters())
    s._c = torch.linspace(-1, 1, n)  # global control variate
    s._ci[0] = torch.linspace(2, 3, n)  # this node's
    s.begin_local(model, trainee=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 3)
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    s.after_backward(model)
    opt.step()
    correction = (s._c - s._ci[0]).split([p.numel() for p in model.parameters()])
    for p, p0, g, c in zip(model.parameters(), before, grads, correction):
        assert torch.allclose(p.detach(), p0 - 0.1 * (g + c.view_as(g)), atol=1e-6)  # y - lr (g - c_i + c)


def test_scaffold_control_variate_updates_follow_option_two():
    s = get_strategy("scaffold")
    models = [sgd_model(0), sgd_model(0)]
    deltas = []
    for node, model in enumerate(models):
        s.begin_local(model, trainee=node)
        x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(4):  # K = 4 local steps
            opt.zero_grad()
            model(torch.randn(8, 3) + node).pow(2).mean().backward()
            s.after_backward(model)
            opt.step()
        y = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        delta = s.end_local(model, node, steps=4, optimizer=opt)
        # c_i+ = c_i - c + (x - y) / (K lr), with c = c_i = 0 in the first round
        assert torch.allclose(s._ci[node], (x - y) / (4 * 0.05), atol=1e-5)
        assert torch.allclose(delta.float(), s._ci[node], atol=1e-6)
        deltas.append(delta)
    s.after_round(deltas[0] + deltas[1], num_trainees=2)
    assert torch.allclose(s._c, (s._ci[0] + s._ci[1]) / 2, atol=1e-6)  # c <- c + mean delta c_i


def test_fedrep_trains_the_head_then_the_body():
    s = get_strategy("fedrep", {"body_epochs": 1})
    model = ClassifierModule(backbone="test_resnet")
    s.begin_local(model, trainee=0)
    s.begin_epoch(model, epoch=0, num_epochs=3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    s.begin_epoch(model, epoch=2, num_epochs=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("head.") for n in trainable)
    s.end_local(model, 0, steps=1, optimizer=None)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(k.startswith("head.") for k in s.shared_keys(model))
    with pytest.raises(HSLError, match="local_epochs > body_epochs"):
        s.begin_epoch(model, epoch=0, num_epochs=1)


# max |dw| between the deployed weights of one rank and two. Measured 0 (2026-12-07, 2-core machine): the
# control variates' float64 sum, added in another order on two ranks, rounds to the same float32
# corrections; the bound leaves room for one rounding flip elsewhere, while control variates that did not
# agree across ranks would move the weights by lr x steps x |c|, 1e-3 or more.
SCAFFOLD_RANKS_DW = 1e-6


@pytest.mark.slow
def test_scaffold_gives_the_same_result_on_two_ranks(tmp_path):
    """The control variates travel in the same all-reduce as the weights: c must agree across ranks."""
    runs = []
    for devices in (1, 2):
        torch.manual_seed(0)
        model = ClassifierModule(backbone="test_resnet", optimizer="sgd", lr=0.05)
        runs.append(Federation(strategy="scaffold", rounds=2, devices=devices, threads=1, wandb="disabled",
                               progress=False, run_dir=str(tmp_path / f"w{devices}")).fit(model, tiny_data(use_sat=False)))
    for a, b in zip(*[r["nodes"] for r in runs]):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=1e-4)
    # and the weights: max |dw| between the deployed models within SCAFFOLD_RANKS_DW
    w1, w2 = (torch.load(tmp_path / f"w{d}" / "model.ckpt", weights_only=True)["state_dict"] for d in (1, 2))
    assert w1.keys() == w2.keys()
    dw = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1)
    assert dw <= SCAFFOLD_RANKS_DW, dw


def test_moon_contrastive_term_matches_the_paper():
    s = get_strategy("moon", {"mu": 1.0, "temperature": 0.5})
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    z_prev = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    expected = []
    for a, g, p in zip(z, z_glob, z_prev):
        sg = torch.dot(a, g) / (a.norm() * g.norm())
        sp = torch.dot(a, p) / (a.norm() * p.norm())
        expected.append(-torch.log(torch.exp(sg / 0.5) / (torch.exp(sg / 0.5) + torch.exp(sp / 0.5))))
    assert torch.allclose(s.contrastive_loss(z, z_glob, z_prev), torch.stack(expected).mean(), atol=1e-6)


def test_moon_remembers_each_nodes_previous_model():
    s = get_strategy("moon")
    model = ClassifierModule(backbone="test_resnet")
    s.begin_local(model, trainee=1)
    batch = next(iter(tiny_data(use_sat=False).train_loader([1], seed=0, with_sat=False)))
    model.train()
    model.training_step(batch, 0)  # the training forward hands MOON its representation
    assert s.local_loss(model, batch).requires_grad
    with torch.no_grad():
        model.head[1].weight.add_(1.0)  # "training"
    s.end_local(model, 1, steps=1, optimizer=None)
    received = ClassifierModule(backbone="test_resnet")
    s.begin_local(received, trainee=1)
    assert torch.equal(s._previous.head[1].weight, model.head[1].weight)  # z_prev comes from last round's model
    assert torch.equal(s._global.head[1].weight, received.head[1].weight)  # z_glob from what was received


def test_ditto_pulls_only_the_personal_model_toward_the_received_one():
    s = get_strategy("ditto", {"lam": 0.4})
    model = nn.Linear(3, 2)
    assert s.local_loss(model, batch=None) is None  # the global model's pass is plain local training
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    s.begin_personal(model, trainee=0, received=received)
    s.local_loss(model, batch=None).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.4 * (p.detach() - received[name]), atol=1e-6)
    s.end_personal(model, trainee=0)
    assert s.local_loss(model, batch=None) is None


@pytest.mark.slow
def test_ditto_nodes_deploy_their_personal_models(tmp_path):
    from hsl_lightning.metrics import NodeMetrics

    torch.manual_seed(0)
    dm = tiny_data(use_sat=False)
    summary = Federation(strategy="ditto", rounds=2, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
        ClassifierModule(backbone="test_resnet"), dm)
    personal = [torch.load(tmp_path / "nodes" / f"node{i}.ckpt", weights_only=True)["state_dict"] for i in range(3)]
    assert not torch.allclose(personal[0]["head.1.weight"], personal[1]["head.1.weight"])
    for i, state in enumerate(personal):  # the reported AUC is that of the node's personal model
        model = ClassifierModule(backbone="test_resnet")
        model.load_state_dict(state)
        model.eval()
        m = NodeMetrics()
        with torch.no_grad():
            for batch in dm.eval_loader(i, "test"):
                m.update(model.primary_logits(batch), batch["label"])
        assert m.compute()["auc"] == pytest.approx(summary["nodes"][i]["test_auc"], abs=1e-6)


def test_fedcome_adjusts_conflicting_updates_as_computed_by_hand():
    # Delta_1 = (1, 0) and Delta_2 = (-1, 1) conflict (inner product -1). The nearest vectors with no
    # obtuse angle to either: (0.5, 0.5) for node 1 (x_1 = (1, 0.5)), (0, 1) for node 2 (x_2 = (1, 1)).
    updates = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    alpha = consensus_coefficients(updates @ updates.T, torch.tensor([1.0, 1.0]))
    assert torch.allclose(alpha, torch.tensor([1.0, 0.75], dtype=torch.float64), atol=1e-7)
    s = get_strategy("fedcome")
    received = torch.tensor([10.0, 20.0, 5.0], dtype=torch.float64)  # two parameters and one buffer
    contributions = torch.tensor([[11.0, 20.0, 1.0], [9.0, 21.0, 4.0]], dtype=torch.float64)
    merged = s.aggregate(received, contributions, torch.tensor([1.0, 3.0], dtype=torch.float64),
                         torch.tensor([True, True, False]))
    # sizes 1 and 3: alpha = (1 x_1 + 3 x_2) / 4 = (1, 0.875); step = Delta_1 + 0.875 Delta_2
    assert torch.allclose(merged[:2], torch.tensor([10.125, 20.875], dtype=torch.float64), atol=1e-6)
    assert merged[2].item() == pytest.approx((1.0 + 3 * 4.0) / 4)  # buffers: size-weighted mean


def test_fedcome_without_conflicts_is_fedavg_and_its_step_never_opposes_a_node():
    agreeing = torch.tensor([[1.0, 0.2], [0.5, 1.0], [0.3, 0.3]], dtype=torch.float64)
    sizes = torch.tensor([2.0, 1.0, 1.0])
    assert torch.allclose(consensus_coefficients(agreeing @ agreeing.T, sizes),
                          torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=1e-9)
    g = torch.Generator().manual_seed(0)
    updates = 0.1 * torch.randn(6, 30, generator=g, dtype=torch.float64)
    updates[0, 0] += 10.0  # one node pulls hard one way, the five others a little the other way
    updates[1:, 0] -= 1.0
    alpha = consensus_coefficients(updates @ updates.T, torch.ones(6))
    step = alpha @ updates
    assert (updates @ step).min() >= -1e-8  # the merged step lowers no node's first-order risk
    plain = updates.mean(0)
    assert (updates @ plain).min() < 0  # while the plain mean does oppose some node here


def test_fedcome_clip_bounds_every_coordinate_of_the_step():
    s = get_strategy("fedcome", {"clip": 0.01})
    received = torch.zeros(3, dtype=torch.float64)
    merged = s.aggregate(received, torch.tensor([[1.0, -0.005, 0.3], [1.0, -0.005, 0.1]], dtype=torch.float64),
                         torch.ones(2, dtype=torch.float64), torch.tensor([True, True, True]))
    assert merged.tolist() == pytest.approx([0.01, -0.005, 0.01])


def split_batch(nodes):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(len(nodes), 1, 28, 28, generator=g), "label": torch.tensor([0, 1] * (len(nodes) // 2)),
            "node": torch.tensor(nodes)}


def test_splitavg_server_trains_on_the_union_of_the_sites_feature_maps():
    model = SplitClassifier(backbone="test_resnet", cut="layer1")
    get_strategy("splitavg").setup(model, 3)
    assert len(model.sites) == 3
    seen = []
    model.server[0][0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))  # first server layer
    batch = split_batch([2, 0, 2, 0, 2, 0])  # site 1 has no images in this step
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert seen == [6]  # one server pass over all sites' feature maps together
    assert all(p.grad is None for p in model.sites[1].parameters())
    assert all(p.grad is not None for i in (0, 2) for p in model.sites[i].parameters() if p.requires_grad)
    # each site's gradient is that of its own images' share of the loss
    model.zero_grad()
    model.eval()  # BatchNorm in eval mode: images do not interact, so the loss splits per site
    logits = model(batch["image"], batch["node"])
    for i in range(6):
        single = model(batch["image"][i:i + 1], batch["node"][i:i + 1])
        assert torch.allclose(logits[i], single[0], atol=1e-5)  # outputs come back in the batch's order
    with torch.no_grad():
        next(model.sites[0].parameters()).add_(0.5)  # change site 0 only
    changed = model(batch["image"], batch["node"])
    assert torch.allclose(changed[batch["node"] == 2], logits[batch["node"] == 2].detach())
    assert not torch.allclose(changed[batch["node"] == 0], logits[batch["node"] == 0].detach())


def test_splitavg_logs_the_feature_maps_it_sends_and_keeps_site_parts_local(tmp_path):
    torch.manual_seed(0)
    model = SplitClassifier(backbone="test_resnet")
    dm = tiny_data(use_sat=False)
    summary = Federation(strategy="splitavg", rounds=1, run_dir=str(tmp_path), wandb="disabled",
                         progress=False).fit(model, dm)
    with torch.no_grad():
        shape = model.sites[0](torch.zeros(1, 1, 28, 28)).shape
    loader = dm.train_loader(range(3), seed=0, with_sat=False, per_node_batch=True)
    images = len(loader) * loader.batch_size  # one epoch of batches, each as many images from every site
    # per image: its feature map up, its gradient down, its int64 label
    assert summary["bytes_features_per_round"] == images * (2 * math.prod(shape) * 4 + 8)
    assert summary["bytes_sent_per_node_per_round"] == 0  # no weights are exchanged
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]  # one model holds every site part
    first = next(k for k in state if k.startswith("sites.0.") and k.endswith("weight"))
    assert not torch.allclose(state[first], state[first.replace("sites.0.", "sites.1.")])  # each site trained its own


def test_splitavg_needs_a_split_model():
    with pytest.raises(HSLError, match="SplitClassifier"):
        get_strategy("splitavg").setup(ClassifierModule(backbone="test_resnet"), 3)
    with pytest.raises(HSLError, match="choose one of: conv1"):
        SplitClassifier(backbone="test_resnet", cut="conv9")


def rcl_by_hand(z, labels, tau=0.05, threshold=0.7, negatives=2):
    """FedRCL's two terms written out anchor by anchor."""
    n = len(labels)
    sim = [[float(z[i] @ z[j]) for j in range(n)] for i in range(n)]
    scl, pen = 0.0, 0.0
    for i in range(n):
        pos = min(sim[i][j] for j in range(n) if labels[j] == labels[i])
        negs = sorted((sim[i][j] for j in range(n) if labels[j] != labels[i]), reverse=True)[:negatives]
        scl += -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + sum(math.exp(s / tau) for s in negs)))
        mates = [sim[i][j] for j in range(n) if j != i and labels[j] == labels[i]]
        least = min(mates) if mates else -1.0
        relaxed = least if least >= threshold else -1.0
        pen += -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(relaxed / tau)))
    return scl / n, pen / n


def test_fedrcl_terms_match_the_definition():
    s = get_strategy("fedrcl")
    z = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.1, 0.0], [0.9, 0.2, 0.1], [0.95, 0.15, 0.05], [0.0, 1.0, 0.2], [0.1, 0.2, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1])  # class 0 nearly collapsed (similarities > 0.7): penalised
    contrastive, penalty = s.rcl_loss(z, labels)
    exp_scl, exp_pen = rcl_by_hand(z.double(), labels.tolist())
    assert contrastive.item() == pytest.approx(exp_scl, rel=1e-4)
    assert penalty.item() == pytest.approx(exp_pen, rel=1e-4)
    assert penalty.item() > 0.1
    lone = torch.tensor([0, 1, 1, 1, 1])  # anchor 0 has no classmate: its positive is itself
    c, p = s.rcl_loss(z, lone)
    e_c, e_p = rcl_by_hand(z.double(), lone.tolist())
    assert c.item() == pytest.approx(e_c, rel=1e-4) and p.item() == pytest.approx(e_p, rel=1e-4)


def test_fedrcl_adds_its_term_on_every_feature_level_during_training_only():
    s = get_strategy("fedrcl")
    model = ClassifierModule(backbone="test_resnet")
    batch = next(iter(tiny_data(use_sat=False).train_loader([0], seed=0, with_sat=False)))
    s.begin_local(model, trainee=0)
    model.train()
    model.training_step(batch, 0)
    assert len(s._levels) == len(model.feature_levels()) == 5  # stem + four stages
    term = s.local_loss(model, batch)
    assert term.requires_grad and term.item() > 0
    with torch.no_grad():
        model.eval()
        model.training_step(batch, 0)
    assert s.local_loss(model, batch) is None  # evaluation forwards add nothing
    s.end_local(model, 0, steps=1, optimizer=None)
    model.train()
    model.training_step(batch, 0)
    assert s._levels == []  # hooks removed after local training


def test_scaffold_on_a_rank_that_hosted_no_node_takes_the_global_update():
    s = get_strategy("scaffold")
    s.after_round(torch.ones(4, dtype=torch.float64) * 6, num_trainees=3)  # this rank never called begin_local
    assert torch.equal(s._c, torch.full((4,), 2.0))


def test_fedrep_abort_before_local_training_started_is_harmless():
    s = get_strategy("fedrep")
    s.abort_local(ClassifierModule(backbone="test_resnet"), trainee=0)  # nothing was set up: nothing to undo


def test_a_failing_personal_pass_drops_the_node_with_min_nodes(tmp_path, monkeypatch, capsys):
    from hsl_lightning.federation.strategies import Ditto

    original = Ditto.begin_personal

    def begin_personal(self, module, trainee, received):
        if trainee == 2:
            raise RuntimeError("personal model broke")
        return original(self, module, trainee, received)

    monkeypatch.setattr(Ditto, "begin_personal", begin_personal)
    torch.manual_seed(0)
    summary = Federation(strategy="ditto", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False,
                         min_nodes=2).fit(ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False))
    assert summary["history"][0]["dropped"] == ["node2"]
    assert "node node2 dropped from round 1" in capsys.readouterr().out

"""FusedModels (N models trained as one under torch.vmap) against training them one after another."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from hsl_lightning import ClassifierModule, Federation, HSLError, HSLModule, Scenario, SyntheticLesions
from hsl_lightning.federation.fused import FusedModels
from hsl_lightning.federation.fused_training import FusedRounds

from conftest import tiny_data
from float64 import LOSS_TOLERANCE, TOLERANCE, Classifier64, HSL64

N, B = 3, 8


def _models(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return [timm.create_model("test_resnet", in_chans=1, num_classes=1, **kwargs).to(dtype) for _ in range(N)]


def _batches(steps, dtype):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(N, B, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 2, (N, B), generator=g).to(dtype))
            for _ in range(steps)]


def _sequential(models, batches, make_opt):
    opts = [make_opt(m.parameters()) for m in models]
    losses = []
    for x, y in batches:
        step = []
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(m(x[i]).squeeze(1), y[i])
            loss.backward()
            opt.step()
            step.append(loss.detach())
        losses.append(torch.stack(step))
    return losses


def _assert_states_close(fused, models, atol):
    sds = fused.state_dicts()
    for i, m in enumerate(models):
        ref = m.state_dict()
        assert sds[i].keys() == ref.keys()
        for k, v in ref.items():
            assert torch.allclose(sds[i][k].to(v.dtype), v, atol=atol, rtol=0), (i, k, (sds[i][k] - v).abs().max())


@pytest.mark.parametrize("dtype, make_opt, atol", [
    # float64: AdamW's normalisation turns rounding noise in near-zero gradients into visible
    # steps, so the exact equality is checked where rounding is negligible ...
    (torch.float64, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4, foreach=True), 1e-8),
    # ... and float32 with SGD + momentum + weight decay at the float tolerance.
    (torch.float32, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True), 1e-4),
])
def test_fused_matches_sequential_training(dtype, make_opt, atol):
    models = _models(dtype)
    sequential = [copy.deepcopy(m) for m in models]
    batches = _batches(3, dtype)
    fused = FusedModels(models)
    opt = make_opt(fused.parameters())
    fused_losses = [fused.train_step(x, y, opt) for x, y in batches]
    seq_losses = _sequential(sequential, batches, make_opt)

    for a, b in zip(fused_losses, seq_losses):
        assert a.shape == (N,)
        assert torch.allclose(a, b, atol=atol, rtol=0)
    # parameters and BatchNorm running statistics (incl. num_batches_tracked), per institution
    _assert_states_close(fused, sequential, atol)
    assert all(int(sd["bn1.num_batches_tracked"]) == 3 for sd in fused.state_dicts())
    # the institutions really differ (own batches -> own running statistics)
    assert not torch.allclose(fused.buffers["bn1.running_mean"][0], fused.buffers["bn1.running_mean"][1])

    # outputs, in eval mode (running statistics) and in train mode
    x = batches[0][0]
    for mode in (False, True):
        fused.train(mode)
        out = fused(x)
        for i, m in enumerate(sequential):
            m.train(mode)
            assert torch.allclose(out[i], m(x[i]), atol=atol, rtol=0)

    # written back into the modules
    fused.unstack()
    for m, ref in zip(models, sequential):
        for (k, v), (_, w) in zip(m.state_dict().items(), ref.state_dict().items()):
            assert torch.allclose(v, w, atol=atol, rtol=0), k


def test_load_from_keeps_tensors_in_place():
    models = _models(torch.float32)
    fused = FusedModels(models)
    ptr = fused.params["fc.weight"].data_ptr()
    others = _models(torch.float32)
    with torch.no_grad():
        for m in others:
            m.fc.weight.fill_(0.5)
    fused.load_from(others)
    assert fused.params["fc.weight"].data_ptr() == ptr
    assert torch.all(fused.params["fc.weight"] == 0.5)
    assert fused.params["fc.weight"].is_leaf and fused.params["fc.weight"].requires_grad


def test_hsl_training_loss_under_map():
    """The HSL network (two encoders + MMoE) fuses as well (dropout off, so it can be compared)."""
    torch.manual_seed(0)
    models = [HSLModule(backbone="test_resnet", num_experts=4, proj_dim=64, expert_dropout=0.0, tower_dropout=0.0)
              for _ in range(N)]
    sequential = [copy.deepcopy(m) for m in models]
    g = torch.Generator().manual_seed(2)
    batch = dict(image=torch.rand(N, B, 1, 28, 28, generator=g), sat_image=torch.rand(N, B, 1, 28, 28, generator=g),
                 label=torch.randint(0, 2, (N, B), generator=g), sat_label=torch.randint(0, 2, (N, B), generator=g))
    fused = FusedModels(models)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    losses = fused.map(lambda m, b: m.training_loss(b)[0], batch)
    losses.sum().backward()
    opt.step()
    for i, m in enumerate(sequential):
        loss = m.training_loss({k: v[i] for k, v in batch.items()})[0]
        loss.backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        assert torch.allclose(losses[i], loss, atol=1e-5)
    _assert_states_close(fused, sequential, 1e-5)


def test_architecture_mismatch_is_a_clear_error():
    a = timm.create_model("test_resnet", in_chans=1, num_classes=1)
    b = timm.create_model("test_resnet", in_chans=1, num_classes=2)
    with pytest.raises(ValueError, match="differ in architecture.*fc.weight"):
        FusedModels([a, b])
    c = timm.create_model("resnet10t", in_chans=1, num_classes=1)
    with pytest.raises(ValueError, match="differ in architecture"):
        FusedModels([a, c])
    with pytest.raises(ValueError, match="at least one model"):
        FusedModels([])


def test_from_states_stacks_like_the_modules_and_the_optimizer_keeps_its_groups():
    models = _models(torch.float32)
    a, b = FusedModels(models), FusedModels.from_states(models[0], [m.state_dict() for m in models])
    assert a.params.keys() == b.params.keys() and a.buffers.keys() == b.buffers.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]) and b.params[k].requires_grad and b.params[k].is_leaf
    for k in a.buffers:
        assert torch.equal(a.buffers[k], b.buffers[k])
    with pytest.raises(ValueError, match="State 1 has no entry 'fc.bias'"):
        FusedModels.from_states(models[0], [models[0].state_dict(), {k: v for k, v in models[1].state_dict().items()
                                                                       if k != "fc.bias"}])

    m = models[0]
    head = [m.fc.weight, m.fc.bias]
    body = [p for p in m.parameters() if all(p is not h for h in head)]
    configured = torch.optim.AdamW([{"params": body}, {"params": head, "lr": 0.1, "weight_decay": 0.0}], lr=1e-3,
                                   weight_decay=0.05, fused=True)
    opt = b.optimizer_like(configured, m)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[1]["params"][0] is b.params["fc.weight"]
    other = timm.create_model("test_resnet", in_chans=1, num_classes=1)
    with pytest.raises(ValueError, match="not the module's own"):
        b.optimizer_like(torch.optim.SGD(other.parameters(), lr=0.1), m)


# --- the Federation with fuse_institutions: the same run as one institution after another
#
# (compared in float64 within TOLERANCE / LOSS_TOLERANCE: tests/float64.py says why)


def _federation(tmp_path, fuse, make, data, name, **kwargs):
    torch.manual_seed(0)
    model = make()
    kwargs = {"rounds": 2, "local_epochs": 2, "wandb": "disabled", "progress": False, "checkpoint": False, **kwargs}
    summary = Federation(run_dir=str(tmp_path / f"{name}-{fuse}"), fuse_institutions=fuse, **kwargs).fit(model, data)
    return summary, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _spy_groups(monkeypatch):
    """Record the trainees of every fused group."""
    groups, original = [], FusedRounds._train_group

    def spy(self, r, group, *args):
        groups.append(list(group))
        return original(self, r, group, *args)

    monkeypatch.setattr(FusedRounds, "_train_group", spy)
    return groups


def _classifier():
    return Classifier64(backbone="test_resnet").double()


def _classifier_sgd():
    return Classifier64(backbone="test_resnet", optimizer="sgd", lr=0.05, momentum=0.9).double()


def _hsl_sgd():  # no dropout: its masks are drawn for a fused group at once
    return HSL64(backbone="test_resnet", num_experts=4, proj_dim=64, expert_dropout=0.0, tower_dropout=0.0,
                 optimizer="sgd", lr=0.05, momentum=0.9).double()


# model, data, federation options, fused groups expected (one list per round)
FEDERATION_CASES = {
    # all three nodes have 48 training images: one group of three
    "fedavg_adamw": (_classifier, lambda: tiny_data(use_sat=False), {"strategy": "fedavg"}, [[0, 1, 2]] * 2),
    # HSL contributes each node's best of two epochs, chosen on validation AUC
    "hsl_sgd_best_epoch": (_hsl_sgd, tiny_data, {"strategy": "hsl", "contribute": "best"}, [[0, 1, 2]] * 2),
    # 36, 36 and 72 images: 1, 1 and 2 steps per epoch; nodes 0 and 1 idle while node 2 finishes
    "fedavg_unequal_epochs": (_classifier_sgd,
                              lambda: tiny_data(use_sat=False, scenario=Scenario(num_nodes=3, sizes=[1, 1, 2])),
                              {"strategy": "fedavg", "local_epochs": 3}, [[0, 1, 2]] * 2),
    # 2, 2 and 5 steps per epoch, best of two epochs: epochs end at different lockstep steps
    "hsl_unequal_best_epoch": (_hsl_sgd,
                               lambda: tiny_data(batch_size=16, scenario=Scenario(num_nodes=3, sizes=[1, 2, 4])),
                               {"strategy": "hsl", "contribute": "best"}, [[0, 1, 2]] * 2),
    # 20 and 12 images, batch 16: batches of 16 and of 12 cannot be stacked, so no group forms
    "fedavg_unstackable": (_classifier,
                           lambda: tiny_data(use_sat=False, batch_size=16, primary=SyntheticLesions(num_samples=54, size=28),
                                             scenario=Scenario(num_nodes=2, sizes=[5, 3])),
                           {"strategy": "fedavg"}, []),
}


def assert_same_run(a: dict, b: dict, state_a: dict, state_b: dict) -> None:
    """Two runs' results and final states agree within TOLERANCE."""
    assert b["best_round"] == a["best_round"]
    for na, nb in zip(a["nodes"], b["nodes"]):
        assert nb["test_auc"] == pytest.approx(na["test_auc"], abs=TOLERANCE)
    for ha, hb in zip(a["history"], b["history"]):
        for k, v in ha.items():
            if k.endswith("train_loss"):
                assert hb[k] == pytest.approx(v, abs=LOSS_TOLERANCE), k
    for k, v in state_a.items():
        difference = (state_b[k].double() - v.double()).abs().max()
        assert difference <= TOLERANCE, (k, difference)


@pytest.mark.slow  # the fast tier checks FusedModels itself: test_fused_matches_sequential_training
@pytest.mark.parametrize("case", list(FEDERATION_CASES))
def test_fused_federation_equals_one_by_one_training(tmp_path, monkeypatch, case):
    make, data, options, expected = FEDERATION_CASES[case]
    one_by_one, state_a = _federation(tmp_path, False, make, data(), case, **options)
    groups = _spy_groups(monkeypatch)
    fused, state_b = _federation(tmp_path, True, make, data(), case, **options)
    assert groups == expected  # one fused group per round (none when the batches cannot be stacked)
    assert_same_run(one_by_one, fused, state_a, state_b)
    assert fused["history"][0]["round_s"] > 0
    assert all(v.dtype != torch.float32 for v in state_b.values())  # the comparison ran in float64


def test_fused_federation_refuses_strategies_with_local_hooks():
    with pytest.raises(HSLError, match=r"cannot run strategy 'fedprox'.*local_loss.*It works with: hsl, fedavg"):
        Federation(strategy="fedprox", fuse_institutions=True)
    with pytest.raises(HSLError, match=r"'ditto'.*a personal model|'ditto'.*begin_personal"):
        Federation(strategy="ditto", fuse_institutions=True)


def test_fused_federation_refuses_a_non_elementwise_optimizer(tmp_path):
    class WithLBFGS(ClassifierModule):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(HSLError, match=r"fuse_institutions: LBFGS cannot train fused institutions.*AdamW"):
        _federation(tmp_path, True, lambda: WithLBFGS(backbone="test_resnet"), tiny_data(use_sat=False), "lbfgs",
                    strategy="fedavg")


@pytest.mark.slow
def test_a_diverging_fused_node_is_named_and_dropped_alone(tmp_path, monkeypatch):
    original = FusedModels.map

    def nan_for_node1(self, fn, *args, **kwargs):
        out = original(self, fn, *args, **kwargs)
        return out * torch.tensor([1.0, float("nan"), 1.0])

    monkeypatch.setattr(FusedModels, "map", nan_for_node1)
    with pytest.raises(HSLError, match=r"Training diverged at node node1, round 1, epoch 1"):
        _federation(tmp_path, True, _classifier, tiny_data(use_sat=False), "nan", strategy="fedavg")
    summary, _ = _federation(tmp_path, True, _classifier, tiny_data(use_sat=False), "nan_min", strategy="fedavg",
                             min_nodes=2)
    assert [h["dropped"] for h in summary["history"]] == [["node1"], ["node1"]]
    assert all(math.isfinite(h["node0/train_loss"]) and math.isfinite(h["node2/train_loss"])
               for h in summary["history"])


@pytest.mark.slow
def test_fused_on_two_ranks_equals_one_by_one_on_one(tmp_path):
    """Rank 0 fuses nodes 0 and 2, rank 1 trains node 1 alone: the same run as one rank, one by one."""
    one, state_a = _federation(tmp_path, False, _hsl_sgd, tiny_data(), "one_rank", strategy="hsl", threads=1)
    two, _ = _federation(tmp_path, True, _hsl_sgd, tiny_data(), "two_ranks", strategy="hsl", threads=1, devices=2)
    deployed = torch.load(tmp_path / "two_ranks-True" / "model.ckpt", weights_only=True)["state_dict"]
    one_rank = torch.load(tmp_path / "one_rank-False" / "model.ckpt", weights_only=True)["state_dict"]
    assert_same_run(one, two, one_rank, deployed)


# --- what a captured step relies on: in-place loads and optimizer resets (checked here on the CPU)
RESETTABLE = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw_amsgrad_fused": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, fused=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.3),
}


@pytest.mark.parametrize("name", list(RESETTABLE))
def test_reset_optimizer_state_in_place_equals_a_fresh_optimizer(name):
    from hsl_lightning.federation.fused import check_resettable, reset_optimizer_state

    make = RESETTABLE[name]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 5, generator=g)
    grads = [torch.randn(4, 5, generator=g) for _ in range(5)]

    def steps(param, opt, gs):
        for grad in gs:
            param.grad = grad.clone()
            opt.step()

    used = start.clone().requires_grad_()
    opt = make([used])
    check_resettable(opt)
    steps(used, opt, grads[:3])  # a round's worth of state
    memory = {k: v.data_ptr() for k, v in opt.state[used].items() if torch.is_tensor(v)}
    reset_optimizer_state(opt)
    with torch.no_grad():
        used.copy_(start)
    steps(used, opt, grads[3:])
    assert {k: v.data_ptr() for k, v in opt.state[used].items() if torch.is_tensor(v)} == memory  # same tensors
    fresh = start.clone().requires_grad_()
    steps(fresh, make([fresh]), grads[3:])
    assert torch.equal(used.detach(), fresh.detach())
    if name == "sgd":  # with no state to reset, a wrong reset can't show; the update itself must
        assert not torch.equal(used.detach(), start)


def test_check_resettable_refuses_what_a_reset_cannot_make_fresh():
    from hsl_lightning.federation.fused import check_resettable

    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="dampening"):
        check_resettable(torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1))
    with pytest.raises(ValueError, match="LBFGS cannot train fused"):
        check_resettable(torch.optim.LBFGS(p))


def test_load_states_in_place_equals_from_states():
    module = ClassifierModule(backbone="test_resnet")
    states = []
    for seed in range(4):
        torch.manual_seed(seed)
        states.append({k: torch.randn_like(v) if v.is_floating_point() else v + seed
                       for k, v in ClassifierModule(backbone="test_resnet").state_dict().items()})
    fused = FusedModels.from_states(module, states[:2])
    memory = {k: v.data_ptr() for k, v in {**fused.params, **fused.buffers}.items()}
    fused.load_states(module, states[2:])
    expected = FusedModels.from_states(module, states[2:])
    for name, t in {**fused.params, **fused.buffers}.items():
        assert t.data_ptr() == memory[name]
        assert torch.equal(t, {**expected.params, **expected.buffers}[name]), name
    # the same state for every institution (what FedAvg sends), and states of another dtype
    for loaded in ([states[0]] * 2, [{k: v.double() for k, v in st.items()} for st in states[:2]]):
        fused.load_states(module, loaded)
        expected = FusedModels.from_states(module, loaded)
        for name, t in {**fused.params, **fused.buffers}.items():
            assert t.data_ptr() == memory[name]
            assert torch.equal(t, {**expected.params, **expected.buffers}[name]), name
    with pytest.raises(ValueError, match="needs 2 states, got 3"):
        fused.load_states(module, states[:3])


def test_state_dict_views_follow_the_stacked_tensors():
    module = ClassifierModule(backbone="test_resnet")
    fused = FusedModels.from_states(module, [module.state_dict()] * 2)
    view, copy_ = fused.state_dicts([1], copy=False)[0], fused.state_dicts([1])[0]
    with torch.no_grad():
        fused.params["head.1.weight"].add_(1.0)
    assert torch.equal(view["head.1.weight"], fused.params["head.1.weight"][1])
    assert torch.equal(copy_["head.1.weight"] + 1.0, view["head.1.weight"])


def test_cuda_graphs_option_is_checked(tmp_path):
    with pytest.raises(HSLError, match="set federation.fuse_institutions to true"):
        Federation(cuda_graphs=True)
    with pytest.raises(HSLError, match="cuda_graphs needs a CUDA device; this rank runs on cpu"):
        _federation(tmp_path, True, _classifier, tiny_data(use_sat=False), "graphs_cpu", strategy="fedavg",
                    cuda_graphs=True)

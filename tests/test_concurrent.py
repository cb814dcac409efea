"""Institutions trained at the same time in threads (hsl_lightning.federation.concurrent) give the
result of training them one after another with the same threads per institution, bit for bit."""

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_classifier, tiny_data, tiny_hsl
from hsl_lightning import Federation
from hsl_lightning.inference.checkpoints import load
from hsl_lightning.errors import HSLError
from hsl_lightning.federation import randomness


def fit(tmp_path, name, strategy="hsl", model=None, data=None, **kwargs):
    torch.manual_seed(0)
    if model is None:
        model = tiny_hsl() if strategy == "hsl" else tiny_classifier(strategy)
    if data is None:
        data = tiny_data() if strategy == "hsl" else tiny_data(use_sat=False)
    options = {"rounds": 2, "local_epochs": 2, "run_dir": str(tmp_path / name), "wandb": "disabled",
               "progress": False, "checkpoint": False, **kwargs}
    return Federation(strategy=strategy, **options).fit(model, data)


def weights(run_dir):
    paths = sorted(run_dir.glob("nodes/*.ckpt")) or [run_dir / "model.ckpt"]
    return [load(p)[0].state_dict() for p in paths]


def same_run(a, b, dir_a, dir_b):
    for key in ("mean_test_auc", "mean_val_auc", "best_round"):
        assert a[key] == b[key], key
    for ha, hb in zip(a["history"], b["history"]):
        for key, value in ha.items():
            if key.endswith(("_loss", "_auc")):
                assert value == hb[key] or (value != value and hb[key] != hb[key]), key  # equal, or both NaN
    for sa, sb in zip(weights(dir_a), weights(dir_b)):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["hsl", "fedbn"])
def test_concurrent_equals_one_after_another(tmp_path, strategy):
    # HSL: dropout in its experts and towers, two trunks, the best epoch of each round chosen on
    # validation; FedBN: a model per node. Three nodes on two workers, one thread each.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        together = fit(tmp_path, "together", strategy, threads=2, concurrent_institutions=2)
    assert not [w for w in caught if "global generator" in str(w.message)]  # no fallback: trained at once
    assert together["institutions_at_once"] == 2 and together["threads_per_institution"] == 1
    apart = fit(tmp_path, "apart", strategy, threads=1, concurrent_institutions=1)
    assert apart["institutions_at_once"] == 1 and apart["threads_per_institution"] == 1
    same_run(together, apart, tmp_path / "together", tmp_path / "apart")


@pytest.mark.slow
def test_default_trains_at_once_where_the_strategy_can(tmp_path):
    assert fit(tmp_path, "hsl", rounds=1, local_epochs=1, threads=2)["institutions_at_once"] == 2
    # a proximal term keeps the node's anchor in the strategy: one after another, on both threads
    summary = fit(tmp_path, "prox", "fedprox", rounds=1, local_epochs=1, threads=2)
    assert summary["institutions_at_once"] == 1 and summary["threads_per_institution"] == 2


def test_dropout_draws_as_torch_does():
    randomness.install_dropout()
    try:
        for shape, p, inplace in [((32, 64), 0.3, False), ((5, 3, 7), 0.5, False), ((16, 40), 0.4, True)]:
            x = torch.randn(shape, requires_grad=True)
            torch.manual_seed(7)
            expected = [randomness._original(x.clone() if inplace else x, p, True, inplace) for _ in range(2)]
            grad_expected, = torch.autograd.grad(sum(e.sum() for e in expected * 2) + (expected[0] ** 2).sum(), x)
            out = {}

            def worker():
                randomness.mark_worker()
                randomness.seed_trainee(7)
                out["y"] = [F.dropout(x.clone() if inplace else x, p, True, inplace) for _ in range(2)]

            before = randomness.global_state()
            thread = threading.Thread(target=worker)
            thread.start()
            thread.join()
            assert torch.equal(before, randomness.global_state())  # the worker left the global generator alone
            got = out["y"]
            grad_got, = torch.autograd.grad(sum(g.sum() for g in got * 2) + (got[0] ** 2).sum(), x)
            assert all(torch.equal(e, g) for e, g in zip(expected, got))
            assert torch.equal(grad_expected, grad_got)
        # outside worker threads, dropout is torch's
        torch.manual_seed(3)
        a = F.dropout(torch.ones(100), 0.5)
        torch.manual_seed(3)
        assert torch.equal(a, randomness._original(torch.ones(100), 0.5))
    finally:
        randomness.remove_dropout()
    assert F.dropout is randomness._original


@pytest.mark.slow
def test_global_draws_fall_back_to_one_after_another(tmp_path):
    def model():  # noise from torch's global generator in training: not covered by the workers' generators
        torch.manual_seed(0)
        m = tiny_classifier("fedavg")
        m.encoder.register_forward_pre_hook(
            lambda mod, args: (args[0] + 0.01 * torch.randn(args[0].shape),) if mod.training else None)
        return m

    with pytest.warns(UserWarning, match="global generator outside dropout"):
        together = fit(tmp_path, "together", "fedavg", model=model(), threads=1, concurrent_institutions=2)
    assert together["institutions_at_once"] == 1
    apart = fit(tmp_path, "apart", "fedavg", model=model(), threads=1, concurrent_institutions=1)
    same_run(together, apart, tmp_path / "together", tmp_path / "apart")


@pytest.mark.parametrize("options, message", [
    ({"strategy": "fedprox", "concurrent_institutions": 2}, "keeps the state of an institution's local training"),
    ({"strategy": "fedavg", "concurrent_institutions": 2, "fuse_institutions": True}, "already trains"),
    ({"strategy": "fedavg", "concurrent_institutions": 0}, "at least 1"),
    ({"strategy": "fedavg", "concurrent_institutions": 2, "accelerator": "cuda"}, "CPU threads"),
])
def test_refused(options, message):
    with pytest.raises(HSLError, match=message):
        Federation(**options)

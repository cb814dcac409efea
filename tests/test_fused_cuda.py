"""CUDA graphs of the fused step (Federation(cuda_graphs=True)) against the same step run eagerly.

These need a CUDA device and skip elsewhere (CI has none): what they rely on that a CPU can check
(in-place loads, in-place optimizer resets, the fused Federation against one-by-one training) is in
test_fused.py. Run them on a GPU machine: ``python -m pytest -q tests/test_fused_cuda.py``.
"""

import pytest
import torch

from hsl_lightning import ClassifierModule, Federation
from hsl_lightning.federation.fused import FusedTrainer

from conftest import tiny_data, tiny_hsl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _states(n, seed):
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append({k: v.cuda() for k, v in ClassifierModule(backbone="test_resnet").state_dict().items()})
    return out


def _batches(steps, n=3, b=8):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(n, b, 1, 28, 28, generator=g).cuda(),
             "label": torch.randint(0, 2, (n, b), generator=g).cuda()} for _ in range(steps)]


# eps 1e-3 for Adam: with torch's 1e-8, a gradient at rounding-noise level (where the eager and the
# captured kernels, timed by cuDNN at capture, may round differently) becomes a step of size lr.
# foreach AdamW is capturable on both sides: torch's capturable update is arranged differently (the
# same arithmetic, rounded differently, which Adam magnifies likewise); the fused kernel is one.
OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-3, fused=True),  # the modules' default kind
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-3, foreach=True, capturable=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_graph_replay_equals_eager_across_rounds_and_masks(optimizer):
    module = ClassifierModule(backbone="test_resnet").cuda()

    def loss(m, batch):
        return m.training_step(batch, 0)

    masks = [[True, True, True], [True, False, True], [True, False, False]]
    trainers = {graph: FusedTrainer(module, _states(3, 0), OPTIMIZERS[optimizer](module.parameters()), loss,
                                    cuda_graph=graph) for graph in (False, True)}
    results = {}
    for graph, trainer in trainers.items():
        losses = []
        for rnd, seed in enumerate((0, 10)):
            if rnd:
                trainer.load(module, _states(3, seed))  # a new round: new weights, fresh optimizer state
            for k, batch in enumerate(_batches(4)):
                mask = torch.tensor(masks[min(k, 2)], device="cuda")
                losses.append(trainer.step(batch, mask).clone())
        results[graph] = (torch.stack(losses), trainer.fused.state_dicts())
    assert trainers[True].graph is not None, trainers[True].graph_error  # captured, not fallen back
    assert trainers[False].graph is None
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-4)
    for eager, graphed in zip(results[False][1], results[True][1]):
        for k, v in eager.items():
            torch.testing.assert_close(graphed[k], v, atol=1e-5, rtol=1e-4, msg=k)


def _fit(tmp_path, name, make, data, graphs, **kwargs):
    torch.manual_seed(0)
    model = make()
    options = {"rounds": 2, "local_epochs": 2, "wandb": "disabled", "progress": False, "checkpoint": False,
               "accelerator": "gpu", "devices": 1, "fuse_institutions": True, **kwargs}
    summary = Federation(run_dir=str(tmp_path / f"{name}-{graphs}"), cuda_graphs=graphs, **options).fit(model, data)
    return summary, torch.load(tmp_path / f"{name}-{graphs}" / "model.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("case", ["fedavg_unequal", "hsl_best_epoch"])
def test_federation_with_cuda_graphs_equals_eager_fused(tmp_path, case):
    from hsl_lightning import Scenario

    if case == "fedavg_unequal":  # 1, 1 and 2 steps per epoch: idle slices inside the graph
        make = lambda: ClassifierModule(backbone="test_resnet", optimizer="sgd", lr=0.05, momentum=0.9)  # noqa: E731
        data = lambda: tiny_data(use_sat=False, scenario=Scenario(num_nodes=3, sizes=[1, 1, 2]))  # noqa: E731
        options = {"strategy": "fedavg", "local_epochs": 3}
    else:
        make = lambda: tiny_hsl(expert_dropout=0.0, tower_dropout=0.0)  # noqa: E731 - AdamW, the default
        data, options = tiny_data, {"strategy": "hsl", "contribute": "best"}
    eager, state_a = _fit(tmp_path, case, make, data(), False, **options)
    graphed, state_b = _fit(tmp_path, case, make, data(), True, **options)
    for a, b in zip(eager["nodes"], graphed["nodes"]):
        assert b["test_auc"] == pytest.approx(a["test_auc"], abs=1e-3)
    for k, v in state_a.items():
        torch.testing.assert_close(state_b[k].double(), v.double(), atol=1e-4, rtol=1e-3, msg=k)

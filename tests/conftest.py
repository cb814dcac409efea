import os
from pathlib import Path

import pytest

# Tests never touch the network: no hub downloads, W&B offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# OpenMP threads that wait for work sleep instead of spinning (set before any test imports torch; inherited
# by every process a test starts). Two workers and the processes of the deployment test share two cores;
# spinning threads took the cores from them (three of the heaviest test files: 86 s on 2 workers, 69 s with this).
# Only the waiting changes: thread counts, and so every result, stay as they were.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing here imports torch: pytest's own process (which, under -n, only hands tests to the workers)
# starts in a moment instead of spending seconds importing torch, Lightning and timm.

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = Path(os.environ.get("HSL_TEST_MEDMNIST", REPO.parent / "shared" / "data" / "medmnist"))


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    """The official MedMNIST files beside the project; their absence is a failure, not a skip."""
    assert (MEDMNIST / "breastmnist.npz").is_file(), (
        f"MedMNIST files not found in {MEDMNIST}: the suite needs ../shared/data/medmnist "
        "(or HSL_TEST_MEDMNIST pointing at a folder with breastmnist.npz and pneumoniamnist.npz)."
    )
    return MEDMNIST


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory):
    """configs/benchmarks/smoke.yaml run once for the whole session (tests/test_benchmark.py's smoke
    grid test reads it): its output folder and what ``hsl benchmark`` printed. A test that changes the folder
    works on a copy (shutil.copytree)."""
    import contextlib
    import io

    from hsl_lightning.cli import main

    out = tmp_path_factory.mktemp("smoke_grid") / "smoke"
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(REPO)  # the grid names its configs relative to the repository
    try:
        with contextlib.redirect_stdout(printed):
            main(["benchmark", "--config", str(REPO / "configs" / "benchmarks" / "smoke.yaml"), "--out", str(out),
                  "--wandb", "disabled"])
    finally:
        os.chdir(cwd)
    return out, printed.getvalue()


def tiny_data(**overrides):
    """A small synthetic federation that trains in seconds."""
    from hsl_lightning import FederatedDataModule, Scenario, SyntheticAnchor, SyntheticLesions

    kwargs = dict(primary=SyntheticLesions(num_samples=240, size=28), sat=SyntheticAnchor(num_samples=160, size=28),
                  scenario=Scenario(num_nodes=3, feature_skew=0.3), batch_size=32, splits="pooled")
    kwargs.update(overrides)
    return FederatedDataModule(**kwargs)


def tiny_classifier(strategy: str = "fedavg", **overrides):
    """A small single-task model, with the plain SGD that SCAFFOLD requires when it is for scaffold."""
    from hsl_lightning import ClassifierModule

    kwargs = dict(backbone="test_resnet")
    if strategy == "scaffold":
        kwargs.update(optimizer="sgd", lr=0.05, weight_decay=0.0)
    kwargs.update(overrides)
    return ClassifierModule(**kwargs)


def tiny_hsl(**overrides):
    from hsl_lightning import HSLModule

    kwargs = dict(backbone="test_resnet", num_experts=4, proj_dim=64)
    kwargs.update(overrides)
    return HSLModule(**kwargs)


def pytest_collection_modifyitems(config, items):
    """The longest tests first: the one Flower deployment (tests/test_flower_deploy.py, mostly waiting on
    Flower's polling), then the other slow tests, then the rest, each in its file order. Under ``-n 2``
    the workers then end together instead of one waiting out a long test started last."""
    def rank(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_flower_deploy.py" else 1

    items.sort(key=rank)  # stable: file order within each rank

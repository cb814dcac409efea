import os
from pathlib import Path

import pytest

# Tests never touch the network: no hub downloads, W&B offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

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


def tiny_data(**overrides):
    """A small synthetic federation that trains in seconds."""
    from hsl_lightning import FederatedDataModule, Scenario, SyntheticAnchor, SyntheticLesions

    kwargs = dict(primary=SyntheticLesions(num_samples=240, size=28), sat=SyntheticAnchor(num_samples=160, size=28),
                  scenario=Scenario(num_nodes=3, feature_skew=0.3), batch_size=32, splits="pooled")
    kwargs.update(overrides)
    return FederatedDataModule(**kwargs)


def tiny_hsl(**overrides):
    from hsl_lightning import HSLModule

    kwargs = dict(backbone="test_resnet", num_experts=4, proj_dim=64)
    kwargs.update(overrides)
    return HSLModule(**kwargs)

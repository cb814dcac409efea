import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Tests never touch the network: no hub downloads, W&B offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from hsl_lightning import ClassifierModule, HSLModule  # noqa: E402 - after the environment above

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
    """configs/benchmarks/smoke.yaml run once for the whole session (test_benchmark and test_powered
    read it): its output folder and what ``hsl benchmark`` printed. A test that changes the folder
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


# Runs that must agree but take different float paths (fused training runs a grouped convolution
# where one-by-one training runs N plain ones; one rank and two add contributions in another
# order) agree up to float rounding, which training amplifies: in float32 a train loss came out
# 1.5e-5 apart on one 2-core machine, and a node's test AUC one pair of images apart on another.
# So such comparisons compute in float64 end to end, loss included (Classifier64, HSL64 below):
# float64 rounding (u = 1.1e-16), even amplified a million-fold by a test's few dozen steps, stays
# under TOLERANCE for weights and AUCs. A reported train loss is an epoch's step losses summed in
# float32 by the Federation, which the two paths reach by different casts (one rounding more when
# fused): at most 2 float32 roundings (2^-24 each) per step of at most 5 steps, relative to a loss
# under 1, hence LOSS_TOLERANCE. The errors these comparisons guard against (a trainee taking one
# step more or less, an idle step reaching a trainee, another batch, another epoch's state or loss)
# move weights and losses by 1e-4 or more. Measured here (2-core machine, 2026-11-29): weights within
# 1e-14, losses within 6e-8 (the float32 runs they replace: 1.5e-5 apart on another machine).
TOLERANCE = 1e-9
LOSS_TOLERANCE = 1e-6


def _float64(batch: dict) -> dict:
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}


class Classifier64(ClassifierModule):
    """The classifier in float64 (convert it with .double()): batches cast on the way in, loss in float64."""

    def training_loss(self, batch):
        return F.binary_cross_entropy_with_logits(self(batch["image"].double()), batch["label"].double()), {}

    def primary_logits(self, batch):
        return self(batch["image"].double())


class HSL64(HSLModule):
    """HSLModule in float64 (convert it with .double()): its training loss with both BCE terms in float64."""

    def training_loss(self, batch):
        batch = _float64(batch)
        out = self.net(batch["image"], batch["sat_image"])
        primary = F.binary_cross_entropy_with_logits(out.primary_logit, batch["label"].double())
        sat = F.binary_cross_entropy_with_logits(out.sat_logit, batch["sat_label"].double())
        return self.primary_weight * primary + self.sat_weight * sat, {}

    def primary_logits(self, batch, *args, **kwargs):
        return super().primary_logits(_float64(batch), *args, **kwargs)



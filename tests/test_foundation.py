import pytest
import timm
import torch

from hsl_lightning import FoundationProbe, HSLError
from hsl_lightning.federation import Federation
from hsl_lightning.models import backbones

from conftest import tiny_data


@pytest.fixture
def weights_file(tmp_path):
    """A pretrained-weights file written by the test itself (stands in for a downloaded CLIP tower)."""
    torch.manual_seed(7)
    source = timm.create_model("test_vit", num_classes=0, in_chans=1)
    path = tmp_path / "test_vit.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_probe_loads_the_local_file_and_freezes_the_encoder(weights_file):
    path, expected = weights_file
    probe = FoundationProbe(backbone="test_vit", in_chans=1, weights=str(path))
    for key, value in expected.items():
        assert torch.equal(probe.encoder.trunk.state_dict()[key], value), key
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    assert all(p.requires_grad for p in probe.head.parameters())
    probe.train()
    assert not probe.encoder.training  # frozen means no BatchNorm/dropout updates either
    trained = {id(p) for group in probe.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for p in probe.head.parameters()}


@pytest.mark.slow
def test_federated_probe_shares_only_the_head_and_leaves_the_encoder_untouched(tmp_path, weights_file):
    path, expected = weights_file
    probe = FoundationProbe(backbone="test_vit", in_chans=1, weights=str(path))
    head_bytes = sum(v.numel() * v.element_size() for k, v in probe.state_dict().items() if k.startswith("head."))
    summary = Federation(strategy="foundation", rounds=1, run_dir=str(tmp_path / "run"), wandb="disabled",
                         progress=False).fit(probe, tiny_data(use_sat=False, image_size=32))
    assert summary["bytes_sent_per_node_per_round"] == head_bytes
    for key, value in expected.items():
        assert torch.equal(probe.encoder.trunk.state_dict()[key], value), key


def test_offline_without_a_weights_file_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    # As on a user's machine without HF_HUB_OFFLINE: the hub client would retry for about a minute.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "_hub_reachable", lambda timeout=3.0: False)
    create, offline_during_load = backbones.timm.create_model, []

    def create_model(*args, **kwargs):
        offline_during_load.append(constants.HF_HUB_OFFLINE)
        return create(*args, **kwargs)

    monkeypatch.setattr(backbones.timm, "create_model", create_model)
    with pytest.raises(HSLError, match="offline.*--model.weights"):
        FoundationProbe(backbone="test_vit", in_chans=1)
    # no retries against an unreachable hub: timm looked up the weights with the hub client cache-only
    assert offline_during_load == [True]
    assert constants.HF_HUB_OFFLINE is False  # the switch is undone


def test_foundation_strategy_needs_a_frozen_encoder(tmp_path):
    from hsl_lightning import ClassifierModule

    with pytest.raises(HSLError, match="FoundationProbe"):
        Federation(strategy="foundation", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
            ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False))

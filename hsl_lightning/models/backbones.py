"""Image encoders from timm, by name.

Any ``timm`` model name works (``timm.list_models()`` lists them). Weights come from the
Hugging Face hub (``pretrained=True``, needs internet) or from a local file (``weights=PATH``,
``.pth``/``.safetensors``, loaded by timm itself so channel adaptation works as for hub weights).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from hsl_lightning.errors import HSLError, suggest


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(active: bool):
    """Cache-only hub look-ups for the duration (huggingface_hub reads its offline flag at import,
    so the module constant is switched, not only the environment variable)."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _check_name(name: str) -> None:
    arch = name.split(".", 1)[0]  # 'resnet18.a1_in1k' -> architecture 'resnet18' + weight tag
    if not timm.is_model(arch):
        raise HSLError(
            f"Unknown backbone '{name}': timm has no model of that name."
            f"{suggest(arch, timm.list_models())} List all with `python -c \"import timm; print(timm.list_models())\"`."
        )


class Backbone(nn.Module):
    """A timm trunk without classifier that maps images in [0, 1] to a pooled feature vector.

    Inputs are normalised with the mean/std of the backbone's pretraining (averaged over colour
    channels when ``in_chans`` differs from 3), so the same [0, 1] tensors work for random and
    pretrained weights.

    Args:
        name: any timm model name, e.g. ``resnet18``, ``efficientnet_b0`` (``test_resnet``: timm's
            0.37 M-parameter test trunk); the models' ``backbone``.
        in_chans: image channels (1 grey, 3 RGB); the CLI sets the models' from the data.
        pretrained: start from timm's pretrained weights (downloaded from the hub when online).
        weights: a local ``.pth`` or ``.safetensors`` file of pretrained weights (offline).
        drop_rate: timm's classifier dropout, here on the pooled features.
    """

    def __init__(self, name: str = "resnet18", in_chans: int = 1, pretrained: bool = False,
                 weights: str | None = None, drop_rate: float = 0.0):
        super().__init__()
        _check_name(name)
        kwargs: dict = dict(num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise HSLError(f"Backbone weights file not found: {path}. Pass an existing .pth or .safetensors file.")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        else:
            kwargs.update(pretrained=pretrained)
        offline_now = pretrained and weights is None and os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_reachable()
        try:
            # Unreachable hub: look in the local cache only, so a missing file fails at once instead of
            # after the hub client's retries.
            with _hub_offline(offline_now):
                self.trunk = timm.create_model(name, **kwargs)
        except Exception as exc:  # timm/hub raise many types; the user needs the cause and the way out
            if weights is not None:
                raise HSLError(f"Could not load backbone weights for '{name}' from {weights}: {exc}") from exc
            if pretrained:
                offline = offline_now or os.environ.get("HF_HUB_OFFLINE") == "1"
                raise HSLError(
                    f"Could not fetch pretrained weights for '{name}' from the hub"
                    f"{' (offline: the hub is unreachable or HF_HUB_OFFLINE=1)' if offline else ''}: {exc}. "
                    "Without internet, download them elsewhere and pass --model.weights PATH, or use pretrained=false."
                ) from exc
            raise HSLError(f"timm could not build '{name}' with in_chans={in_chans}: {exc}") from exc
        self.num_features = self.trunk.num_features
        cfg = getattr(self.trunk, "pretrained_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32)
        if in_chans != len(mean):
            mean, std = mean.mean().repeat(in_chans), std.mean().repeat(in_chans)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.in_chans = in_chans

    def feature_levels(self) -> list[nn.Module]:
        """The trunk's stem and stages as timm lists them (``feature_info``), for multi-level losses."""
        info = getattr(self.trunk, "feature_info", None)
        if not info:
            raise HSLError(f"backbone {type(self.trunk).__name__} lists no feature levels (timm feature_info).")
        return [self.trunk.get_submodule(f["module"]) for f in info]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise HSLError(
                f"Backbone expects images shaped (batch, {self.in_chans}, H, W), got {tuple(x.shape)}. "
                "Set model in_chans to the data's channel count."
            )
        return self.trunk((x - self.mean) / self.std)


def create_backbone(name: str = "resnet18", in_chans: int = 1, pretrained: bool = False,
                    weights: str | None = None, drop_rate: float = 0.0) -> Backbone:
    """Build a feature extractor from a timm model name (see :class:`Backbone`)."""
    return Backbone(name, in_chans=in_chans, pretrained=pretrained, weights=weights, drop_rate=drop_rate)

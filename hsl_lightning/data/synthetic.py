"""Synthetic multi-centre data, generated in memory in about a second: the embedded default.

Primary task (``SyntheticLesions``), an ultrasound-like malignancy task: a dark nodule in
speckled, textured tissue; benign nodules have smooth, oval margins, malignant ones irregular,
lobulated margins (the margin is the only class cue). Shared Anchor Task
(``SyntheticAnchor``), a chest-film-like task: two dark lung fields in a brighter body; positive
films carry a patchy opacity inside a lung. Both are balanced and seeded. Per-node "scanner"
differences are not baked in here: they come from the scenario's feature skew, as for real data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hsl_lightning.data.base import ImageSet, Source
from hsl_lightning.errors import HSLError


def _grid(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x.expand(n, size, size), y.expand(n, size, size)


def _smooth_noise(n: int, size: int, scale: int, g: torch.Generator) -> torch.Tensor:
    """Low-frequency texture in about [-1, 1]: coarse noise upsampled bicubically."""
    coarse = torch.randn(n, 1, max(2, size // scale), max(2, size // scale), generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).squeeze(1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)


def _balanced_labels(n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.arange(n) % 2)[torch.randperm(n, generator=g)]


def lesion_images(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """The primary task's nodules (uint8, one channel, ``size`` x ``size``): malignant (label 1) with lobulated
    margins, benign with smooth oval ones."""
    n = labels.shape[0]
    x, y = _grid(n, size)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    cx, cy, r0 = u(-0.25, 0.25), u(-0.2, 0.2), u(0.3, 0.45)
    rho = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    theta = torch.atan2(y - cy, x - cx)
    # Oval shape for everyone; malignant margins add high-frequency lobulation.
    ellipse = u(0.0, 0.25) * torch.cos(2 * (theta - u(0, math.pi)))
    freq = torch.randint(4, 9, (n, 1, 1), generator=g).float()
    lobes = u(0.15, 0.32) * torch.sin(freq * theta + u(0, 2 * math.pi))
    lobes = lobes + 0.5 * u(0.05, 0.15) * torch.sin((freq + 3) * theta + u(0, 2 * math.pi))
    margin = r0 * (1 + ellipse + labels.view(n, 1, 1).float() * lobes)
    mask = torch.sigmoid((margin - rho) / 0.035)
    tissue = 0.55 + 0.12 * _smooth_noise(n, size, 4, g) + 0.05 * _smooth_noise(n, size, 2, g)
    nodule = 0.18 + 0.05 * _smooth_noise(n, size, 3, g)
    img = tissue * (1 - mask) + nodule * mask
    speckle = 1 + 0.15 * torch.randn(n, size, size, generator=g)
    return _to_uint8(img * speckle)


def anchor_images(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """The Shared Anchor Task's chest films (uint8, one channel): positives (label 1) carry a patchy opacity inside
    a lung."""
    n = labels.shape[0]
    x, y = _grid(n, size)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    body = 0.75 + 0.05 * _smooth_noise(n, size, 4, g)
    lungs = torch.zeros(n, size, size)
    for side in (-1.0, 1.0):
        cx, cy = side * u(0.35, 0.45), u(-0.1, 0.05)
        d = ((x - cx) / u(0.25, 0.32)) ** 2 + ((y - cy) / u(0.55, 0.7)) ** 2
        lungs = torch.maximum(lungs, torch.sigmoid((1 - d) / 0.08))
    img = body * (1 - 0.7 * lungs)
    # Opacity: a soft blob inside one lung field, present only on positive films.
    side = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    bx, by = side * u(0.3, 0.5), u(-0.35, 0.3)
    blob = torch.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * u(0.1, 0.18) ** 2))
    blob = blob * (0.7 + 0.3 * _smooth_noise(n, size, 3, g)).clamp(0, 1)
    img = img + labels.view(n, 1, 1).float() * u(0.25, 0.4) * blob * lungs
    img = img + 0.04 * torch.randn(n, size, size, generator=g)
    return _to_uint8(img)


class _Synthetic(Source):
    channels = 1
    _draw = None

    def __init__(self, num_samples: int = 2000, size: int = 32, seed: int = 0):
        name = type(self).__name__
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 4:
            raise HSLError(f"{name} num_samples must be an integer of at least 4 (two per class), got {num_samples!r}.")
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
            raise HSLError(f"{name} size must be an integer number of pixels from 16 to 1024, got {size!r}.")
        self.num_samples, self.size, self.seed = num_samples, size, seed

    def describe(self) -> str:
        return f"{type(self).__name__} ({self.num_samples} images, {self.size}px)"

    def load(self, root: str | None = None) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        labels = _balanced_labels(self.num_samples, g)
        return {"all": ImageSet(type(self)._draw(labels, self.size, g), labels)}


class SyntheticLesions(_Synthetic):
    """Primary task: smooth (benign, 0) vs irregular (malignant, 1) nodule margins.

    Args:
        num_samples: images generated (balanced classes).
        size: image side in px.
        seed: the generator's seed.
    """

    _draw = staticmethod(lesion_images)

    def __init__(self, num_samples: int = 2400, size: int = 32, seed: int = 0):
        super().__init__(num_samples, size, seed)


class SyntheticAnchor(_Synthetic):
    """Shared Anchor Task: chest-film-like images with (1) or without (0) a lung opacity.

    Args:
        num_samples: images generated (balanced classes).
        size: image side in px.
        seed: the generator's seed.
    """

    _draw = staticmethod(anchor_images)

    def __init__(self, num_samples: int = 2000, size: int = 32, seed: int = 1):
        super().__init__(num_samples, size, seed)

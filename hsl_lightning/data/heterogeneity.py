"""Simulated heterogeneity between institutions: what each node's data looks like.

- Feature skew: each node's images pass through its own simulated acquisition
  (:class:`Acquisition`: gain, contrast, gamma, speckle, Gaussian noise, blur, resolution).
- Label skew: a positive rate per node (``prevalence``) or Dirichlet(alpha) class shares.
- Quantity skew: relative node sizes (``sizes``).
Combined heterogeneity is all of them at once. Everything is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsl_lightning.data.base import stored, unit
from hsl_lightning.errors import HSLError


@dataclass
class Acquisition:
    """A simulated scanner/protocol, applied to images in [0, 1]. Identity by default.

    gain: intensity multiplier; contrast: stretch about mid-grey; gamma: x ** gamma;
    speckle: std of multiplicative noise; noise: std of additive Gaussian noise;
    blur: Gaussian sigma in pixels; resolution: fraction of the native resolution kept
    (images are down- and up-sampled).
    """

    gain: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    speckle: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    resolution: float = 1.0

    @staticmethod
    def random(strength: float, g: torch.Generator) -> "Acquisition":
        """A random scanner; ``strength`` in [0, 1] scales how far it departs from the identity."""
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
        s = strength
        return Acquisition(
            gain=1 + s * u(-0.3, 0.3), contrast=1 + s * u(-0.4, 0.4), gamma=math.exp(s * u(-0.5, 0.5)),
            speckle=s * u(0.0, 0.2), noise=s * u(0.0, 0.05), blur=s * u(0.0, 0.8), resolution=1 - s * u(0.0, 0.4),
        )

    def apply(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Stored images (N, C, H, W), uint8 or uint16 -> the same dtype and shape."""
        if self == Acquisition():
            return images
        x = unit(images)
        h, w = x.shape[-2:]
        if self.resolution < 1:
            small = (max(4, round(h * self.resolution)), max(4, round(w * self.resolution)))
            x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if self.blur > 0:
            x = _gaussian_blur(x, self.blur)
        x = ((x - 0.5) * self.contrast + 0.5) * self.gain
        x = x.clamp(0, 1) ** self.gamma
        if self.speckle > 0:
            x = x * (1 + self.speckle * torch.randn(x.shape, generator=g))
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=g)
        return stored(x, images.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@dataclass
class Scenario:
    """How the simulated institutions differ.

    Args:
        num_nodes: number of institutions.
        names: node names (default node0, node1, ...).
        sizes: relative node sizes (quantity skew), e.g. [4, 2, 1]; default equal.
        prevalence: positive rate per node (label skew), e.g. [0.2, 0.5, 0.8]; default: the pool's.
            Counts are scaled down together if the pool lacks positives or negatives for them.
        dirichlet_alpha: label skew by Dirichlet(alpha) class shares instead of ``prevalence``
            (the usual FL benchmark recipe; sizes then follow from the draw).
        acquisition: one scanner per node (feature skew).
        feature_skew: when ``acquisition`` is not given, random scanners of this strength in [0, 1]
            (0 = identical scanners).
        eval_sizes: relative sizes of the nodes' validation and test sets (default: ``sizes``);
            e.g. ``[1, 1]`` keeps evaluation sets equal while a quantity sweep shrinks one node's
            training set.
    """

    num_nodes: int = 3
    names: list[str] | None = None
    sizes: list[float] | None = None
    prevalence: list[float] | None = None
    dirichlet_alpha: float | None = None
    acquisition: list[Acquisition] | None = None
    feature_skew: float = 0.0
    eval_sizes: list[float] | None = None

    def __post_init__(self):
        if self.num_nodes < 1:
            raise HSLError(f"scenario.num_nodes must be at least 1, got {self.num_nodes}.")
        for key in ("names", "sizes", "prevalence", "acquisition", "eval_sizes"):
            value = getattr(self, key)
            if value is not None and len(value) != self.num_nodes:
                raise HSLError(f"scenario.{key} has {len(value)} entries but num_nodes is {self.num_nodes}.")
        for key in ("sizes", "eval_sizes"):
            if getattr(self, key) is not None and min(getattr(self, key)) <= 0:
                raise HSLError(f"scenario.{key} must all be positive, got {getattr(self, key)}.")
        if self.prevalence is not None and not all(0 <= p <= 1 for p in self.prevalence):
            raise HSLError(f"scenario.prevalence values must lie in [0, 1], got {self.prevalence}.")
        if self.prevalence is not None and self.dirichlet_alpha is not None:
            raise HSLError("scenario: give either prevalence or dirichlet_alpha for label skew, not both.")
        if self.dirichlet_alpha is not None and self.eval_sizes is not None:
            raise HSLError("scenario.eval_sizes cannot be combined with dirichlet_alpha (Dirichlet draws set the sizes).")
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise HSLError(f"scenario.dirichlet_alpha must be positive, got {self.dirichlet_alpha}.")
        if not 0 <= self.feature_skew <= 1:
            raise HSLError(f"scenario.feature_skew must lie in [0, 1], got {self.feature_skew}.")

    @property
    def node_names(self) -> list[str]:
        """The nodes' names: ``names`` when given, else node0, node1, ..."""
        return list(self.names) if self.names else [f"node{i}" for i in range(self.num_nodes)]

    def scanners(self, g: torch.Generator, num_nodes: int | None = None) -> list[Acquisition]:
        """One scanner per node (``num_nodes`` overrides the count, for sources split by institution)."""
        n = self.num_nodes if num_nodes is None else num_nodes
        if self.acquisition is not None:
            if len(self.acquisition) != n:
                raise HSLError(f"scenario.acquisition lists {len(self.acquisition)} scanners for {n} nodes.")
            return list(self.acquisition)
        return [Acquisition.random(self.feature_skew, g) if self.feature_skew > 0 else Acquisition() for _ in range(n)]

    def label_shares(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each node's share of the positives and of the negatives under Dirichlet label skew (None
        otherwise); draw once and pass to :meth:`class_counts` for every split of the same world."""
        if self.dirichlet_alpha is None:
            return None
        return _dirichlet(self.num_nodes, self.dirichlet_alpha, g), _dirichlet(self.num_nodes, self.dirichlet_alpha, g)

    def class_counts(self, n_pos: int, n_neg: int, g: torch.Generator, evaluation: bool = False,
                     shares: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[tuple[int, int]]:
        """(positives, negatives) per node drawn from a pool with ``n_pos``/``n_neg`` samples
        (``evaluation``: for a validation / test split, sized by ``eval_sizes`` when given;
        ``shares``: Dirichlet shares from :meth:`label_shares`, drawn here when not given)."""
        k = self.num_nodes
        if self.dirichlet_alpha is not None:
            pos, neg = shares if shares is not None else self.label_shares(g)
            return list(zip(_split_counts(n_pos, pos), _split_counts(n_neg, neg)))
        relative = self.eval_sizes if evaluation and self.eval_sizes else self.sizes
        sizes = torch.tensor(relative if relative else [1.0] * k, dtype=torch.float64)
        sizes = sizes / sizes.sum()
        if self.prevalence is None:
            return list(zip(_split_counts(n_pos, sizes), _split_counts(n_neg, sizes)))
        p = torch.tensor(self.prevalence, dtype=torch.float64)
        total = n_pos + n_neg
        want_pos, want_neg = sizes * total * p, sizes * total * (1 - p)
        scale = min(1.0, n_pos / max(float(want_pos.sum()), 1e-9), n_neg / max(float(want_neg.sum()), 1e-9))
        return [(int(a), int(b)) for a, b in zip((want_pos * scale).floor(), (want_neg * scale).floor())]


@dataclass
class ExternalSite:
    """An institution that never trains, for an external test (the HSL paper's unseen pediatric
    cohort): it holds ``fraction`` of every split of the primary source, drawn at its own positive
    rate ``prevalence`` (default: the split's) before the nodes are partitioned, so its images are
    disjoint from every node's, and seen through its own random scanner of strength ``feature_skew``
    (drawn from a generator of its own: the nodes' scanners are those of a run without it).

    Args:
        name: how results name it.
        fraction: share of each split's images it takes, in (0, 1).
        prevalence: its positive rate in [0, 1] (counts are cut down if a class runs short).
        feature_skew: strength of its scanner in [0, 1] (0: the source's own images).
    """

    name: str = "external"
    fraction: float = 0.15
    prevalence: float | None = None
    feature_skew: float = 0.7

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise HSLError(f"data.external.fraction must lie in (0, 1), got {self.fraction}.")
        if self.prevalence is not None and not 0 <= self.prevalence <= 1:
            raise HSLError(f"data.external.prevalence must lie in [0, 1], got {self.prevalence}.")
        if not 0 <= self.feature_skew <= 1:
            raise HSLError(f"data.external.feature_skew must lie in [0, 1], got {self.feature_skew}.")

    def scanner(self, seed: int) -> Acquisition:
        """The external site's own scanner (acquisition), drawn from ``seed`` (none without feature skew)."""
        g = torch.Generator().manual_seed(seed * 1000 + 997)
        return Acquisition.random(self.feature_skew, g) if self.feature_skew > 0 else Acquisition()

    def carve(self, labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the site's indices, the rest) of one split with ``labels``."""
        n = round(self.fraction * len(labels))
        n_pos_pool = int((labels == 1).sum())
        p = n_pos_pool / max(1, len(labels)) if self.prevalence is None else self.prevalence
        pos = min(round(p * n), n_pos_pool)
        neg = min(n - pos, len(labels) - n_pos_pool)
        site = partition(labels, [(pos, neg)], g)[0]
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[site] = False
        return site, torch.nonzero(rest).flatten()


def _dirichlet(k: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    # torch.distributions takes no generator: sample under a seed drawn from ours, without
    # touching the caller's global RNG state.
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
        x = torch.distributions.Gamma(torch.full((k,), float(alpha)), torch.ones(k)).sample()
    return (x / x.sum()).double()


def _split_counts(n: int, shares: torch.Tensor) -> list[int]:
    """Integer counts summing to ``n`` in proportion to ``shares`` (largest remainder)."""
    raw = shares * n
    counts = raw.floor().long()
    order = torch.argsort(raw - counts, descending=True)
    counts[order[: n - int(counts.sum())]] += 1
    return counts.tolist()


def partition(labels: torch.Tensor, counts: list[tuple[int, int]], g: torch.Generator) -> list[torch.Tensor]:
    """Disjoint index sets, node i holding ``counts[i]`` = (positives, negatives)."""
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    pos, neg = pos[torch.randperm(len(pos), generator=g)], neg[torch.randperm(len(neg), generator=g)]
    out, ip, ineg = [], 0, 0
    for n_pos, n_neg in counts:
        idx = torch.cat([pos[ip: ip + n_pos], neg[ineg: ineg + n_neg]])
        out.append(idx[torch.randperm(len(idx), generator=g)])
        ip, ineg = ip + n_pos, ineg + n_neg
    return out


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], g: torch.Generator) -> list[torch.Tensor]:
    """Split indices 0..N-1 into len(fractions) parts keeping each part's class ratio."""
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    shares = torch.tensor(fractions, dtype=torch.float64)
    shares = shares / shares.sum()
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for part, n in zip(parts, _split_counts(len(idx), shares)):
            part.append(idx[start: start + n])
            start += n
    return [torch.cat(p)[torch.randperm(sum(len(q) for q in p), generator=g)] for p in parts]

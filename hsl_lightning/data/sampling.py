"""Batches as the reference trains: primary images paired with Shared Anchor Task images.

An epoch has max(len(primary), len(SAT)) pairs unless ``samples_per_epoch`` says otherwise.
Primary samples are drawn with replacement with weights that give an expected 50/50 class
ratio (the reference's rebalancing); the SAT side is not rebalanced: it is a permutation,
topped up with random repeats when it is the shorter side. Images stay uint8 (or 16-bit) tensors in memory;
a batch is gathered with one indexing operation.

Augmentation is drawn in the loader but applied where the batch is trained: a training batch
carries ``image_theta`` / ``sat_image_theta``, each image's random flip and rotation as an affine
matrix (drawn from the loader's seeded generator), and :func:`prepare_batch` warps the images with
them after the batch reached its device. On a GPU the warping (about 10x the cost of the rest of
the loader on a CPU at 224 px) then runs there instead of holding the GPU up; on a CPU it is the
same computation as warping in the loader. The Federation, the modules' ``training_step`` and the
data module's ``on_after_batch_transfer`` call it; it does nothing to a prepared batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from hsl_lightning.data.base import ImageSet, unit


def resample(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """``length`` indices into range(n): a permutation, cut or topped up with random repeats."""
    if n >= length:
        return torch.randperm(n, generator=g)[:length]
    idx = torch.cat([torch.randperm(n, generator=g), torch.randint(n, (length - n,), generator=g)])
    return idx[torch.randperm(length, generator=g)]


def balanced_draw(labels: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    """``length`` indices drawn with replacement so that each present class has expected share 1/k."""
    counts = torch.bincount(labels, minlength=2).double()
    present = (counts > 0).sum()
    weights = (1.0 / (present * counts.clamp(min=1)))[labels]
    return torch.multinomial(weights, length, replacement=True, generator=g)


class PairedSampler(Sampler):
    """Yields (primary index, SAT index) pairs; SAT index -1 when training without a SAT."""

    def __init__(self, primary_labels: torch.Tensor, sat_size: int, rebalance: bool, seed: int,
                 samples_per_epoch: int | None = None):
        self.labels, self.sat_size, self.rebalance = primary_labels, sat_size, rebalance
        self.length = samples_per_epoch or max(len(primary_labels), sat_size)
        self.generator = torch.Generator().manual_seed(seed)  # advances epoch after epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        g = self.generator
        if self.rebalance:
            p = balanced_draw(self.labels, self.length, g)
        else:
            p = resample(len(self.labels), self.length, g)
        s = resample(self.sat_size, self.length, g) if self.sat_size else torch.full((self.length,), -1)
        return iter(zip(p.tolist(), s.tolist()))


class SiteSampler(Sampler):
    """Primary-only batches holding ``per_site`` images of every site (``origin``: each image's
    site), drawn within each site as :class:`PairedSampler` draws (rebalanced or resampled);
    ``steps`` batches per epoch. Yields (primary index, -1) pairs, site after site within a batch."""

    def __init__(self, labels: torch.Tensor, origin: torch.Tensor, per_site: int, steps: int, rebalance: bool,
                 seed: int):
        self.sites = [torch.nonzero(origin == s).flatten() for s in torch.unique(origin).tolist()]
        self.labels, self.per_site, self.steps, self.rebalance = labels, per_site, steps, rebalance
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps * self.per_site * len(self.sites)

    def __iter__(self):
        g, n = self.generator, self.steps * self.per_site
        draws = []
        for idx in self.sites:
            local = balanced_draw(self.labels[idx], n, g) if self.rebalance else resample(len(idx), n, g)
            draws.append(idx[local].view(self.steps, self.per_site))
        order = torch.cat(draws, dim=1).reshape(-1)  # step by step, each step every site's share
        return iter((i, -1) for i in order.tolist())


AUGMENTED = ("image", "sat_image")  # the batch keys that are augmented, each with a "<key>_theta"


def augmentation(b: int, g: torch.Generator, max_degrees: float = 15.0) -> torch.Tensor:
    """``b`` random horizontal flips and rotations up to ``max_degrees``, as affine matrices (b, 2, 3)."""
    flip = torch.rand(b, generator=g) < 0.5
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sign, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * sign, cos
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A float batch (B, C, H, W) warped by per-image affine matrices ``theta`` (B, 2, 3)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator, max_degrees: float = 15.0) -> torch.Tensor:
    """Random horizontal flip and rotation up to ``max_degrees``, for a float batch (B, C, H, W)."""
    return warp(x, augmentation(x.shape[0], g, max_degrees))


def prepare_batch(batch: dict) -> dict:
    """The batch with its pending augmentation applied (see the module docstring): a new dict without
    the ``*_theta`` keys; the batch itself when nothing is pending."""
    if not any(f"{key}_theta" in batch for key in AUGMENTED):
        return batch
    out = {k: v for k, v in batch.items() if not k.endswith("_theta")}
    for key in AUGMENTED:
        if f"{key}_theta" in batch:
            out[key] = warp(batch[key], batch[f"{key}_theta"])
    return out


class PairedImages(Dataset):
    """Training data of one trainee: its primary images and (optionally) its SAT images.

    ``origin``: the node each primary image comes from (batch key ``node``), for modules that
    route a node's images through its own layers (SplitAVG's site parts).
    """

    def __init__(self, primary: ImageSet, sat: ImageSet | None, augment: bool, seed: int,
                 origin: torch.Tensor | None = None):
        self.primary, self.sat, self.augment = primary, sat, augment
        self.origin = origin if origin is not None else torch.zeros(len(primary), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.primary)

    def __getitems__(self, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        p = torch.tensor([i for i, _ in pairs])
        batch = {"image": unit(self.primary.images[p]), "label": self.primary.labels[p], "node": self.origin[p]}
        if self.sat is not None:
            s = torch.tensor([j for _, j in pairs])
            batch["sat_image"], batch["sat_label"] = unit(self.sat.images[s]), self.sat.labels[s]
        if self.augment:  # drawn here, in this order, applied by prepare_batch where the batch is trained
            for key in AUGMENTED:
                if key in batch:
                    batch[f"{key}_theta"] = augmentation(batch[key].shape[0], self.generator)
        return batch


class EvalImages(Dataset):
    """Evaluation data of one node (index ``node``); each image gets a fixed, seeded SAT partner
    for 'paired' inference."""

    def __init__(self, data: ImageSet, sat: ImageSet | None, seed: int, node: int = 0):
        self.data, self.sat, self.node = data, sat, node
        if sat is not None and len(sat):
            g = torch.Generator().manual_seed(seed)
            self.partner = resample(len(sat), max(len(data), 1), g)[: len(data)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, index: list[int]) -> dict[str, torch.Tensor]:
        i = torch.tensor(index)
        batch = {"image": unit(self.data.images[i]), "label": self.data.labels[i],
                 "node": torch.full((len(index),), self.node, dtype=torch.long)}
        if self.sat is not None and len(self.sat):
            batch["sat_image"] = unit(self.sat.images[self.partner[i]])
        return batch


def _as_batch(batch):
    return batch  # __getitems__ already built the batch


def paired_loader(primary: ImageSet, sat: ImageSet | None, batch_size: int, augment: bool, rebalance: bool,
                  seed: int, samples_per_epoch: int | None = None, origin: torch.Tensor | None = None) -> DataLoader:
    """A training loader of (primary image, SAT image) pairs, rebalanced and augmented as asked; ``sat`` None:
    primary images only."""
    sampler = PairedSampler(primary.labels, len(sat) if sat is not None else 0, rebalance, seed, samples_per_epoch)
    dataset = PairedImages(primary, sat, augment, seed + 1, origin)
    # A trailing batch of one image breaks BatchNorm in train mode; epochs are resampled anyway.
    drop_last = len(sampler) > batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=_as_batch, drop_last=drop_last)


def site_loader(primary: ImageSet, origin: torch.Tensor, batch_size: int, augment: bool, rebalance: bool,
                seed: int, samples_per_epoch: int | None = None) -> DataLoader:
    """Primary-only batches with the same number of images from every site (SplitAVG's fixed batch
    per site): ``batch_size`` split evenly over the sites (at least one image each), and as many steps
    per epoch as :func:`paired_loader` would make of the pooled images."""
    sites = len(torch.unique(origin))
    per_site = max(1, batch_size // sites)
    length = samples_per_epoch or len(primary)
    steps = max(1, length // batch_size)
    sampler = SiteSampler(primary.labels, origin, per_site, steps, rebalance, seed)
    dataset = PairedImages(primary, None, augment, seed + 1, origin)
    return DataLoader(dataset, batch_size=per_site * sites, sampler=sampler, collate_fn=_as_batch)


def eval_loader(data: ImageSet, sat: ImageSet | None, batch_size: int, seed: int, node: int = 0) -> DataLoader:
    """An evaluation loader: every image once, in order, each with a fixed, seeded SAT partner (none when ``sat`` is
    None)."""
    return DataLoader(EvalImages(data, sat, seed, node), batch_size=batch_size, shuffle=False, collate_fn=_as_batch)

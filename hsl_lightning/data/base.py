"""Image containers and the Source interface shared by every data origin.

Images are kept as unsigned integers that stand for intensities in [0, 1]: 8-bit (``uint8``, 255 = 1)
for 8-bit sources, 16-bit (``uint16``, 65535 = 1) for sources with more depth (16-bit PNGs, 12-bit
X-rays, DICOM), so a 12-bit signal keeps every level on its way to the model. :func:`unit` turns
either into floats in [0, 1]; nothing in between rounds to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
DEPTHS = {torch.uint8: 255, torch.uint16: 65535}  # the stored value that stands for intensity 1


def unit(images: torch.Tensor) -> torch.Tensor:
    """Stored images (uint8 or uint16) as float32 intensities in [0, 1]."""
    return images.float().div_(DEPTHS[images.dtype])


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float intensities in [0, 1] stored as ``dtype`` (uint8 or uint16), rounded to the nearest level."""
    return (x.clamp(0, 1) * DEPTHS[dtype]).round().to(torch.int32).to(dtype)


def widen(images: torch.Tensor) -> torch.Tensor:
    """Images as uint16: 8-bit ones mapped exactly (v * 257), 16-bit ones unchanged."""
    return images if images.dtype == torch.uint16 else (images.to(torch.int32) * 257).to(torch.uint16)


@dataclass
class ImageSet:
    """Decoded images kept as one uint8 or uint16 tensor (N, C, H, W) (see the module docstring) with binary labels
    (N,) in {0, 1}."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype not in DEPTHS or self.images.dim() != 4:
            raise ValueError(f"ImageSet wants uint8 or uint16 (N, C, H, W) images, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet has {self.images.shape[0]} images but labels shaped {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images and labels at ``index``."""
        return ImageSet(self.images[index], self.labels[index])

    @property
    def positives(self) -> int:
        """How many images have label 1."""
        return int(self.labels.sum())

    @staticmethod
    def cat(sets: list["ImageSet"]) -> "ImageSet":
        """The sets one after the other, as one set (16-bit if any of them is)."""
        images = [s.images for s in sets]
        if len({x.dtype for x in images}) > 1:
            images = [widen(x) for x in images]
        return ImageSet(torch.cat(images), torch.cat([s.labels for s in sets]))

    @staticmethod
    def empty(channels: int, size: int) -> "ImageSet":
        """A set of no images of ``channels`` x ``size`` x ``size``."""
        return ImageSet(torch.zeros(0, channels, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


class HostedElsewhere:
    """A split of an institution that another rank hosts: its labels (sizes, class counts and the
    report need them), no images. Reading ``images`` is a mistake, and says so."""

    def __init__(self, name: str, labels: torch.Tensor):
        self.name, self.labels = name, labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def images(self) -> torch.Tensor:
        from hsl_lightning.errors import HSLError

        raise HSLError(f"Node {self.name}'s images live on the rank that hosts it; this rank built only the data "
                       "of the nodes it hosts (FederatedDataModule.host).")


def harmonize(images: torch.Tensor, channels: int, size: int | None) -> torch.Tensor:
    """Convert stored images to ``channels`` (grey <-> RGB) and square ``size`` px, keeping their dtype (uint8 or
    uint16)."""
    dtype = images.dtype
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.float().mean(dim=1, keepdim=True).round().to(torch.int32).to(dtype)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        out = []
        for chunk in images.split(1024):
            x = F.interpolate(chunk.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            out.append(x.round().clamp(0, DEPTHS[dtype]).to(torch.int32).to(dtype))
        images = torch.cat(out)
    return images.contiguous()


class Source:
    """Where a task's images come from.

    ``load()`` returns either official splits ``{"train": ImageSet, "val": ..., "test": ...}``
    or one pool ``{"all": ImageSet}`` that the data module partitions into nodes and splits;
    a source that is already split by institution (``per_node = True``) returns
    ``{node_name: {"train": ..., "val": ..., "test": ...}}``.
    """

    channels: int = 1
    per_node: bool = False

    def load(self, root: str | None = None) -> dict:
        """The source's images: official splits, one pool, or per-node splits (see the class docstring); ``root`` is
        where files are looked for when the source names none."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human-readable name of the source, for logs and reports."""
        return type(self).__name__

"""Image containers and the Source interface shared by every data origin."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """Decoded images kept as one uint8 tensor (N, C, H, W) with binary labels (N,) in {0, 1}."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet wants uint8 (N, C, H, W) images, got {self.images.dtype} {tuple(self.images.shape)}")
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
        """The sets one after the other, as one set."""
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))

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
    """Convert uint8 images to ``channels`` (grey <-> RGB) and square ``size`` px, staying uint8."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        out = []
        for chunk in images.split(1024):
            x = F.interpolate(chunk.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
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

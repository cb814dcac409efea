"""Real institutions' images on disk: ``root/<node>/<split>/<label>/*.png|jpg``.

Each sub-folder of ``root`` is one institution with ``train`` and ``test`` folders (``val`` is
optional: when absent, a stratified ``val_fraction`` of train is held out). Label folders are
``0`` and ``1``, or any names with ``positive`` naming the positive one. Images are decoded
once, converted to ``channels`` and resized to ``size`` px, and kept as tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hsl_lightning.data.base import ImageSet, Source, harmonize
from hsl_lightning.data.heterogeneity import stratified_split
from hsl_lightning.errors import HSLError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ImageFolders(Source):
    """Per-institution image folders (see module docs)."""

    per_node = True

    def __init__(self, root: str, channels: int = 1, size: int | None = None, positive: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0):
        if channels not in (1, 3):
            raise HSLError(f"ImageFolders channels must be 1 or 3, got {channels}.")
        self.root, self.channels, self.size, self.positive = root, channels, size, positive
        self.val_fraction, self.seed = val_fraction, seed

    def describe(self) -> str:
        return f"image folders under {self.root}"

    def _label_of(self, folder: Path) -> int:
        if self.positive is not None:
            return int(folder.name == self.positive)
        if folder.name not in ("0", "1"):
            raise HSLError(f"Label folder {folder} is neither '0' nor '1'. Name label folders 0 and 1, or set "
                           "positive: <folder name of the positive class>.")
        return int(folder.name)

    def _read(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise HSLError(f"Cannot read image {path}: {exc}.") from exc

    def _load_split(self, folder: Path) -> ImageSet:
        images, labels = [], []
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            y = self._label_of(label_dir)
            for f in sorted(label_dir.iterdir()):
                if f.suffix.lower() in EXTENSIONS:
                    a = self._read(f)
                    x = torch.from_numpy(a.copy()).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a.copy()).permute(2, 0, 1)
                    if self.size is not None:
                        x = harmonize(x.unsqueeze(0), self.channels, self.size)[0]
                    elif images and x.shape != images[0].shape:
                        raise HSLError(f"{f} is {tuple(x.shape[1:])} px but {folder} also holds "
                                       f"{tuple(images[0].shape[1:])} px images. Set size: N to resize all to N x N.")
                    images.append(x)
                    labels.append(y)
        if not images:
            raise HSLError(f"No images ({', '.join(sorted(EXTENSIONS))}) under {folder}/<label>/.")
        return ImageSet(torch.stack(images), torch.tensor(labels))

    def load(self, root: str | None = None) -> dict:
        base = Path(self.root).expanduser()
        if not base.is_dir():
            raise HSLError(f"Image folder root not found: {base}. Expected {base}/<node>/<split>/<label>/*.png.")
        nodes = sorted(p for p in base.iterdir() if p.is_dir())
        if not nodes:
            raise HSLError(f"{base} holds no node folders. Expected {base}/<node>/<split>/<label>/*.png.")
        out = {}
        for node in nodes:
            for split in ("train", "test"):
                if not (node / split).is_dir():
                    raise HSLError(f"Node folder {node} has no '{split}' folder (needs train/ and test/, val/ optional).")
            splits = {"train": self._load_split(node / "train"), "test": self._load_split(node / "test")}
            if (node / "val").is_dir():
                splits["val"] = self._load_split(node / "val")
            else:
                g = torch.Generator().manual_seed(self.seed)
                keep, held = stratified_split(splits["train"].labels, (1 - self.val_fraction, self.val_fraction), g)
                splits["val"] = splits["train"].subset(held)
                splits["train"] = splits["train"].subset(keep)
            out[node.name] = splits
        return out

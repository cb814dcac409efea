"""Real institutions' images on disk: ``root/<node>/<split>/<label>/*.png|jpg``.

Each sub-folder of ``root`` is one institution with ``train`` and ``test`` folders (``val`` is
optional: when absent, a stratified ``val_fraction`` of train is held out). Label folders are
``0`` and ``1``, or any names with ``positive`` naming the positive one. Images are decoded
once, converted to ``channels`` and resized to ``size`` px, and kept as tensors. 16-bit images are
scaled to 8 bits (65535 -> 255); 32-bit integer and float images are refused (their range is not
known). The same image in two splits of one institution (an export that leaks test images into
training) is an error unless ``allow_duplicates`` is set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hsl_lightning.data.base import ImageSet, Source, harmonize
from hsl_lightning.data.heterogeneity import stratified_split
from hsl_lightning.errors import HSLError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ImageFolders(Source):
    """Per-institution image folders: ``root/<node>/<train|val|test>/<label>/*.png`` (see the module docstring).

    Args:
        root: the folder holding one sub-folder per institution.
        channels: 1 (grey) or 3 (RGB): every image is converted to it.
        size: resize every image to ``size`` x ``size`` px (default: keep the files' size; a split's
            images must then all agree).
        positive: the name of the positive label folder, when the folders are not ``0`` and ``1``.
        val_fraction: the stratified share of train held out for validation where ``val`` is absent.
        seed: the seed of that hold-out.
        allow_duplicates: accept the same image in two splits of one institution.
        nodes: the institutions' folder names, in the federation's order (default: every folder
            under ``root``, sorted). In a deployment every site lists them all and its ``root``
            holds only its own folder: the others are built at their sites.
    """

    per_node = True

    def __init__(self, root: str, channels: int = 1, size: int | None = None, positive: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0, allow_duplicates: bool = False,
                 nodes: list[str] | None = None):
        if channels not in (1, 3):
            raise HSLError(f"ImageFolders channels must be 1 or 3, got {channels}.")
        if nodes is not None and (not nodes or len(set(nodes)) != len(nodes) or not all(isinstance(n, str) for n in nodes)):
            raise HSLError(f"ImageFolders nodes must be distinct folder names, got {nodes}.")
        self.root, self.channels, self.size, self.positive = root, channels, size, positive
        self.val_fraction, self.seed, self.allow_duplicates = val_fraction, seed, allow_duplicates
        self.nodes = None if nodes is None else list(nodes)

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
                if im.mode.startswith("I;16"):  # 16-bit grey: PIL's convert("L") would clip at 255
                    wide = np.asarray(im).astype(np.float64)
                    grey = np.round(wide / 257).astype(np.uint8)
                    return grey if self.channels == 1 else np.repeat(grey[..., None], 3, axis=2)
                if im.mode in ("I", "F"):
                    raise HSLError(f"Image {path} holds {'32-bit integer' if im.mode == 'I' else 'float'} pixels, "
                                   "whose range cannot be mapped to 8 bits safely; export 8- or 16-bit PNGs.")
                return np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise HSLError(f"Cannot read image {path}: {exc}.") from exc

    def _load_split(self, folder: Path) -> tuple[ImageSet, list[Path]]:
        """The split's images and labels, and the file each image came from."""
        images, labels, files = [], [], []
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
                    files.append(f)
        if not images:
            raise HSLError(f"No images ({', '.join(sorted(EXTENSIONS))}) under {folder}/<label>/.")
        return ImageSet(torch.stack(images), torch.tensor(labels)), files

    def load(self, root: str | None = None) -> dict:
        base = Path(self.root).expanduser()
        if not base.is_dir():
            raise HSLError(f"Image folder root not found: {base}. Expected {base}/<node>/<split>/<label>/*.png.")
        if self.nodes is not None:  # the federation's list: folders absent here are built at other sites
            nodes = [base / name for name in self.nodes]
            if not any(node.is_dir() for node in nodes):
                raise HSLError(f"{base} holds none of the node folders {self.nodes}. Expected "
                               f"{base}/<node>/<split>/<label>/*.png for this site's own node.")
        else:
            nodes = sorted(p for p in base.iterdir() if p.is_dir())
        if not nodes:
            raise HSLError(f"{base} holds no node folders. Expected {base}/<node>/<split>/<label>/*.png.")
        out = {}
        for node in nodes:
            if not node.is_dir():
                out[node.name] = None  # another site's
                continue
            for split in ("train", "test"):
                if not (node / split).is_dir():
                    raise HSLError(f"Node folder {node} has no '{split}' folder (needs train/ and test/, val/ optional).")
            splits, files = {}, {}
            for split in ("train", "test", "val"):
                if split == "val" and not (node / "val").is_dir():
                    continue
                splits[split], files[split] = self._load_split(node / split)
            if not self.allow_duplicates:
                _check_no_leak(node, splits, files)
            if "val" not in splits:
                g = torch.Generator().manual_seed(self.seed)
                keep, held = stratified_split(splits["train"].labels, (1 - self.val_fraction, self.val_fraction), g)
                splits["val"] = splits["train"].subset(held)
                splits["train"] = splits["train"].subset(keep)
            out[node.name] = {s: splits[s] for s in ("train", "val", "test")}
        return out


def _check_no_leak(node: Path, splits: dict[str, ImageSet], files: dict[str, list[Path]]) -> None:
    """The same decoded image in two splits of one institution: test images seen in training."""
    seen: dict[bytes, Path] = {}
    for split in splits:
        mine: dict[bytes, Path] = {}
        for image, f in zip(splits[split].images, files[split]):
            mine.setdefault(hashlib.sha1(image.numpy().tobytes()).digest(), f)
        clashes = [(seen[h], f) for h, f in mine.items() if h in seen]
        if clashes:
            pairs = "; ".join(f"{a} = {b}" for a, b in clashes[:3])
            raise HSLError(f"Institution {node.name} holds {len(clashes)} image(s) in more than one split ({pairs}"
                           f"{' ...' if len(clashes) > 3 else ''}): its test or validation results would count "
                           "images it trained on. Remove the copies, or set allow_duplicates: true.")
        seen.update(mine)

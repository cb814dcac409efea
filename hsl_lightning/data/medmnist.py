"""MedMNIST v3 2D data sets from the official ``.npz`` files.

Files are read from a local folder: the source's ``root``, else the data module's
``--data.root``, else the ``HSL_DATA_ROOT`` environment variable, else
``~/.cache/hsl_lightning/medmnist``. With ``download=True`` a missing file is fetched from the
official Zenodo record and its MD5 checked. Each flag is mapped to a binary task (see TASKS).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from hsl_lightning.data.base import SPLITS, ImageSet, Source
from hsl_lightning.errors import HSLError, suggest

ENV_ROOT = "HSL_DATA_ROOT"
DEFAULT_ROOT = "~/.cache/hsl_lightning/medmnist"
ZENODO = "https://zenodo.org/records/10519652/files/{name}?download=1"

# Official MD5 per flag and size (MedMNIST v3, Zenodo record 10519652), as listed by the
# medmnist package's info table.
MD5 = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616", "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16", "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f", "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf", "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6", "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc", "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364", "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b", "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344", "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288", "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9", "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3", "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
}
SIZES = (28, 64, 128, 224)
CHANNELS = {"pathmnist": 3, "dermamnist": 3, "retinamnist": 3, "bloodmnist": 3}
NUM_CLASSES = {"pathmnist": 9, "chestmnist": 2, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2,
               "retinamnist": 5, "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11,
               "organcmnist": 11, "organsmnist": 11}
# Stored labels that count as the positive class of each flag's binary task.
TASKS = {
    "breastmnist": (0,),  # stored 0 = malignant (1 = normal or benign)
    "pneumoniamnist": (1,),  # 1 = pneumonia
    "retinamnist": (2, 3, 4),  # referable diabetic retinopathy: grade >= 2
}


def file_name(flag: str, size: int) -> str:
    """The MedMNIST file name of a data set ``flag`` at image ``size`` (``breastmnist.npz``, ``breastmnist_64.npz``)."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def md5sum(path: Path) -> str:
    """The MD5 digest of a file, read in 1 MiB blocks (to check a download against MedMNIST's published sums)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MedMNIST(Source):
    """One MedMNIST 2D flag as a binary task with its official train/val/test splits.

    Args:
        flag: e.g. ``breastmnist``, ``pneumoniamnist``, ``retinamnist`` (any 2D flag).
        size: 28, 64, 128 or 224 (the official file of that size).
        root: folder holding the files (see module docs for the fallbacks).
        download: fetch a missing file from Zenodo (needs internet) and check its MD5.
        positive_labels: stored labels that form the positive class; defaults per flag in TASKS
            (required for flags without a default, e.g. ``pathmnist``).
    """

    def __init__(self, flag: str = "breastmnist", size: int = 28, root: str | None = None,
                 download: bool = False, positive_labels: list[int] | None = None):
        if flag not in MD5:
            raise HSLError(f"Unknown MedMNIST flag '{flag}'.{suggest(flag, MD5)} 2D flags: {', '.join(MD5)}.")
        if size not in SIZES:
            raise HSLError(f"MedMNIST size must be one of {SIZES}, got {size}.")
        if positive_labels is None:
            if flag not in TASKS:
                raise HSLError(f"MedMNIST '{flag}' has {NUM_CLASSES[flag]} classes: say which stored labels are the "
                               "positive class with positive_labels, e.g. [1].")
            positive_labels = list(TASKS[flag])
        if flag == "chestmnist":
            raise HSLError("chestmnist is multi-label (14 findings); it is not supported as a binary source.")
        self.flag, self.size, self.root, self.download = flag, size, root, download
        self.positive_labels = list(positive_labels)
        self.channels = CHANNELS.get(flag, 1)

    def describe(self) -> str:
        return f"MedMNIST {self.flag} {self.size}px"

    def resolve_root(self, fallback: str | None = None) -> Path:
        """The folder of the MedMNIST files: ``root``, else ``fallback``, else ``$HSL_DATA_ROOT``, else
        ``~/.cache/hsl_lightning/medmnist``."""
        root = self.root or fallback or os.environ.get(ENV_ROOT) or DEFAULT_ROOT
        return Path(root).expanduser()

    def path(self, fallback_root: str | None = None) -> Path:
        """The ``.npz`` file of this data set and size."""
        return self.resolve_root(fallback_root) / file_name(self.flag, self.size)

    def _fetch(self, path: Path) -> None:
        url = ZENODO.format(name=path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise HSLError(f"Could not download {url} ({exc}). Without internet, copy {path.name} into {path.parent} "
                           f"or point {ENV_ROOT} / --data.root at a folder that holds it.") from exc
        expected = MD5[self.flag][SIZES.index(self.size)]
        if md5sum(partial) != expected:
            partial.unlink(missing_ok=True)
            raise HSLError(f"Downloaded {path.name} has the wrong MD5 (expected {expected}); try again.")
        partial.replace(path)  # only a verified file ever appears under the final name

    def load(self, root: str | None = None) -> dict:
        path = self.path(root)
        if not path.is_file():
            if self.download:
                self._fetch(path)
            else:
                raise HSLError(
                    f"MedMNIST file not found: {path}. Put the official {path.name} (MedMNIST v3, "
                    f"{ZENODO.format(name=path.name)}) in {path.parent}, or point --data.root or the {ENV_ROOT} "
                    "environment variable at the folder that holds it, or set download: true when online."
                )
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = set(npz.files)
                wanted = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
                if not wanted <= keys:
                    raise HSLError(f"{path} is not a MedMNIST file: keys {sorted(wanted - keys)} are missing "
                                   f"(found {sorted(keys)}).")
                arrays = {k: npz[k] for k in wanted}
        except HSLError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise HSLError(f"Cannot read {path}: the file is corrupt or truncated ({type(exc).__name__}: {exc}). "
                           f"Replace it with the official file (MD5 {MD5[self.flag][SIZES.index(self.size)]}).") from exc
        for split in SPLITS:
            self._check(path, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
        return {split: self._to_set(arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in SPLITS}

    def _check(self, path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Every way a split of a hand-made or damaged file can disagree with the official layout,
        as one message naming the file, the key, what was expected and what it holds."""
        channels, size = self.channels, self.size
        layout = f"(N, {size}, {size})" if channels == 1 else f"(N, {size}, {size}, {channels})"
        key = f"{path} key {split}_images"
        if images.dtype != np.uint8:
            finite = images[np.isfinite(images)] if np.issubdtype(images.dtype, np.floating) else images
            span = f", values {finite.min()}..{finite.max()}" if finite.size else ""
            raise HSLError(f"{key} must be uint8 pixels 0..255 shaped {layout}; got {images.dtype}{span}"
                           f"{' with NaN/inf' if finite.size < images.size else ''}.")
        if images.ndim not in (3, 4):
            raise HSLError(f"{key} must be shaped {layout}; got {images.ndim} dimension(s) {images.shape}.")
        got_channels = 1 if images.ndim == 3 else images.shape[3]
        if tuple(images.shape[1:3]) != (size, size) or got_channels != channels:
            raise HSLError(f"{key} must be shaped {layout} for {self.flag} at {size} px; got {images.shape} "
                           f"({images.shape[1]}x{images.shape[2]} px, {got_channels} channel(s)).")
        if len(images) == 0:
            raise HSLError(f"{key} holds no images; every split needs some.")
        key = f"{path} key {split}_labels"
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
            raise HSLError(f"{key} must hold one label per image, shaped (N,) or (N, 1); got {labels.shape}.")
        if len(labels) != len(images):
            raise HSLError(f"{key} has {len(labels)} labels for {len(images)} images in {split}_images; they must "
                           "agree.")
        if not np.issubdtype(labels.dtype, np.integer):
            whole = np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels % 1 == 0).all()
            if not whole:
                raise HSLError(f"{key} must hold integer class labels; got {labels.dtype} values such as "
                               f"{labels.reshape(-1)[:3].tolist()}.")
        flat = labels.reshape(-1).astype(np.int64)
        bad = (flat < 0) | (flat >= NUM_CLASSES[self.flag])
        if bad.any():
            raise HSLError(f"{key}: {int(bad.sum())} {split} labels lie outside {self.flag}'s classes "
                           f"0..{NUM_CLASSES[self.flag] - 1} (e.g. {flat[bad][:3].tolist()}).")

    def _to_set(self, images: np.ndarray, labels: np.ndarray) -> ImageSet:
        labels = labels.reshape(len(labels), -1)[:, 0].astype(np.int64)
        x = torch.from_numpy(images)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        y = torch.from_numpy(np.isin(labels, self.positive_labels).astype(np.int64))
        return ImageSet(x.contiguous(), y)

"""Real institutions' images on disk: ``root/<node>/<split>/<label>/*.png|jpg`` (or a CSV, see
:mod:`hsl_lightning.data.files`).

Each sub-folder of ``root`` is one institution with ``train`` and ``test`` folders (``val`` is
optional: when absent, a stratified ``val_fraction`` of train is held out). Label folders are
``0`` and ``1``, or any names with ``positive`` naming the positive one. Images are decoded
once, converted to ``channels`` and resized to ``size`` px, and kept as tensors.

Depth: 8-bit images are kept as read. 16-bit images (PNG, TIFF) keep their depth: their values are
scaled to [0, 1] by ``depth`` (the bits stored, e.g. 12 for an X-ray exported as 16-bit PNG) or by
``window`` ``[low, high]`` (values outside are clipped); with the default ``depth: auto`` each
institution's rule is the smallest of 8, 10, 12, 14 or 16 bits that holds its largest value (a
12-bit export whose brightest pixel is 4095 is read as 12-bit). Nothing is rounded to 8 bits.
32-bit integer and float images are refused (their range is not declared). The same image in two
splits of one institution (an export that leaks test images into training) is an error unless
``allow_duplicates`` is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hsl_lightning.data.files import MULTI_PAGE, Decoded, FileSource, Problem, SplitFiles, Unreadable, digest_of
from hsl_lightning.errors import HSLError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
AUTO_BITS = (8, 10, 12, 14, 16)


class ImageFolders(FileSource):
    """Per-institution image folders: ``root/<node>/<train|val|test>/<label>/*.png`` (see the module docstring).

    Args:
        root: the folder holding one sub-folder per institution.
        csv: a CSV of ``path,label,split[,node]`` instead of folders.
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
        depth: the bits stored in 16-bit images (8 to 16), or ``auto`` (per institution, see the module
            docstring).
        window: ``[low, high]``: the 16-bit values that stand for black and white (instead of ``depth``).
    """

    extensions = frozenset(EXTENSIONS)
    kind = "image"

    def __init__(self, root: str | None = None, channels: int = 1, size: int | None = None, positive: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0, allow_duplicates: bool = False,
                 nodes: list[str] | None = None, csv: str | None = None, depth: int | str = "auto",
                 window: list[float] | None = None):
        super().__init__(root=root, csv=csv, channels=channels, size=size, positive=positive,
                         val_fraction=val_fraction, seed=seed, allow_duplicates=allow_duplicates, nodes=nodes)
        if depth != "auto" and not (isinstance(depth, int) and 8 <= depth <= 16):
            raise HSLError(f"ImageFolders depth must be 'auto' or the bits stored, 8 to 16; got {depth!r}.")
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise HSLError(f"ImageFolders window must be [low, high] with low < high, got {window}.")
        self.depth, self.window = depth, None if window is None else [float(v) for v in window]
        self.resolved: dict[str, int] = {}  # node -> the bits its 16-bit files were scaled by (full_scale fills it)

    def reading_args(self) -> dict:
        """``depth`` as training resolved it (``auto``'s choice where every node here chose the same), and each
        node's own choice (``depths``), so ``hsl predict`` scales new files as training scaled that node's."""
        chosen = self.resolved
        depth = self.depth
        if depth == "auto" and chosen and len(set(chosen.values())) == 1:
            depth = next(iter(chosen.values()))
        return {"depth": depth, "window": self.window, "depths": dict(chosen)}

    def decode(self, path: Path) -> Decoded:
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # a TIFF stack: its first page alone would be read silently
                    raise Unreadable(f"{frames} pages", group=MULTI_PAGE)
                rawmode = im.tile[0][3] if im.tile and len(im.tile[0]) > 3 and isinstance(im.tile[0][3], str) else ""
                if im.mode in ("RGB", "RGBA", "LA") and ";16" in rawmode:
                    raise Unreadable("is a 16-bit colour (or grey-with-alpha) image, which Pillow reads at 8 bits; "
                                     "export 16-bit grey or 8-bit colour")
                wide = None
                if im.mode.startswith("I;16"):
                    wide = np.asarray(im).astype(np.uint16)  # big- or little-endian as stored -> native
                elif im.mode == "I":  # Pillow before 10.3 opens 16-bit grey PNGs as 32-bit integers
                    values = np.asarray(im)
                    if values.size and (values.min() < 0 or values.max() > 65535):
                        raise Unreadable("holds 32-bit integer pixels beyond 16 bits, whose range is not declared; "
                                         "export 8- or 16-bit PNGs")
                    wide = values.astype(np.uint16)
                if wide is not None:
                    decoded = Decoded(wide, 16 if self.depth == "auto" else self.depth, 1, digest_of(wide),
                                      full_scale=None, top=int(wide.max()) if wide.size else 0)
                    if self.window is not None:
                        decoded.offset, decoded.full_scale = self.window[0], self.window[1] - self.window[0]
                    return decoded
                if im.mode == "F":
                    raise Unreadable("holds float pixels, whose range is not declared; export 8- or 16-bit PNGs")
                colour = False
                if im.mode not in ("1", "L", "LA"):  # a grey image saved as RGB (or a grey palette) is grey
                    rgb = np.asarray(im.convert("RGB"))
                    colour = not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
                array = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))  # PIL's luma for colour -> grey
                # the hash is of the image as training sees it, so a grey image and its RGB copy are one image
                return Decoded(array, 8, 1 if im.mode in ("1", "L", "LA", "P") and not colour else 3,
                               digest_of(array), colour=colour)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise Unreadable(f"cannot read it: {exc}") from exc

    def full_scale(self, node: str, decoded: list[Decoded]) -> None:
        wide = [d for d in decoded if d.full_scale is None]
        if not wide:
            return
        if self.depth == "auto":
            top = max(d.top for d in wide)
            bits = next(b for b in AUTO_BITS if top <= 2 ** b - 1)
        else:
            bits = self.depth
        for d in wide:
            d.full_scale, d.bits = float(2 ** bits - 1), bits
        self.resolved[node] = bits

    def node_problems(self, node: str, splits: dict[str, SplitFiles]) -> list[Problem]:
        if self.depth == "auto" or self.window is not None:
            return []
        top = 2 ** self.depth - 1
        over = [f"{f}: up to {d.top}" for got in splits.values() for f, d in zip(got.files, got.decoded)
                if d.full_scale is not None and d.array.dtype == np.uint16 and d.top > top]
        if not over:
            return []
        return [Problem(node, None, f"{len(over)} image(s) hold values above the {self.depth}-bit range (0..{top}) "
                        "that depth declares; set depth to the bits the export stores, or auto", over)]


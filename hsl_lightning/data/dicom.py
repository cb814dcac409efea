"""DICOM files as a hospital's PACS exports them, read with pydicom (the ``dicom`` extra).

The layout is :class:`~hsl_lightning.data.folders.ImageFolders`' (``root/<node>/<split>/<label>/``,
files named ``*.dcm``, ``*.dicom`` or without a suffix, as PACS exports write them) or a CSV of
``path,label,split[,node]``. Each file's pixels go through what the file declares, in DICOM's order:

1. **bits stored** and the pixel representation (signed or not): the range of the stored values;
2. the **modality LUT**: rescale slope and intercept (CT's Hounsfield units), or a Modality LUT
   Sequence;
3. the **VOI LUT**: a VOI LUT Sequence, else the first Window Center / Width (LINEAR, LINEAR_EXACT
   or SIGMOID, as VOI LUT Function says), else the whole range of step 2. ``window: [center,
   width]`` in the config replaces the file's own; ``voi: none`` ignores the file's;
4. **MONOCHROME1** (white is low) is inverted, so every image is MONOCHROME2;
5. the result, in [0, 1], is kept at 16 bits.

RGB and YBR images (pydicom converts YBR to RGB) are scaled by their bits stored. Multi-frame and 3D
files are refused, with one message and their count per split. Compressed transfer syntaxes need a
decoder: pydicom reads RLE itself; JPEG 2000 and JPEG-LS come with the ``dicom`` extra (pylibjpeg's
OpenJPEG plugin); JPEG lossless needs ``pylibjpeg-libjpeg`` (GPL-3.0, so not in the extra) or
``python-gdcm``, which a site installs itself. A file that no installed decoder reads is named with
the transfer syntax and the package that would read it.

No patient identifier (names, IDs, dates, or any other element but the pixel module's) is read into
a message, a log, ``summary.json`` or W&B: messages name the file by its path, so exports should be
named by something other than the patient (PACS exports use instance UIDs or counters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsl_lightning.data.files import MULTI_PAGE as MULTI_FRAME
from hsl_lightning.data.files import Decoded, FileSource, Unreadable, digest_of
from hsl_lightning.errors import HSLError

EXTENSIONS = {".dcm", ".dicom"}


def _pydicom():
    try:
        import pydicom
        from pydicom.pixels import processing
    except ImportError as exc:
        raise HSLError("DicomFolders reads DICOM with pydicom: pip install 'hsl_lightning[dicom]'.") from exc
    return pydicom, processing


class DicomFolders(FileSource):
    """A hospital's DICOM files, per institution (see the module docstring).

    Args:
        root: the folder holding one sub-folder per institution (``root/<node>/<split>/<label>/``).
        csv: a CSV of ``path,label,split[,node]`` instead of folders.
        channels: 1 (grey) or 3 (RGB): every image is converted to it.
        size: resize every image to ``size`` x ``size`` px (default: keep the files' size).
        positive: the name of the positive label, when labels are not ``0`` and ``1``.
        val_fraction: the stratified share of train held out for validation where ``val`` is absent.
        seed: the seed of that hold-out.
        allow_duplicates: accept the same image in two splits of one institution.
        nodes: the institutions' names in the federation's order (see ImageFolders).
        window: ``[center, width]`` applied to every file (after its rescale) instead of its own VOI.
        voi: ``file`` (the file's VOI LUT or window, the default) or ``none`` (the whole rescaled range).
    """

    extensions = frozenset(EXTENSIONS)
    kind = "DICOM file"

    def __init__(self, root: str | None = None, csv: str | None = None, channels: int = 1, size: int | None = None,
                 positive: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                 allow_duplicates: bool = False, nodes: list[str] | None = None, window: list[float] | None = None,
                 voi: str = "file"):
        super().__init__(root=root, csv=csv, channels=channels, size=size, positive=positive,
                         val_fraction=val_fraction, seed=seed, allow_duplicates=allow_duplicates, nodes=nodes)
        if window is not None and (len(window) != 2 or not window[1] > 0):
            raise HSLError(f"DicomFolders window must be [center, width] with width > 0, got {window}.")
        if voi not in ("file", "none"):
            raise HSLError(f"DicomFolders voi must be 'file' or 'none', got {voi!r}.")
        _pydicom()  # a missing extra is said before any file is read
        self.window, self.voi = None if window is None else [float(v) for v in window], voi

    def reading_args(self) -> dict:
        return {"window": self.window, "voi": self.voi}

    def _wanted(self, f: Path) -> bool:
        if f.suffix.lower() in self.extensions:
            return True
        if f.suffix or f.name == "DICOMDIR":
            return False
        with open(f, "rb") as handle:  # a PACS export's files often have no suffix: DICOM's preamble says
            return handle.read(132)[128:] == b"DICM"

    def decode(self, path: Path) -> Decoded:
        pydicom, processing = _pydicom()
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise Unreadable(f"not a readable DICOM file ({type(exc).__name__})") from exc
        if "PixelData" not in ds:
            raise Unreadable("holds no image (no Pixel Data)")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise Unreadable(f"{frames} frames", group=MULTI_FRAME)
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        try:
            raw = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types; the file is named either way
            name = getattr(syntax, "name", str(syntax))
            if "missing" in str(exc).lower() or "no plugin" in str(exc).lower() or "dependencies" in str(exc).lower():
                raise Unreadable(f"compressed as {name}, which no installed decoder reads: pip install "
                                 "'hsl_lightning[dicom]' (JPEG 2000, JPEG-LS), or pylibjpeg-libjpeg / python-gdcm "
                                 "(JPEG lossless)") from exc
            raise Unreadable(f"cannot decode its {name} pixel data ({type(exc).__name__})") from exc
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        bits = int(ds.get("BitsStored", raw.itemsize * 8))
        grey = photometric in ("MONOCHROME1", "MONOCHROME2")
        if not grey and photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            raise Unreadable(f"photometric interpretation {photometric} is not read (MONOCHROME1/2, RGB and YBR are)")
        if (grey and raw.ndim != 2) or (not grey and raw.ndim != 3):
            raise Unreadable(f"pixels shaped {raw.shape}", group=MULTI_FRAME)
        try:
            if grey:
                x = self._grey(raw, ds, processing, bits)
                if photometric == "MONOCHROME1":
                    x = 1.0 - x
                colour = False
            else:
                x = raw.astype(np.float64) / (2 ** bits - 1)
                colour = not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2]))
                if self.channels == 1:
                    x = x @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL converts colour to grey
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as exc:
            raise Unreadable(f"its rescale, LUT or window cannot be applied ({type(exc).__name__}: an element is "
                             "empty or malformed)") from exc
        if not np.all(np.isfinite(x)):
            raise Unreadable("its rescale, LUT or window gives values that are not numbers")
        if self.channels == 3 and x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=2)
        stored = np.round(np.clip(x, 0, 1) * 65535).astype(np.uint16)
        return Decoded(stored, bits, 3 if not grey else 1, digest_of(raw), full_scale=65535.0, colour=colour)

    def _grey(self, raw: np.ndarray, ds, processing, bits: int) -> np.ndarray:
        """A grey image through the modality LUT and the VOI, as [0, 1] (see the module docstring)."""
        from pydicom.multival import MultiValue

        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        if "ModalityLUTSequence" in ds:
            v = processing.apply_modality_lut(raw, ds).astype(np.float64)
            low, high = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        else:
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            v = raw.astype(np.float64) * slope + intercept
            low, high = sorted((low * slope + intercept, high * slope + intercept))
        if self.window is not None:
            return _linear(v, *self.window)
        if self.voi == "file" and "VOILUTSequence" in ds:
            return _voi_lut(v, ds.VOILUTSequence[0], ds)
        if self.voi == "file" and "WindowCenter" in ds and "WindowWidth" in ds:
            first = lambda value: float(value[0] if isinstance(value, (list, MultiValue)) else value)  # noqa: E731
            center, width = first(ds.WindowCenter), first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            if width <= 0:
                raise ValueError("window width must be positive")
            if function == "SIGMOID":
                return 1 / (1 + np.exp(-4 * (v - center) / width))
            if function == "LINEAR_EXACT":
                return np.clip((v - center) / width + 0.5, 0, 1)
            return _linear(v, center, width)
        return (v - low) / max(high - low, 1e-12)


def _voi_lut(v: np.ndarray, item, ds) -> np.ndarray:
    """A VOI LUT Sequence item onto [0, 1] (PS3.3 C.11.2.1.1): values below the first mapped one take the first
    entry, above the last the last. (pydicom 3.0's apply_voi_lut indexes an 8-bit LUT of more than 256 entries
    through uint8 and wraps, so the table is applied here.)"""
    entries, first, depth = (int(x) for x in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        table = np.frombuffer(data, dtype="<u2" if little else ">u2")[:entries]
    else:
        table = np.asarray([data] if isinstance(data, int) else list(data))
    index = np.clip(np.round(v).astype(np.int64) - first, 0, len(table) - 1)
    return table.astype(np.float64)[index] / (2 ** depth - 1)


def _linear(v: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) onto [0, 1]."""
    if width <= 1:
        return (v > center - 0.5).astype(np.float64)
    return np.clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1)

"""A hospital's own files as a source: the listing, the reading and the checks that image folders and
DICOM share.

Files are listed either from folders, ``root/<node>/<train|val|test>/<label>/<file>``, or from a CSV
with the columns ``path``, ``label``, ``split`` and optionally ``node`` (without it every row belongs
to one node named after the CSV file, ``hospital_a.csv`` -> ``hospital_a``; relative paths are taken
from the CSV's folder). A :class:`FileSource` subclass only decodes one file (:meth:`FileSource.decode`).

:meth:`FileSource.survey` reads every file and never stops at the first problem: it collects
unreadable files by name, empty and one-class splits, duplicates within and across splits (by a
hash of the decoded pixels at full depth), sizes, bit depths and channel counts. ``load`` refuses
the problems that would make a run wrong (:attr:`Problem.fatal`) with one message; ``hsl check``
reports them all.

Depth: a node whose files are all 8-bit is kept as uint8 exactly as read; a node with deeper files
(or a ``window``) is kept as uint16 standing for [0, 1] (see :mod:`hsl_lightning.data.base`), so a
12-bit signal reaches the model level for level.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hsl_lightning.data.base import SPLITS, ImageSet, Source, harmonize
from hsl_lightning.data.heterogeneity import stratified_split
from hsl_lightning.errors import HSLError

SHOWN = 5  # files named in one message; the count says how many more
MULTI_PAGE = "multi-frame, multi-page or 3D file(s): only 2D images are read; export one frame per file, or leave them out"


class DataProblems(HSLError):
    """Training refused a source's files: the message names them; :meth:`without_paths` says the same without a
    file's name (what a deployed site sends the coordinator: export paths can hold a patient's ID)."""

    def __init__(self, message: str, problems: list):
        super().__init__(message)
        self.problems = problems

    def without_paths(self) -> str:
        return f"{len(self.problems)} problem(s) with its files: " + "; ".join(
            f"{p.node}/{p.split}: {p.what}" if p.split else f"{p.node}: {p.what}" for p in self.problems)


class Unreadable(Exception):
    """A file that cannot be decoded; the message says why (never a patient identifier). ``group``: files refused
    for one reason are reported together, with that reason once (default: each with its own)."""

    def __init__(self, why: str, group: str | None = None):
        super().__init__(why)
        self.group = group


@dataclass
class Decoded:
    """One decoded file. ``array``: (H, W) or (H, W, C) pixels; ``full_scale`` and ``offset``: the
    values that stand for intensity 1 and 0 (``full_scale`` None: the source's per-node rule decides);
    ``bits``: the depth the file declares; ``channels``: as stored in the file; ``colour``: whether a
    3-channel file's channels differ (a grey image saved as RGB has them equal); ``digest``: a hash of
    the decoded pixels at full depth."""

    array: np.ndarray
    bits: int
    channels: int
    digest: bytes
    full_scale: float | None = 255.0
    offset: float = 0.0
    colour: bool = False
    top: int = 0  # the largest stored value (the per-site depth rule reads it; the array may be resized)
    shape: tuple = ()  # (H, W) as stored in the file

    def __post_init__(self):
        self.shape = self.shape or tuple(self.array.shape[:2])


def digest_of(array: np.ndarray) -> bytes:
    """A hash of pixels at full depth (shape and dtype included): equal files decode to equal digests."""
    h = hashlib.sha256(str((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


@dataclass
class Problem:
    """Something wrong with a node's files. ``fatal``: training refuses it (``hsl check`` reports every
    problem); ``files``: the files concerned, named in the message (at most :data:`SHOWN`)."""

    node: str
    split: str | None
    what: str
    files: list[str] = field(default_factory=list)
    fatal: bool = True

    def message(self) -> str:
        where = f"{self.node}/{self.split}" if self.split else self.node
        shown = "; ".join(self.files[:SHOWN]) + (f"; ... {len(self.files) - SHOWN} more" if len(self.files) > SHOWN else "")
        return f"{where}: {self.what}" + (f" ({shown})" if shown else "")


@dataclass
class SplitFiles:
    """What a survey found in one split of one node."""

    files: list[Path] = field(default_factory=list)  # the readable files, in the order of ``images``
    labels: list[int] = field(default_factory=list)
    decoded: list[Decoded] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why
    groups: dict[str, str] = field(default_factory=dict)  # file -> the reason it shares with others
    images: ImageSet | None = None

    def facts(self) -> dict:
        """Counts, class balance, sizes, bit depths and channels, for the check's report."""
        ones = sum(self.labels)
        return {"images": len(self.files), "positives": ones, "negatives": len(self.files) - ones,
                "unreadable": len(self.unreadable),
                "sizes": dict(Counter(f"{d.shape[1]}x{d.shape[0]}" for d in self.decoded)),
                "bits": dict(Counter(str(d.bits) for d in self.decoded)),
                "channels": dict(Counter(str(d.channels) for d in self.decoded))}


@dataclass
class Survey:
    """Every node's files as read (None: a node held at another site) and the problems found."""

    nodes: dict[str, dict[str, SplitFiles] | None]
    problems: list[Problem]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def _wide(decoded: list[Decoded]) -> bool:
    """Whether a node's files are kept at 16 bits: any file deeper than 8 bits, or scaled (a window, a rule)."""
    return any(d.full_scale != 255.0 or d.offset != 0 or d.array.dtype != np.uint8 for d in decoded)


def _chw(array: np.ndarray) -> torch.Tensor:
    """An (H, W) or (H, W, C) array as a (C, H, W) tensor."""
    x = torch.from_numpy(np.require(array, requirements=["C", "W"]))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


class FileSource(Source):
    """A node per folder (or per CSV ``node``), each with train/test (and optional val) files; see the
    module docstring. Subclasses decode one file.

    Args:
        root: the folder holding one sub-folder per institution.
        csv: a CSV of ``path,label,split[,node]`` instead of folders (``root`` is then unused).
        channels: 1 (grey) or 3 (RGB): every image is converted to it.
        size: resize every image to ``size`` x ``size`` px (default: keep the files' size; a split's
            images must then all agree).
        positive: the name of the positive label (folder or CSV value), when labels are not ``0`` and ``1``.
        val_fraction: the stratified share of train held out for validation where ``val`` is absent.
        seed: the seed of that hold-out.
        allow_duplicates: accept the same image in two splits of one institution.
        nodes: the institutions' names, in the federation's order (default: every node found, sorted).
            In a deployment every site lists them all and holds only its own: the others are built at
            their sites.
    """

    per_node = True
    extensions: frozenset[str] = frozenset()
    kind = "file"

    def __init__(self, root: str | None = None, csv: str | None = None, channels: int = 1, size: int | None = None,
                 positive: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                 allow_duplicates: bool = False, nodes: list[str] | None = None):
        name = type(self).__name__
        if channels not in (1, 3):
            raise HSLError(f"{name} channels must be 1 or 3, got {channels}.")
        if (root is None) == (csv is None):
            raise HSLError(f"{name} needs exactly one of root (a folder per institution) and csv (path,label,split"
                           f"[,node]), got {'both' if root else 'neither'}.")
        if nodes is not None and (not nodes or len(set(nodes)) != len(nodes) or not all(isinstance(n, str) for n in nodes)):
            raise HSLError(f"{name} nodes must be distinct names, got {nodes}.")
        self.root, self.csv, self.channels, self.size, self.positive = root, csv, channels, size, positive
        self.val_fraction, self.seed, self.allow_duplicates = val_fraction, seed, allow_duplicates
        self.nodes = None if nodes is None else list(nodes)

    def describe(self) -> str:
        return f"{self.kind}s listed in {self.csv}" if self.csv else f"{self.kind} folders under {self.root}"

    def reading(self) -> dict:
        """How this source decodes and scales a file, for a checkpoint (``hsl predict`` reads new files the same way):
        the class and the arguments that change the pixels."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"channels": self.channels, **self.reading_args()}}

    def reading_args(self) -> dict:
        """The subclass's arguments that change a file's pixels (depth, window, ...)."""
        return {}

    # ----------------------------------------------------------------- subclass hooks
    def decode(self, path: Path) -> Decoded:
        """One file's pixels and what it declares; raises :class:`Unreadable` with the reason."""
        raise NotImplementedError

    def full_scale(self, node: str, decoded: list[Decoded]) -> None:
        """Set ``full_scale`` where a file left it to the node (None); the default refuses to guess."""
        if any(d.full_scale is None for d in decoded):
            raise HSLError(f"{type(self).__name__} cannot tell the range of some of {node}'s files.")

    def node_problems(self, node: str, splits: dict[str, SplitFiles]) -> list[Problem]:
        """Problems a subclass finds across a node's files (after decoding): none by default."""
        return []

    # ----------------------------------------------------------------- listing
    def _label(self, value: str, where: str) -> int:
        if self.positive is not None:
            return int(value == self.positive)
        if value not in ("0", "1"):
            raise HSLError(f"Label {value!r} ({where}) is neither '0' nor '1'. Use labels 0 and 1, or set "
                           "positive: <the positive class's name>.")
        return int(value)

    def listing(self) -> dict[str, dict[str, list[tuple[Path, int]]] | None]:
        """node -> split -> (file, label), in a stable order; None for a node that is not here."""
        return self._csv_listing() if self.csv else self._folder_listing()

    def _folder_listing(self) -> dict:
        base = Path(self.root).expanduser()
        layout = f"{base}/<node>/<split>/<label>/<{self.kind}>"
        if not base.is_dir():
            raise HSLError(f"{type(self).__name__} root not found: {base}. Expected {layout}.")
        if self.nodes is not None:  # the federation's list: folders absent here are built at other sites
            folders = [base / name for name in self.nodes]
            if not any(f.is_dir() for f in folders):
                raise HSLError(f"{base} holds none of the node folders {self.nodes}. Expected {layout} for this site's "
                               "own node.")
        else:
            folders = sorted(p for p in base.iterdir() if p.is_dir())
        if not folders:
            raise HSLError(f"{base} holds no node folders. Expected {layout}.")
        out = {}
        for node in folders:
            if not node.is_dir():
                out[node.name] = None
                continue
            for split in ("train", "test"):
                if not (node / split).is_dir():
                    raise HSLError(f"Node folder {node} has no '{split}' folder (needs train/ and test/, val/ optional).")
            out[node.name] = {}
            for split in SPLITS:
                if (node / split).is_dir():
                    out[node.name][split] = [
                        (f, self._label(d.name, str(d))) for d in sorted(p for p in (node / split).iterdir() if p.is_dir())
                        for f in sorted(d.iterdir()) if f.is_file() and self._wanted(f)]
        return out

    def _wanted(self, f: Path) -> bool:
        return f.suffix.lower() in self.extensions

    def _csv_listing(self) -> dict:
        table = Path(self.csv).expanduser()
        if not table.is_file():
            raise HSLError(f"{type(self).__name__} csv not found: {table}. Expected a CSV with columns path,label,split"
                           "[,node].")
        with open(table, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's BOM is not a column name
            reader = csv.DictReader(handle)
            missing = {"path", "label", "split"} - set(reader.fieldnames or [])
            if missing:
                raise HSLError(f"{table} lacks the column(s) {', '.join(sorted(missing))} (it has "
                               f"{', '.join(reader.fieldnames or []) or 'none'}); expected path,label,split[,node].")
            rows = list(reader)
        out: dict = {}
        for i, row in enumerate(rows, start=2):
            empty = [k for k in ("path", "label", "split") if not (row.get(k) or "").strip()]
            if empty:
                raise HSLError(f"{table} line {i} has no {', '.join(empty)}.")
            split = row["split"].strip()
            if split not in SPLITS:
                raise HSLError(f"{table} line {i}: split {split!r} is not one of {', '.join(SPLITS)}.")
            node = (row.get("node") or "").strip() or table.stem
            path = Path(row["path"].strip()).expanduser()
            path = path if path.is_absolute() else table.parent / path
            out.setdefault(node, {}).setdefault(split, []).append((path, self._label(row["label"].strip(), f"{table} line {i}")))
        names = self.nodes if self.nodes is not None else sorted(out)
        if not any(name in out for name in names):
            raise HSLError(f"{table} lists none of the nodes {names} (it lists {', '.join(sorted(out)) or 'no rows'}).")
        for name in names:
            lacking = [split for split in ("train", "test") if name in out and split not in out[name]]
            if lacking:
                raise HSLError(f"{table} lists no {' or '.join(lacking)} rows for node {name} (each node needs train "
                               "and test, val optional).")
        return {name: out.get(name) for name in names}

    # ----------------------------------------------------------------- reading
    def survey(self, progress=None, listing: dict | None = None) -> Survey:
        """Read every file of every node here; collect, never raise for, a file's problems (see the module
        docstring). ``progress``: called with the number of files read, after each file; ``listing``: the
        :meth:`listing` already made (``hsl check`` counts the files first)."""
        nodes, problems = {}, []
        for name, splits in (listing if listing is not None else self.listing()).items():
            if splits is None:
                nodes[name] = None
                continue
            found = {}
            for split in SPLITS:
                if split not in splits:
                    continue
                got = found[split] = SplitFiles()
                for f, label in splits[split]:
                    try:
                        d = self._shrunk(self.decode(f), self.size)
                    except Unreadable as exc:
                        got.unreadable[str(f)] = str(exc)
                        if exc.group:
                            got.groups[str(f)] = exc.group
                    else:
                        got.files.append(f)
                        got.labels.append(label)
                        got.decoded.append(d)
                    if progress is not None:
                        progress(1)
            self.full_scale(name, [d for got in found.values() for d in got.decoded])
            problems += self._problems(name, found)
            nodes[name] = found
        return Survey(nodes, problems)

    def _problems(self, name: str, found: dict[str, SplitFiles]) -> list[Problem]:
        out = []
        for split, got in found.items():
            alone = {f: why for f, why in got.unreadable.items() if f not in got.groups}
            if alone:
                out.append(Problem(name, split, f"{len(alone)} unreadable {self.kind}(s)",
                                   [f"{f}: {why}" for f, why in alone.items()]))
            for group in sorted(set(got.groups.values())):
                files = [f for f, g in got.groups.items() if g == group]
                out.append(Problem(name, split, f"{len(files)} {group}", [f"{f}: {got.unreadable[f]}" for f in files]))
            if not got.files:
                if not got.unreadable:
                    out.append(Problem(name, split, f"empty: no {self.kind}s ({', '.join(sorted(self.extensions))})"))
                continue
            if len(set(got.labels)) < 2:
                only = got.labels[0]
                out.append(Problem(name, split, f"one class only: all {len(got.files)} images have label {only}; an "
                                   "AUC needs both", fatal=False))
            wrong = [str(f) for f, d in zip(got.files, got.decoded)
                     if d.colour != (self.channels == 3)]
            if wrong:
                want = "grey" if self.channels == 1 else "colour (3 channels)"
                out.append(Problem(name, split, f"{len(wrong)} image(s) are not {want} as channels: {self.channels} "
                                   "says (training converts them)", wrong, fatal=False))
            shapes = {d.shape for d in got.decoded}
            if self.size is None and len(shapes) > 1:
                out.append(Problem(name, split, f"images of {len(shapes)} sizes ({', '.join(f'{w}x{h}' for h, w in sorted(shapes))}"
                                   "). Set size: N to resize all to N x N"))
            seen: dict[bytes, tuple[str, int]] = {}
            twins, conflicting = [], []
            for f, d, label in zip(got.files, got.decoded, got.labels):
                if d.digest in seen:
                    (conflicting if seen[d.digest][1] != label else twins).append(f"{seen[d.digest][0]} = {f}")
                seen.setdefault(d.digest, (str(f), label))
            if conflicting:
                out.append(Problem(name, split, f"{len(conflicting)} image(s) filed under both labels", conflicting))
            if twins:
                held_out = split == "train" and "val" not in found  # validation is drawn from train: a copy may
                out.append(Problem(name, split, f"{len(twins)} duplicate image(s) within the split (they count twice"
                                   + ("; validation is held out of train, so a copy could land on both sides)"
                                      if held_out else ")"), twins, fatal=held_out and not self.allow_duplicates))
        seen, clashes = {}, []
        for split, got in found.items():
            mine = {}
            for f, d in zip(got.files, got.decoded):
                mine.setdefault(d.digest, str(f))
            clashes += [f"{seen[h]} = {f}" for h, f in mine.items() if h in seen]
            seen.update(mine)
        if clashes:
            out.append(Problem(name, None, f"holds {len(clashes)} image(s) in more than one split: its test or validation "
                               "results would count images it trained on. Remove the copies, or set allow_duplicates: "
                               "true", clashes, fatal=not self.allow_duplicates))
        out += self.node_problems(name, found)
        return out

    def build(self, survey: Survey) -> dict:
        """The surveyed files as ImageSets, per node and split (validation held out of train where absent)."""
        out = {}
        for name, found in survey.nodes.items():
            if found is None:
                out[name] = None
                continue
            wide = _wide([d for got in found.values() for d in got.decoded])
            splits = {}
            for split, got in found.items():
                images = [self._stored(d, wide) for d in got.decoded]
                for d in got.decoded:
                    d.array = None  # the raw copy goes as soon as it is stored
                if self.size is not None:
                    images = [harmonize(x.unsqueeze(0), self.channels, self.size)[0] for x in images]
                got.images = splits[split] = ImageSet(torch.stack(images), torch.tensor(got.labels))
            if "val" not in splits:
                g = torch.Generator().manual_seed(self.seed)
                keep, held = stratified_split(splits["train"].labels, (1 - self.val_fraction, self.val_fraction), g)
                splits["val"], splits["train"] = splits["train"].subset(held), splits["train"].subset(keep)
            out[name] = {s: splits[s] for s in SPLITS}
        return out

    @staticmethod
    def _shrunk(d: Decoded, size: int | None) -> Decoded:
        """The decoded file resized to ``size`` at once (its values as they are), so a survey of large files holds
        them at training size, not at the files' own; the hash, the size and the largest value are the file's."""
        if size is None or d.array.shape[:2] == (size, size):
            return d
        x = _chw(d.array)
        x = harmonize(x.unsqueeze(0), x.shape[0], size)[0]
        d.array = (x[0] if x.shape[0] == 1 and d.array.ndim == 2 else x.permute(1, 2, 0)).numpy()
        return d

    def _stored(self, d: Decoded, wide: bool) -> torch.Tensor:
        """One decoded file as the model's stored image: uint8 as read for an 8-bit node, else uint16 over the
        file's [offset, offset + full_scale] (clipped), converted to the source's channels."""
        a = d.array
        if wide:
            x = (a.astype(np.float64) - d.offset) / d.full_scale
            a = np.round(np.clip(x, 0, 1) * 65535).astype(np.uint16)
        return harmonize(_chw(a).unsqueeze(0), self.channels, None)[0]

    def prepare(self, files: list[Path], size: int) -> tuple[list[torch.Tensor], list[Path], dict[str, str]]:
        """Loose files (``hsl predict``) as training prepares a node's images: decoded, scaled by the source's rule
        (``depth: auto`` applies it over these files), converted to the source's channels and resized to ``size``.
        Returns the images, the files they came from, and the unreadable files with the reason."""
        decoded, kept, errors = [], [], {}
        for f in files:
            try:
                decoded.append(self._shrunk(self.decode(f), size))
                kept.append(f)
            except Unreadable as exc:
                errors[str(f)] = str(exc)
        if not decoded:
            return [], [], errors
        self.full_scale("the images given", decoded)
        wide = _wide(decoded)
        images = [harmonize(self._stored(d, wide).unsqueeze(0), self.channels, size)[0] for d in decoded]
        return images, kept, errors

    def keep(self, survey: Survey) -> None:
        """Have the next :meth:`load` build from this survey instead of reading every file again (``hsl check``)."""
        self._kept = survey

    def load(self, root: str | None = None) -> dict:
        survey, self._kept = getattr(self, "_kept", None) or self.survey(), None
        self.facts = {name: {split: got.facts() for split, got in found.items()}  # sizes, depths: site statistics
                      for name, found in survey.nodes.items() if found is not None}
        fatal = survey.fatal
        if fatal:
            raise DataProblems(f"{self.describe()}: {len(fatal)} problem(s) before any training: "
                               + " | ".join(p.message() for p in fatal) + ". Run hsl check --config ... for the full "
                               "report.", fatal)
        return self.build(survey)


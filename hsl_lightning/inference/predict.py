"""``hsl predict``: a probability per image file from a finished run's deployed model.

Images (PNG, JPEG, BMP, TIFF, or DICOM for a run trained on DICOM; files, or folders searched
recursively) are prepared exactly as training prepared its images, by the source the checkpoint names
(:func:`reader`): decoded at full depth and scaled by the training source's
rule, converted to the model's channel count, resized to the training size (bicubic, antialiased),
scaled to [0, 1]; the module normalises them itself.
A file that cannot be read is reported by name and left out; every other image is still written.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hsl_lightning.data.base import unit
from hsl_lightning.data.files import FileSource
from hsl_lightning.data.folders import EXTENSIONS, ImageFolders
from hsl_lightning.inference import checkpoints
from hsl_lightning.errors import HSLError


def image_files(paths: list[str | Path], extensions=EXTENSIONS, wanted=None) -> list[Path]:
    """The image files named, and those under the folders named (sorted), in the order given; ``wanted`` (a
    source's own test, e.g. DICOM files without a suffix) instead of the extensions when given."""
    wanted = wanted or (lambda f: f.suffix.lower() in extensions)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and wanted(f))
            if not found:
                raise HSLError(f"No images ({', '.join(sorted(extensions))}) under {p}.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise HSLError(f"No such image file or folder: {p}.")
    return files


def reader(reading: dict | None, channels: int, node: str | None = None) -> FileSource:
    """The source that decodes loose files as a checkpoint's training did (:meth:`FileSource.reading`; with
    ``depth: auto``, the depth training chose: for all nodes where they agree, else for ``node``); without one
    (a run on synthetic or MedMNIST data, or an older checkpoint), :class:`ImageFolders`' defaults."""
    if not reading:
        return ImageFolders(root=".", channels=channels)
    module, _, name = reading["class_path"].rpartition(".")
    if not module.startswith("hsl_lightning."):
        raise HSLError(f"The checkpoint names a reader outside hsl_lightning ({reading['class_path']}); refusing it.")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, FileSource)):
        raise HSLError(f"The checkpoint's reader {reading['class_path']} is not a file source.")
    args = dict(reading["init_args"])
    depths = args.pop("depths", None) or {}
    if args.get("depth") == "auto" and node in depths:  # the bits training chose for this node's files
        args["depth"] = depths[node]
    return cls(root=".", **args)


def model_path(run_dir: str | Path, node: str | None) -> Path:
    """The checkpoint to predict with: the run's one model, or ``node``'s (checked by :func:`_site`
    once loaded: ``node`` then picks a split network's site part, and is refused otherwise)."""
    models = checkpoints.deployed(run_dir)
    if None in models:
        return models[None]
    if node is None or node not in models:
        what = "names no trained node" if node is not None else "deployed one model per node"
        raise HSLError(f"{run_dir} {what}: choose one with --node ({', '.join(models)}).")
    return models[node]


def _site(module, meta: dict, node: str | None) -> int | None:
    """The site part a split network (SplitAVG) routes the images through: the one of ``node``."""
    if not hasattr(module, "sites"):
        if node is not None and meta.get("node") is None:
            raise HSLError(f"{meta.get('run', 'The run')} deployed one model for every node; leave out --node.")
        return None
    names = list(meta.get("nodes") or [])
    if node is None or node not in names:
        what = f"'{node}' is not one of its hospitals" if node is not None else "each hospital has its own site part"
        raise HSLError(f"This run trained a split network ({what}): choose the hospital whose site part the images go "
                       f"through with --node ({', '.join(names)}).")
    return names.index(node)


@torch.no_grad()
def predict(run_dir: str | Path, paths: list[str | Path], out: str | Path, node: str | None = None,
            batch_size: int = 64, progress: bool = True) -> dict:
    """Write ``out`` (CSV: path, probability, label at the model's threshold, threshold, model; or
    the error for a file that could not be read). Returns counts and the unreadable files."""
    path = model_path(run_dir, node)
    module, meta = checkpoints.load(path)
    if getattr(module, "sat_inference", None) == "paired":
        raise HSLError(f"{path} infers with sat_inference 'paired', which needs a SAT image beside every input; "
                       "predict with a model trained with sat_inference primary or reference.")
    channels, size, threshold = int(meta["in_chans"]), int(meta["image_size"]), float(meta["threshold"])
    site = _site(module, meta, node)
    source = reader(meta.get("reader"), channels, node or meta.get("node"))
    files = image_files(paths, source.extensions, source._wanted)
    images, readable, unreadable = source.prepare(files, size)
    rows = [{"path": f, "probability": "", "label": "", "threshold": threshold, "model": node or "model",
             "error": f"cannot read {f}: {why}"} for f, why in unreadable.items()]
    errors = [{"path": r["path"], "error": r["error"]} for r in rows]
    bar = tqdm(total=len(images), desc="hsl predict", unit="image", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(images), batch_size):
        chunk = readable[start: start + batch_size]
        batch = unit(torch.stack(images[start: start + batch_size]))
        if site is None:
            probs = module.predict_proba(batch).tolist()
        else:  # a split network: the images go through the chosen hospital's site part
            module.eval()
            tags = torch.full((len(batch),), site, dtype=torch.long)
            probs = torch.sigmoid(module.primary_logits({"image": batch, "node": tags}).float()).tolist()
        rows += [{"path": str(f), "probability": f"{p:.6f}", "label": int(p >= threshold), "threshold": threshold,
                  "model": node or "model", "error": ""} for f, p in zip(chunk, probs)]
        bar.update(len(chunk))
    bar.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r["path"]])
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "probability", "label", "threshold", "model", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return {"images": len(files), "predicted": len(files) - len(errors), "errors": errors, "out": str(out)}

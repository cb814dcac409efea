"""``hsl check``: a site's data, checked before any round.

For a source of a hospital's own files (:class:`~hsl_lightning.data.files.FileSource`: image folders,
DICOM) every file is read and every problem collected (:meth:`FileSource.survey`): unreadable files
by name, empty and one-class splits, duplicates within and across splits (by a hash of the pixels at
full depth), mixed sizes, channel counts that differ from the config. Then, where nothing stops it,
the data module is built exactly as ``hsl fit`` builds it, and every image of every split goes
through the training transform (scaling, resizing, the simulated scanner where one is configured,
and for training images the augmentation, drawn as in training): each must come out with the
model's shape and finite values in [0, 1]. Per split the report gives counts, class balance, sizes,
bit depths and channels. Other sources (synthetic, MedMNIST) get the transform step and the counts.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hsl_lightning.data.base import SPLITS, HostedElsewhere
from hsl_lightning.data.files import FileSource, Problem
from hsl_lightning.data.sampling import PairedImages, prepare_batch

CHUNK = 256


def check(dm, progress: bool = True) -> dict:
    """Check a data module's primary data (see the module docstring). Returns the report: ``nodes`` (node ->
    split -> facts, or ``"at another site"``) and ``problems`` (each ``where``, ``what``, ``files``, ``fatal``)."""
    source = dm.primary
    report = {"source": source.describe(), "nodes": {}, "problems": []}
    problems: list[Problem] = []
    if isinstance(source, FileSource):
        listing = source.listing()
        files = sum(len(v) for splits in listing.values() if splits for v in splits.values())
        with tqdm(total=files, desc="hsl check: reading", unit="file", disable=not progress, dynamic_ncols=True) as bar:
            survey = source.survey(progress=bar.update, listing=listing)
        problems += survey.problems
        for node, found in survey.nodes.items():
            report["nodes"][node] = "at another site" if found is None else {s: f.facts() for s, f in found.items()}
        if survey.fatal:
            report["problems"] = [_row(p) for p in problems]
            return report
        source.keep(survey)  # the data module builds from what was read, not from a second reading
        here = {i for i, found in enumerate(survey.nodes.values()) if found is not None}
        if len(here) < len(survey.nodes):  # a deployed site's config: the other nodes are built at their sites
            dm.host(lambda n: here)
    dm.setup()
    for i, node in enumerate(dm.nodes):
        if isinstance(node.train, HostedElsewhere):
            continue
        facts = report["nodes"].setdefault(node.name, {})
        for split in SPLITS:
            data = node.split(split)
            row = facts.setdefault(split, {})
            row.update({"images": len(data), "positives": data.positives, "negatives": len(data) - data.positives,
                        "stored_as": str(data.images.dtype).replace("torch.", "")})
            if not isinstance(source, FileSource):  # sizes and channels as built (files: as stored, from the survey)
                row.update(sizes={f"{data.images.shape[-1]}x{data.images.shape[-2]}": len(data)},
                           channels={str(data.images.shape[1]): len(data)})
                if len(data) == 0:
                    problems.append(Problem(node.name, split, "empty: no images"))
                elif data.positives in (0, len(data)):
                    problems.append(Problem(node.name, split, f"one class only: all {len(data)} images have label "
                                            f"{int(data.positives > 0)}; an AUC needs both", fatal=False))
            bad = _through_transform(dm, i, split)
            if bad:
                problems.append(Problem(node.name, split, f"{len(bad)} image(s) come out of the training transform "
                                        f"with {bad[0]}"))
    report["problems"] = [_row(p) for p in problems]
    return report


def _through_transform(dm, i: int, split: str) -> list[str]:
    """Every image of node ``i``'s ``split`` through the training transform (augmented as training draws it, for
    train); what is wrong with those that come out wrong."""
    data = dm.nodes[i].split(split)
    augment = dm.augment and split == "train"
    images = PairedImages(data, None, augment, dm.seed)
    want = (dm.in_chans, dm.size, dm.size)
    bad = []
    for start in range(0, len(data), CHUNK):
        batch = prepare_batch(images.__getitems__([(j, -1) for j in range(start, min(start + CHUNK, len(data)))]))
        x = batch["image"]
        if tuple(x.shape[1:]) != want:
            bad += [f"shape {tuple(x.shape[1:])}, not {want}"] * len(x)
            continue
        flat = x.flatten(1)
        wrong = ~torch.isfinite(flat).all(1) | (flat.amin(1) < -1e-6) | (flat.amax(1) > 1 + 1e-6)
        bad += ["values outside [0, 1] or not finite"] * int(wrong.sum())
    return bad


def _row(p: Problem) -> dict:
    return {"where": f"{p.node}/{p.split}" if p.split else p.node, "what": p.what, "files": p.files,
            "fatal": p.fatal, "message": p.message()}


def format_report(report: dict) -> str:
    """The report as text: a table per node and split, then the problems (or that there are none)."""
    lines = [f"hsl check: {report['source']}", "",
             f"{'node/split':<24} {'images':>7} {'pos':>5} {'neg':>5} {'unread':>6}  {'sizes':<18} {'bits':<10} channels"]
    for node, splits in report["nodes"].items():
        if isinstance(splits, str):
            lines.append(f"{node:<24} ({splits})")
            continue
        for split, f in splits.items():
            sizes = ",".join(f.get("sizes", {})) or "-"
            bits = ",".join(f"{b}" for b in f.get("bits", {})) or f.get("stored_as", "-")
            channels = ",".join(f.get("channels", {})) or "-"
            lines.append(f"{node + '/' + split:<24} {f.get('images', 0):>7} {f.get('positives', 0):>5} "
                         f"{f.get('negatives', 0):>5} {f.get('unreadable', 0):>6}  {sizes[:18]:<18} {bits:<10} {channels}")
    problems = report["problems"]
    lines.append("")
    if not problems:
        lines.append("hsl check: no problems found.")
    else:
        fatal = sum(p["fatal"] for p in problems)
        lines.append(f"hsl check: {len(problems)} problem(s), {fatal} of which training refuses:")
        lines += [f"  - {p['message']}" for p in problems]
    return "\n".join(lines)


def exit_code(report: dict) -> int:
    """0: no problem; 1: problems (the report names them)."""
    return 1 if report["problems"] else 0


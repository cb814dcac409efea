"""What a hospital's images cost in memory once read: 8-bit files against the same images exported at 12 bits in
16-bit PNGs (kept as uint16 since images keep their depth), on a BreastMNIST-sized case (the real 780 BreastMNIST
images, 28 px, in 3 hospitals) and a quickstart-sized one (1,600 synthetic lesion images, 32 px).

    .venv/bin/python benchmarks/image_memory.py [--root ../shared/data/medmnist] [--out benchmarks/results/image_memory.json]

Per case and depth: the files written, the bytes the data module keeps for the images (every split of every node),
bytes per image, the time to read the folders and the process's peak RSS growth while reading (ru_maxrss, so
measured in a fresh subprocess per case, above its resident memory once torch is loaded).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_tree(folder: Path, images: np.ndarray, labels: np.ndarray, wide: bool) -> int:
    """Three hospitals (every third image each), 80 % train and 20 % test, as 8-bit or 12-bit-in-16 PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (image, label) in enumerate(zip(images, labels)):
        hospital, split = f"h{i % 3}", "test" if rng.random() < 0.2 else "train"
        out = folder / hospital / split / str(int(label))
        out.mkdir(parents=True, exist_ok=True)
        pixels = (image.astype(np.uint16) * 16 + rng.integers(0, 16, image.shape)).astype(np.uint16) if wide else image
        Image.fromarray(pixels).save(out / f"{i}.png")
    return len(images)


def measure(folder: str) -> dict:
    """In this process: read the tree as the data module does and report what is kept."""
    from hsl_lightning import FederatedDataModule, ImageFolders

    import torch  # noqa: F401 - loaded before the baseline, so the growth is the reading's own

    before = _rss_kb()
    start = time.perf_counter()
    dm = FederatedDataModule(primary=ImageFolders(folder), use_sat=False)
    dm.setup()
    seconds = time.perf_counter() - start
    held = sum(n.split(s).images.numel() * n.split(s).images.element_size() for n in dm.nodes for s in ("train", "val", "test"))
    count = sum(len(n.split(s)) for n in dm.nodes for s in ("train", "val", "test"))
    return {"images": count, "stored_as": str(dm.nodes[0].train.images.dtype).replace("torch.", ""),
            "bytes_kept": held, "bytes_per_image": held / count, "read_s": round(seconds, 3),
            "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1)}


def _rss_kb() -> int:
    """This process's resident memory now, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cases(root: Path) -> dict:
    from hsl_lightning.data.synthetic import SyntheticLesions

    breast = np.load(root / "breastmnist.npz")
    images = np.concatenate([breast[f"{s}_images"] for s in ("train", "val", "test")])
    labels = np.concatenate([breast[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")])
    lesions = SyntheticLesions(num_samples=1600, size=32).load()["all"]
    return {"breastmnist_28px": (images, labels),
            "quickstart_32px": (lesions.images[:, 0].numpy(), lesions.labels.numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "medmnist"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image_memory.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one tree, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    results = {"command": "python benchmarks/image_memory.py", "machine": f"{platform.processor() or platform.machine()}",
               "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (images, labels) in cases(Path(args.root)).items():
            for depth, wide in (("8-bit PNG", False), ("12-bit in 16-bit PNG", True)):
                folder = Path(tmp) / f"{name}-{int(wide)}"
                files = write_tree(folder, images, labels, wide)
                done = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True,
                                      text=True, check=True)
                row = {"files": files, **json.loads(done.stdout.strip().splitlines()[-1])}
                results["cases"].setdefault(name, {})[depth] = row
                print(name, depth, row, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

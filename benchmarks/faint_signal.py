"""A faint finding in 12-bit images, kept at depth: does training find it, across data seeds and thread counts?

Three hospitals of 12-bit images in 16-bit PNGs (tests/test_folders.py's twelve_bit_hospitals: a background of about
2000, noise sd 6 levels, positives with a disc of +24 levels), 60 training images per class and hospital, read with
ImageFolders' defaults (depth auto: 12 bits). Two models at one budget (5 rounds of 3 local epochs, batch 16):
a plain classifier under FedAvg without an anchor, and HSL with the synthetic 8-bit anchor (the quickstart's); and, to
look for why HSL misses it, HSL with the anchor's loss weighted 0 and HSL with a window [1950, 2100] spanning the finding.

    .venv/bin/python benchmarks/faint_signal.py [--models classifier_fedavg hsl] [--seeds 0 1 2] [--threads 1 2]
        [--out benchmarks/results/faint_signal.json]

Prints and writes each run's per-hospital test AUCs and their mean. The seed draws the data and the model's initial
weights. Resumable: runs already in --out are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def one(model: str, seed: int, threads: int, work: Path) -> dict:
    import torch

    from conftest import tiny_hsl
    from hsl_lightning import ClassifierModule, FederatedDataModule, Federation, ImageFolders, SyntheticAnchor
    from test_folders import twelve_bit_hospitals

    torch.set_num_threads(threads)
    data = work / f"data{seed}"
    if not data.exists():
        twelve_bit_hospitals(data, seed=seed, n_train=60)
    hsl = model.startswith("hsl")
    window = [1950.0, 2100.0] if model == "hsl_window" else None  # the finding spans a sixth of the range
    dm = FederatedDataModule(primary=ImageFolders(str(data), window=window), use_sat=hsl,
                             sat=SyntheticAnchor(num_samples=240, size=32) if hsl else None, batch_size=16)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    torch.manual_seed(seed)  # the model's initial weights: seeded, so a run repeats in a fresh process
    summary = Federation(strategy="hsl" if hsl else "fedavg", rounds=5, local_epochs=3, run_dir=str(run),
                         wandb="disabled", progress=False, threads=threads).fit(
        (tiny_hsl(sat_weight=0.0) if model == "hsl_sat_weight_0" else tiny_hsl()) if hsl
        else ClassifierModule(backbone="test_resnet"), dm)
    aucs = [round(n["test_auc"], 3) for n in summary["nodes"]]
    return {"model": model, "seed": seed, "threads": threads, "test_aucs": aucs, "mean": round(sum(aucs) / 3, 3),
            "best_round": summary.get("best_round")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["classifier_fedavg", "hsl"],
                        choices=["classifier_fedavg", "hsl", "hsl_sat_weight_0", "hsl_window"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faint_signal.json"))
    args = parser.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {
        "command": "python benchmarks/faint_signal.py", "machine": platform.processor() or platform.machine(), "runs": []}
    have = {(r["model"], r["seed"], r["threads"]) for r in done["runs"]}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for seed in args.seeds:
                for threads in args.threads:
                    if (model, seed, threads) in have:
                        continue
                    row = one(model, seed, threads, Path(tmp))
                    done["runs"].append(row)
                    out.write_text(json.dumps(done, indent=2))
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

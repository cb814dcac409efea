"""The quickstart federation (3 hospitals, HSL, ResNet-18, 6 rounds x 3 local epochs) on one GPU.

Checks the GPU path end to end (every hospital of the rank on its GPU) through the Python API,
with the quickstart's settings, and reports the wall time and per-node AUCs. Needs no W&B or CLI
packages, so it runs on a bare GPU image with torch, timm and lightning.

    python benchmarks/gpu_quickstart.py [--rounds 6] [--epochs 3]

Ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsl_lightning import (FederatedDataModule, Federation, HSLModule, Scenario, SyntheticAnchor,  # noqa: E402
                           SyntheticLesions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--run-dir", default="/tmp/hsl_gpu_quickstart")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU here")
    dm = FederatedDataModule(primary=SyntheticLesions(num_samples=2400, size=32),
                             sat=SyntheticAnchor(num_samples=2000, size=32),
                             scenario=Scenario(num_nodes=3, feature_skew=0.5, sizes=[3, 2, 1]), batch_size=64)
    torch.manual_seed(0)
    start = time.perf_counter()
    summary = Federation(strategy="hsl", rounds=args.rounds, local_epochs=args.epochs, accelerator="gpu", devices=1,
                         run_dir=args.run_dir, wandb="disabled", progress=False).fit(
        HSLModule(backbone="resnet18"), dm)
    wall = time.perf_counter() - start
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "wall_s": round(wall, 1),
              "mean_test_auc": round(summary["mean_test_auc"], 4),
              "node_test_auc": [round(n["test_auc"], 4) for n in summary["nodes"]], "best_round": summary["best_round"]}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

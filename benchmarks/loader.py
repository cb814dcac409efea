"""How fast the training loader feeds a trainer, with the augmentation warped in it or left to the device.

The training loader draws paired batches (B primary + B SAT images, gathered from uint8 tensors
and converted to float) and each image's random flip and rotation; ``prepare_batch`` warps the
images where the batch is trained (on a GPU: on the GPU). This script times, on this machine's
CPU, for 28, 64 and 224 px (batch 64, one node of the synthetic task with its SAT):

    loader          what the CPU does per batch when training on a GPU (warping left to it)
    loader + warp   the same with the warping on the CPU too: what a CPU run does, and what
                    a GPU run did before the warping moved to the device

Images per second count primary images (each comes with a SAT image); medians of ``--repeats``
passes over ``--batches`` batches.

    .venv/bin/python benchmarks/loader.py          # about 20 s on 2 cores

Prints a table, writes benchmarks/results/loader.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsl_lightning import FederatedDataModule, Scenario, SyntheticAnchor, SyntheticLesions  # noqa: E402
from hsl_lightning.data.sampling import prepare_batch  # noqa: E402


def img_s(dm: FederatedDataModule, batches: int, warp: bool) -> float:
    start, images = time.perf_counter(), 0
    for batch in itertools.islice(dm.train_loader([0], seed=0), batches):
        if warp:
            batch = prepare_batch(batch)
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 64, 224])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'px':>5}{'loader img/s':>15}{'loader + warp img/s':>22}{'warp share':>12}")
    for size in args.sizes:
        n = args.batch * args.batches
        dm = FederatedDataModule(primary=SyntheticLesions(num_samples=3 * n, size=size),
                                 sat=SyntheticAnchor(num_samples=2 * n, size=size), scenario=Scenario(num_nodes=1),
                                 batch_size=args.batch, augment=True, samples_per_epoch=n)
        dm.setup()
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for warp in (False, True):
                runs[warp].append(img_s(dm, args.batches, warp))
        plain, warped = statistics.median(runs[False]), statistics.median(runs[True])
        share = 1 - warped / plain  # of the CPU time per batch, the warping's part
        rows.append({"size": size, "loader_img_s": round(plain), "loader_and_warp_img_s": round(warped),
                     "warp_share_of_cpu_time": round(share, 3)})
        print(f"{size:>5}{plain:>15,.0f}{warped:>22,.0f}{100 * share:>11.0f}%", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    print("RESULT " + json.dumps({f"{r['size']}px": {"loader_img_s": r["loader_img_s"],
                                                       "loader_and_warp_img_s": r["loader_and_warp_img_s"]}
                                  for r in rows}))


if __name__ == "__main__":
    main()

"""How fast is this machine? timm ResNet-18 training images/s at 28 px, batch 64, 1 channel, AdamW.

Machines of one kind differ severalfold in speed, so every published timing carries this figure
(the guide's reference machines: 175 images/s with 2 threads, 112 with 1, on the slow one).

    .venv/bin/python benchmarks/calibrate.py            # about 30 s; --threads 1 for one thread

Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=1, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 2, (64,)).float()

    def step():
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        opt.step()

    for _ in range(5):  # warm-up
        step()
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(64 * args.steps / (time.perf_counter() - start))
    result = {"resnet18_28px_b64_images_per_s": round(statistics.median(rates), 1), "threads": args.threads,
              "all": [round(r, 1) for r in rates], "machine": platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

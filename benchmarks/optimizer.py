"""How much of a CPU training step is the optimizer, and what torch's fused kernel saves.

torch.optim.AdamW and SGD have three implementations: a Python loop over parameters (torch's
default on CPU), ``foreach`` (one multi-tensor call per operation; torch's default on CUDA) and
``fused`` (one kernel for the whole update). The modules of hsl_lightning use ``fused`` unless
``fused_optimizer: false``. This script times one training step (forward, backward, optimizer) of
the library's modules with each implementation, and the optimizer step alone:

    ClassifierModule and HSLModule (primary + SAT towers, MMoE) with a ResNet-10t and a ResNet-18,
    28 px, one channel, batch 32 (HSL: 32 primary + 32 SAT images), AdamW, 1 and 2 threads.

Figures are medians over ``--repeats`` rounds that run the implementations in turn (``--steps``
timed steps each, after ``--warmup``), so slow drift of the machine hits all of them alike.

    .venv/bin/python benchmarks/optimizer.py        # about 3 minutes on 2 cores

Prints a table, writes benchmarks/results/optimizer.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
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

from hsl_lightning import ClassifierModule, HSLModule  # noqa: E402

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")


def make_optimizer(module, impl: str) -> torch.optim.Optimizer:
    if impl == "fused":
        return module.configure_optimizers()  # the library's default
    if impl == "for-loop":
        module.fused_optimizer = False
        try:
            return module.configure_optimizers()  # torch's default on CPU: the per-parameter loop
        finally:
            module.fused_optimizer = True
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=module.lr, weight_decay=module.weight_decay, foreach=True)


def batch_for(kind: str, batch: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"image": torch.rand(batch, 1, size, size, generator=g), "label": torch.randint(0, 2, (batch,), generator=g)}
    if kind == "hsl":
        out["sat_image"] = torch.rand(batch, 1, size, size, generator=g)
        out["sat_label"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def time_steps(module, optimizer, batch: dict, steps: int, warmup: int) -> tuple[float, float]:
    """Median milliseconds of a whole step and of ``optimizer.step()`` alone."""
    module.train()
    whole, opt_only = [], []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        loss = module.training_step(batch, s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        if s >= warmup:
            whole.append(t2 - t0)
            opt_only.append(t2 - t1)
    return 1000 * statistics.median(whole), 1000 * statistics.median(opt_only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["resnet10t", "resnet18"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizer.json"))
    args = p.parse_args()
    rows = []
    print(f"{'module':<12}{'backbone':<11}{'threads':>8}{'impl':>10}{'step ms':>10}{'optimizer ms':>14}"
          f"{'step vs loop':>14}")
    for kind in ("classifier", "hsl"):
        for backbone in args.backbones:
            for threads in args.threads:
                torch.set_num_threads(threads)
                batch = batch_for(kind, args.batch, args.size)
                samples = {impl: ([], []) for impl in IMPLEMENTATIONS}
                for _ in range(args.repeats):
                    for impl in IMPLEMENTATIONS:
                        torch.manual_seed(0)
                        module = (HSLModule if kind == "hsl" else ClassifierModule)(backbone=backbone)
                        whole, opt_only = time_steps(module, make_optimizer(module, impl), batch, args.steps,
                                                     args.warmup)
                        samples[impl][0].append(whole)
                        samples[impl][1].append(opt_only)
                base = statistics.median(samples["for-loop"][0])
                for impl in IMPLEMENTATIONS:
                    whole, opt_only = (statistics.median(v) for v in samples[impl])
                    row = {"module": kind, "backbone": backbone, "threads": threads, "impl": impl,
                           "step_ms": round(whole, 2), "optimizer_ms": round(opt_only, 2),
                           "step_fraction_of_loop": round(whole / base, 3)}
                    rows.append(row)
                    print(f"{kind:<12}{backbone:<11}{threads:>8}{impl:>10}{whole:>10.1f}{opt_only:>14.1f}"
                          f"{whole / base:>14.2f}", flush=True)
    fused = [r["step_fraction_of_loop"] for r in rows if r["impl"] == "fused"]
    headline = {"fused_step_fraction_of_loop_median": round(statistics.median(fused), 3),
                "fused_step_fraction_of_loop_range": [min(fused), max(fused)]}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rows": rows, "headline": headline}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"fused step time / for-loop step time: median {headline['fused_step_fraction_of_loop_median']:.2f} "
          f"(range {min(fused):.2f}-{max(fused):.2f}); wrote {args.out}")
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

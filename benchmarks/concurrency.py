"""Where training institutions at the same time pays: the default against one after another.

For each workload, ``Federation.fit`` runs twice per repeat, alternating: with the default
(``concurrent_institutions=None``: min(threads, institutions) institutions at once, a thread each)
and with ``concurrent_institutions=1`` (one after another, every thread on the one institution,
the default before it). Both use the same threads in all (``--threads``, default the machine's
cores), validate every round and test at the end; checkpoints, weights and W&B are off. Wall time
of ``fit`` in-process, after the data is built; the ratio of medians is reported per workload.

Workloads (synthetic lesions at 28 px, batch 32, AdamW):

- ``fedavg_resnet10t``: the vs_flower workload, 4 institutions x 480 images, ResNet-10t, 5 rounds;
- ``fedavg_many_small``: 16 institutions x 60 images, ResNet-10t, 5 rounds;
- ``hsl_test_resnet``: HSL with both tasks, the quickstart's trunks, 4 institutions x 300 images,
  3 rounds of 2 epochs (best epoch chosen on validation, as HSL does);
- ``hsl_resnet18``: HSL with two ResNet-18 trunks, 4 institutions x 240 images, 2 rounds;
- ``fedavg_one_thread``: the first workload on one thread, where the default trains one after
  another anyway; here two at once are forced (``concurrent_institutions=2``) to show what they
  would cost.

    .venv/bin/python benchmarks/concurrency.py            # about 5 minutes on 2 cores

Prints a table, writes benchmarks/results/concurrency.json, ends with one line ``RESULT {json}``.
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

from hsl_lightning import (ClassifierModule, FederatedDataModule, Federation, HSLModule, Scenario,  # noqa: E402
                           SyntheticAnchor, SyntheticLesions)

WORKLOADS = {
    # name: (strategy, trunk, institutions, training images each, rounds, local epochs, threads or None)
    "fedavg_resnet10t": ("fedavg", "resnet10t", 4, 480, 5, 1, None),
    "fedavg_many_small": ("fedavg", "resnet10t", 16, 60, 5, 1, None),
    "hsl_test_resnet": ("hsl", "test_resnet", 4, 300, 3, 2, None),
    "hsl_resnet18": ("hsl", "resnet18", 4, 240, 2, 1, None),
    "fedavg_one_thread": ("fedavg", "resnet10t", 4, 480, 5, 1, 1),
}


def make(strategy: str, trunk: str, nodes: int, per_node: int):
    hsl = strategy == "hsl"
    dm = FederatedDataModule(primary=SyntheticLesions(num_samples=int(per_node / 0.6) * nodes, size=28),
                             sat=SyntheticAnchor(num_samples=per_node * nodes, size=28) if hsl else None,
                             use_sat=hsl, scenario=Scenario(num_nodes=nodes), splits="pooled",
                             split_fractions=(0.6, 0.2, 0.2), batch_size=32)
    dm.setup()
    model = (lambda: HSLModule(backbone=trunk)) if hsl else (lambda: ClassifierModule(backbone=trunk))
    return dm, model


def fit(dm, model, strategy: str, rounds: int, epochs: int, threads: int, at_once: int | None) -> dict:
    torch.manual_seed(0)
    federation = Federation(strategy=strategy, rounds=rounds, local_epochs=epochs, run_dir="/tmp/hsl_concurrent_run",
                            wandb="disabled", progress=False, checkpoint=False, save_weights=False, threads=threads,
                            concurrent_institutions=at_once)
    start = time.perf_counter()
    summary = federation.fit(model(), dm)
    return {"wall_s": time.perf_counter() - start, "auc": summary["mean_test_auc"],
            "at_once": summary["institutions_at_once"], "threads_each": summary["threads_per_institution"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), help="run these workloads only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concurrency.json"))
    args = p.parse_args()
    rows = {}
    for name, (strategy, trunk, nodes, per_node, rounds, epochs, threads) in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        threads = threads or args.threads
        dm, model = make(strategy, trunk, nodes, per_node)
        concurrent = 2 if threads == 1 else None  # one thread: force two at once, to show the cost
        fit(dm, model, strategy, 1, 1, threads, concurrent)  # warm-up
        runs = {"default": [], "one_by_one": []}
        for _ in range(args.repeats):
            runs["default"].append(fit(dm, model, strategy, rounds, epochs, threads, concurrent))
            runs["one_by_one"].append(fit(dm, model, strategy, rounds, epochs, threads, 1))
        med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
        rows[name] = {"threads": threads, "at_once": runs["default"][0]["at_once"],
                      "threads_each": runs["default"][0]["threads_each"], "default_s": round(med["default"], 2),
                      "one_by_one_s": round(med["one_by_one"], 2),
                      "speedup": round(med["one_by_one"] / med["default"], 3),
                      "auc_default": runs["default"][0]["auc"], "auc_one_by_one": runs["one_by_one"][0]["auc"],
                      "runs": runs}
        r = rows[name]
        print(f"{name:<20} threads {threads}, {r['at_once']} at once x {r['threads_each']} thread(s): "
              f"{r['default_s']:.2f} s vs one by one {r['one_by_one_s']:.2f} s -> {r['speedup']:.3f}x", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}", "repeats": args.repeats, "workloads": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({k: v["speedup"] for k, v in rows.items()}))


if __name__ == "__main__":
    main()

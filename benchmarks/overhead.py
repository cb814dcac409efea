"""Orchestration overhead: hsl_lightning's Federation against a minimal hand-written loop.

The same federated workload, FedAvg: N institutions, R rounds of one local epoch, a ResNet-10t
classifier on the synthetic task at 28 px, batch 32, AdamW (torch's fused kernel in both, the
module's default), no augmentation or rebalancing, one thread (``--threads N``: N for both, where
the Federation's default trains min(N, institutions) institutions at once, a thread each, and the
plain loop runs one institution after another on N intra-op threads). (a)
``Federation(strategy="fedavg").fit`` with checkpoints, weights and W&B off, in two settings: as
configured by default (validates every node after every round and deploys the best round) and with
``val_every_n_rounds=rounds`` (validates after the last round only, the closest to the plain loop;
it still tests every node at the end); (b) a plain PyTorch loop over the same data tensors that does
exactly the same local steps and the size-weighted averaging, and nothing else. Both start after the
data is built; each is timed in-process, alternating a/b, ``--repeats`` times; the ratio of medians
is reported, with a breakdown of (a) from a profile of one more run.

    .venv/bin/python benchmarks/overhead.py               # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/overhead.py --threads 2   # both cores: about 2.5 minutes

Prints a table, writes benchmarks/results/overhead.json (``overhead_threadsN.json`` for N threads),
ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hsl_lightning import ClassifierModule, FederatedDataModule, Federation, Scenario, SyntheticLesions  # noqa: E402


def make_data(nodes: int, per_node: int, batch: int) -> FederatedDataModule:
    dm = FederatedDataModule(primary=SyntheticLesions(num_samples=int(per_node / 0.6) * nodes, size=28),
                             use_sat=False, scenario=Scenario(num_nodes=nodes), splits="pooled",
                             split_fractions=(0.6, 0.2, 0.2), batch_size=batch, augment=False, rebalance=False)
    dm.setup()
    return dm


def run_federation(dm, rounds: int, backbone: str, run_dir: str, val_every: int = 1, threads: int = 1) -> float:
    torch.manual_seed(0)
    model = ClassifierModule(backbone=backbone)
    federation = Federation(strategy="fedavg", rounds=rounds, local_epochs=1, contribute="last", run_dir=run_dir,
                            wandb="disabled", progress=False, checkpoint=False, save_weights=False, threads=threads,
                            val_every_n_rounds=val_every)
    start = time.perf_counter()
    federation.fit(model, dm)
    return time.perf_counter() - start


def run_plain(dm, rounds: int, backbone: str) -> float:
    """The same local steps and averaging, written out with nothing else."""
    torch.manual_seed(0)
    model = ClassifierModule(backbone=backbone)
    data = [(n.train.images, n.train.labels) for n in dm.nodes]
    batch = dm.batch_size
    sizes = torch.tensor([len(y) for _, y in data], dtype=torch.float64)
    start = time.perf_counter()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for r in range(rounds):
        merged = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        for i, (images, labels) in enumerate(data):
            model.load_state_dict(global_state)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=model.lr, weight_decay=model.weight_decay,
                                          fused=True)  # the implementation the module configures
            g = torch.Generator().manual_seed(r * 1000 + i)
            order = torch.randperm(len(labels), generator=g)
            for s in range(len(labels) // batch):  # full batches, as the Federation's loader (drop_last)
                idx = order[s * batch:(s + 1) * batch]
                x = images[idx].float() / 255
                loss = F.binary_cross_entropy_with_logits(model(x), labels[idx].float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            for k, v in model.state_dict().items():
                merged[k] += sizes[i] * v.double()
        global_state = {k: (v / sizes.sum()).to(global_state[k].dtype) if global_state[k].is_floating_point()
                        else (v / sizes.sum()).round().to(global_state[k].dtype) for k, v in merged.items()}
    return time.perf_counter() - start


def loader_alone(dm, rounds: int) -> float:
    """Seconds to draw every training batch of the workload from the Federation's loaders, no model:
    the images are uint8 tensors decoded once, so this is sampling, float conversion and batching."""
    start = time.perf_counter()
    for r in range(rounds):
        for i in range(len(dm.nodes)):
            for batch in dm.train_loader([i], seed=r * 1000 + i, with_sat=False):
                batch["image"].float()
    return time.perf_counter() - start


def breakdown(dm, rounds: int, backbone: str, run_dir: str, threads: int = 1) -> dict:
    """Seconds of the Federation run spent in its main parts (one profiled run)."""
    profile = cProfile.Profile()
    profile.enable()
    run_federation(dm, rounds, backbone, run_dir, threads=threads)
    profile.disable()
    stats = pstats.Stats(profile)
    parts = {"train_local": "local training", "evaluate_trainees": "validation and test",
             "pack": "packing states", "load_start": "loading states", "_run": "whole run"}
    out = {}
    for (file, _, name), row in stats.stats.items():
        if name in parts and "hsl_lightning" in file:
            out[parts[name]] = round(row[3], 3)  # cumulative seconds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-node", type=int, default=480, help="training images per institution")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="threads of both: the plain loop's intra-op threads, the Federation's federation.threads "
                        "(which by default trains min(threads, institutions) institutions at once)")
    p.add_argument("--out", help="default benchmarks/results/overhead.json (overhead_threadsN.json for N threads)")
    args = p.parse_args()
    name = "overhead.json" if args.threads == 1 else f"overhead_threads{args.threads}.json"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / name)
    torch.set_num_threads(args.threads)
    dm = make_data(args.nodes, args.per_node, args.batch)
    run_dir = "/tmp/hsl_overhead_run"
    run_plain(dm, 1, args.backbone), run_federation(dm, 1, args.backbone, run_dir, threads=args.threads)  # warm-up
    times = {"hsl_lightning": [], "hsl_lightning_val_last": [], "plain_loop": []}
    for _ in range(args.repeats):
        times["hsl_lightning"].append(run_federation(dm, args.rounds, args.backbone, run_dir, threads=args.threads))
        times["hsl_lightning_val_last"].append(run_federation(dm, args.rounds, args.backbone, run_dir, args.rounds,
                                                                   threads=args.threads))
        times["plain_loop"].append(run_plain(dm, args.rounds, args.backbone))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["hsl_lightning"] / med["plain_loop"]
    ratio_last = med["hsl_lightning_val_last"] / med["plain_loop"]
    parts = breakdown(dm, args.rounds, args.backbone, run_dir, args.threads)
    parts["loader alone (no model)"] = round(loader_alone(dm, args.rounds), 3)
    steps = args.rounds * sum(len(n.train) // args.batch for n in dm.nodes)
    print(f"workload: FedAvg, {args.nodes} institutions x {args.per_node} images, {args.rounds} rounds x 1 epoch, "
          f"{args.backbone}, batch {args.batch}, 28 px, {args.threads} thread(s): {steps} optimizer steps")
    print(f"{'run':<24}{'median s':>10}   all runs")
    for k, v in times.items():
        print(f"{k:<24}{med[k]:>10.2f}   {', '.join(f'{x:.2f}' for x in v)}")
    print(f"ratio hsl_lightning / plain loop: {ratio:.3f} (validating every round), "
          f"{ratio_last:.3f} (validating after the last round only)")
    print("hsl_lightning breakdown (profiled run, cumulative s; the loader alone timed apart): "
          + ", ".join(f"{k} {v}" for k, v in parts.items()))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}",
              "workload": {k: v for k, v in vars(args).items() if k != "out"} | {"optimizer_steps": steps}, "seconds": times, "median_s": med,
              "ratio": round(ratio, 4), "ratio_val_last": round(ratio_last, 4), "breakdown_s": parts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({"ratio": round(ratio, 4), "ratio_val_last": round(ratio_last, 4),
                                  "hsl_lightning_s": round(med["hsl_lightning"], 3),
                                  "hsl_lightning_val_last_s": round(med["hsl_lightning_val_last"], 3),
                                  "plain_loop_s": round(med["plain_loop"], 3)}))


if __name__ == "__main__":
    main()

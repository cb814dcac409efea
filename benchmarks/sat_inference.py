"""What should the SAT branch see at inference, when a hospital only has a primary image?

Trains HSL with a config (default: the MedMNIST combined-heterogeneity config) for several
seeds, then scores every node's validation and test set with each policy of HSLModule:
``primary`` (primary image in both branches), ``reference`` (mean SAT feature of a fixed public
SAT batch), ``paired`` (a fixed random SAT image per primary image). The default is chosen on
validation AUC; test AUC is reported beside it.

    HSL_DATA_ROOT=../shared/data/medmnist python benchmarks/sat_inference.py --seeds 0 1 2

Prints a table, writes benchmarks/results/sat_inference.json, ends with ``RESULT {json}``.
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

from hsl_lightning.config import HSLCLI
from hsl_lightning.metrics import NodeMetrics, summarize

POLICIES = ("primary", "reference", "paired")


@torch.no_grad()
def coupling(module, dm) -> dict:
    """How much the SAT branch can move the primary logit: the largest logit change between
    policies, and the spread (std over test images) of the MMoE expert path against the
    primary skip path that the primary tower adds it to."""
    module.eval()
    gap, expert_std, skip_std = 0.0, [], []
    net = module.net
    for i in range(len(dm.nodes)):
        for batch in dm.eval_loader(i, "test"):
            logits = {p: module.primary_logits(batch, p) for p in POLICIES}
            gap = max(gap, max(float((logits[p] - logits["primary"]).abs().max()) for p in POLICIES))
            f1 = net.primary_proj(net.primary_encoder(batch["image"]))
            f2 = net.sat_features(batch["image"])
            (mixed, _), _ = net.mmoe(torch.softmax(torch.cat([f1, f2], dim=1) / net.temperature, dim=1))
            expert_std.append(float(mixed.std(0).mean()))
            skip_std.append(float(net.primary_skip(f1).std(0).mean()))
    return {"max_logit_gap": gap, "expert_path_std": statistics.mean(expert_std),
            "skip_path_std": statistics.mean(skip_std)}


@torch.no_grad()
def score(module, dm, node: int, split: str, policy: str) -> float:
    module.eval()
    metrics = NodeMetrics()
    for batch in dm.eval_loader(node, split):
        metrics.update(module.primary_logits(batch, policy), batch["label"])
    return metrics.compute()["auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/medmnist_combined.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/sat_inference.json")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its own arguments
    os.environ.setdefault("WANDB_MODE", "disabled")

    rows = []
    for seed in args.seeds:
        cli = HSLCLI(args=["--config", args.config, "--seed_everything", str(seed), "--federation.progress", "false",
                           "--federation.run_dir", f"runs/sat_inference/seed{seed}"], run=False)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)  # one rank: the module now holds the deployed model
        wall = time.perf_counter() - start
        coupled = coupling(cli.model, cli.datamodule)
        print(f"seed {seed}: largest primary-logit change between policies {coupled['max_logit_gap']:.2e}; "
              f"expert path std {coupled['expert_path_std']:.2e} vs skip path std {coupled['skip_path_std']:.2e}")
        for policy in POLICIES:
            for split in ("val", "test"):
                aucs = [score(cli.model, cli.datamodule, i, split, policy) for i in range(len(cli.datamodule.nodes))]
                rows.append({"seed": seed, "policy": policy, "split": split, "node_aucs": aucs,
                             "mean_auc": summarize(aucs)["mean"], "train_wall_s": round(wall, 1), **coupled})

    table = {}
    print(f"{'policy':<10}{'val mean AUC':>16}{'test mean AUC':>16}   (mean +- std over seeds {args.seeds})")
    for policy in POLICIES:
        entry = {}
        for split in ("val", "test"):
            means = [r["mean_auc"] for r in rows if r["policy"] == policy and r["split"] == split]
            entry[split] = {"mean": statistics.mean(means), "std": statistics.pstdev(means)}
        table[policy] = entry
        print(f"{policy:<10}{entry['val']['mean']:>10.4f} +- {entry['val']['std']:.3f}"
              f"{entry['test']['mean']:>10.4f} +- {entry['test']['std']:.3f}")
    chosen = max(POLICIES, key=lambda p: table[p]["val"]["mean"])
    print(f"best on validation: {chosen}")
    result = {"config": args.config, "seeds": args.seeds, "by_policy": table, "best_on_val": chosen,
              "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    gaps = [r["max_logit_gap"] for r in rows]
    print("RESULT " + json.dumps({"best_on_val": chosen, "max_logit_gap": max(gaps),
                                  **{f"{p}_{s}": round(table[p][s]["mean"], 4) for p in POLICIES for s in ("val", "test")}}))


if __name__ == "__main__":
    main()

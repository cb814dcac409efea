"""The Federation on one GPU: institutions trained one after another against fused (fuse_institutions).

``benchmarks/gpu.py`` measures the fused model alone; this script measures the whole Federation
(loaders, Fabric, strategy, averaging) on the issue's workload: 8 equal institutions x batch 64 at
28 px, one channel, ResNet-18, AdamW, no augmentation, for FedAvg (``ClassifierModule``) and HSL
(``HSLModule``; each step also takes 64 SAT images per institution). Each variant runs
``--rounds`` rounds of one local epoch of ``--steps`` steps and validates after the last round only;

    images/s = primary training images of rounds 2 .. R-1 / their seconds

(round 1 warms up, the last one also validates). In the same process: the ceiling (one model
trained on the concatenated batch of 8 x 64, eager, as in gpu.py) and the loader alone (drawing
and stacking every institution's batches on the CPU, no model).

    python benchmarks/gpu_federation.py              # one GPU, about 3 minutes
    .venv/bin/python benchmarks/gpu_federation.py --device cpu --backbone test_resnet --steps 3 --rounds 3   # smoke

Prints a table, writes benchmarks/results/gpu_federation.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
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


def make_data(args, hsl: bool) -> FederatedDataModule:
    n, per_node = args.institutions, args.batch * args.steps
    dm = FederatedDataModule(
        primary=SyntheticLesions(num_samples=int(per_node / 0.6 + 1) * n, size=args.size),
        sat=SyntheticAnchor(num_samples=2000, size=args.size) if hsl else None, use_sat=hsl,
        scenario=Scenario(num_nodes=n), splits="pooled", split_fractions=(0.6, 0.2, 0.2), batch_size=args.batch,
        augment=False, rebalance=False, samples_per_epoch=per_node)  # every institution: exactly `steps` batches
    dm.setup()
    return dm


def make_model(args, hsl: bool):
    torch.manual_seed(0)
    return HSLModule(backbone=args.backbone) if hsl else ClassifierModule(backbone=args.backbone)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def federation_img_s(args, hsl: bool, fuse: bool) -> dict:
    dm = make_data(args, hsl)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    federation = Federation(strategy="hsl" if hsl else "fedavg", rounds=args.rounds, local_epochs=1, contribute="last",
                            accelerator=accelerator, devices=1, run_dir=f"/tmp/hsl_gpu_federation_{hsl}_{fuse}",
                            wandb="disabled", progress=False, checkpoint=False, save_weights=False,
                            val_every_n_rounds=args.rounds, fuse_institutions=fuse)
    summary = federation.fit(make_model(args, hsl), dm)
    rounds = [h["round_s"] for h in summary["history"]][1:-1]
    images = args.institutions * args.batch * args.steps * len(rounds)
    return {"img_s": round(images / sum(rounds), 1), "round_s": [round(r, 3) for r in rounds],
            "mean_test_auc": round(summary["mean_test_auc"], 4)}


def ceiling_img_s(args, hsl: bool) -> float:
    """One model trained on the concatenated batch of every institution (eager), images/s."""
    model = make_model(args, hsl).to(args.device).train()
    optimizer = model.configure_optimizers()
    b = args.institutions * args.batch
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 1, args.size, args.size, generator=g),
             "label": torch.randint(0, 2, (b,), generator=g)}
    if hsl:
        batch.update(sat_image=torch.rand(b, 1, args.size, args.size, generator=g),
                     sat_label=torch.randint(0, 2, (b,), generator=g))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    times = []
    for s in range(args.warmup + args.steps * 2):
        sync(args.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, s).backward()
        optimizer.step()
        sync(args.device)
        if s >= args.warmup:
            times.append(time.perf_counter() - start)
    return round(b / statistics.median(times), 1)


def loader_img_s(args, hsl: bool) -> float:
    """Every institution's batches of one epoch drawn and stacked on the CPU, no model: images/s."""
    dm = make_data(args, hsl)
    start = time.perf_counter()
    loaders = [dm.train_loader([i], seed=i, with_sat=hsl) for i in range(args.institutions)]
    for batches in zip(*loaders):
        {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    return round(args.institutions * args.batch * args.steps / (time.perf_counter() - start), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--institutions", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--steps", type=int, default=30, help="steps per local epoch")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_federation.json"))
    args = p.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3 (round 1 warms up, the last one validates).")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    print(f"{device}, torch {torch.__version__}; {args.institutions} institutions x batch {args.batch}, {args.size} px, "
          f"{args.backbone}, {args.steps} steps per round, rounds 2..{args.rounds - 1} timed", flush=True)
    rows, result = [], {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                        "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    for hsl in (False, True):
        model = "hsl" if hsl else "fedavg"
        entry = {"ceiling_img_s": ceiling_img_s(args, hsl), "loader_img_s": loader_img_s(args, hsl)}
        for fuse in (False, True):
            entry["fused" if fuse else "one_by_one"] = federation_img_s(args, hsl, fuse)
        fused, one = entry["fused"]["img_s"], entry["one_by_one"]["img_s"]
        entry["fused_pct_of_ceiling"] = round(100 * fused / entry["ceiling_img_s"], 1)
        entry["fused_speedup"] = round(fused / one, 2)
        result[model] = entry
        rows.append((model, one, fused, entry["ceiling_img_s"], entry["loader_img_s"]))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # after each model: a cut-off run keeps its figures
    print(f"\n{'':<8}{'one by one':>12}{'fused':>10}{'ceiling':>10}{'% ceiling':>11}{'loader':>10}   (images/s)")
    for model, one, fused, ceiling, loader in rows:
        print(f"{model:<8}{one:>12,.0f}{fused:>10,.0f}{ceiling:>10,.0f}{100 * fused / ceiling:>10.1f}%{loader:>10,.0f}")
    print(f"wrote {args.out}")
    headline = {"device": device}
    for model in ("fedavg", "hsl"):
        headline.update({f"{model}_{k}": result[model][k] for k in ("ceiling_img_s", "fused_pct_of_ceiling",
                                                                      "fused_speedup")})
        headline[f"{model}_fused_img_s"] = result[model]["fused"]["img_s"]
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

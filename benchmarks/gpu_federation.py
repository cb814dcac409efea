"""The Federation on one GPU: institutions one after another, fused, and fused with CUDA graphs.

``benchmarks/gpu.py`` measures the fused model alone; this script measures the whole Federation
(loaders, Fabric, strategy, averaging) on the issue's workload: 8 equal institutions x batch 64 at
28 px, one channel, ResNet-18, AdamW, no augmentation, for FedAvg (``ClassifierModule``) and HSL
(``HSLModule``; each step also takes 64 SAT images per institution). Variants (``--variants``):
``one_by_one`` (the default Federation), ``fused`` (``fuse_institutions``), ``fused_graph``
(``fuse_institutions`` + ``cuda_graphs``). Each runs ``--rounds`` rounds of one local epoch of
``--steps`` steps and validates after the last round only;

    images/s = primary training images of rounds 2 .. R-1 / their seconds

(round 1 warms up and captures the graphs, the last one also validates). In the same process:
the ceilings (one model trained on the concatenated batch of 8 x 64: eager, and its whole step in
one CUDA graph), and the loader alone (drawing and stacking every institution's batches on the
CPU, no model). ``fused`` and ``fused_graph`` train the same federation from the same seed, so
their per-round training losses and test AUCs are compared too (equal up to float rounding).

    python benchmarks/gpu_federation.py              # one GPU, about 2 minutes
    .venv/bin/python benchmarks/gpu_federation.py --device cpu --backbone test_resnet --steps 3 --rounds 3   # smoke

Prints a table, writes benchmarks/results/gpu_federation.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import warnings
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


def federation_img_s(args, hsl: bool, variant: str) -> dict:
    dm = make_data(args, hsl)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    federation = Federation(strategy="hsl" if hsl else "fedavg", rounds=args.rounds, local_epochs=1, contribute="last",
                            accelerator=accelerator, devices=1, run_dir=f"/tmp/hsl_gpu_federation_{hsl}_{variant}",
                            wandb="disabled", progress=False, checkpoint=False, save_weights=False,
                            val_every_n_rounds=args.rounds, fuse_institutions=variant != "one_by_one",
                            cuda_graphs=variant == "fused_graph", precision=args.precision)
    summary = federation.fit(make_model(args, hsl), dm)
    rounds = [h["round_s"] for h in summary["history"]][1:-1]
    images = args.institutions * args.batch * args.steps * len(rounds)
    losses = [[v for k, v in h.items() if k.endswith("/train_loss")] for h in summary["history"]]
    return {"img_s": round(images / sum(rounds), 1), "round_s": [round(r, 3) for r in rounds],
            "first_round_s": summary["history"][0]["round_s"], "wall_s": round(summary["wall_s"], 2),
            "mean_test_auc": summary["mean_test_auc"], "train_losses": losses}


def ceiling_img_s(args, hsl: bool, graph: bool) -> float:
    """One model trained on the concatenated batch of every institution, images/s: eager, or the whole
    step (forward, backward, optimizer) captured in one CUDA graph and replayed."""
    model = make_model(args, hsl).to(args.device).train()
    optimizer = model.configure_optimizers()
    if graph:
        for group in optimizer.param_groups:
            group["capturable"] = True
    b = args.institutions * args.batch
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 1, args.size, args.size, generator=g),
             "label": torch.randint(0, 2, (b,), generator=g)}
    if hsl:
        batch.update(sat_image=torch.rand(b, 1, args.size, args.size, generator=g),
                     sat_label=torch.randint(0, 2, (b,), generator=g))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if args.precision == "bf16-mixed":  # as the Federation's graphs run it: no autocast weight cache
        def autocast():
            return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, cache_enabled=False)
    else:
        autocast = contextlib.nullcontext

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    run = step
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")  # the ceiling at its best: timed algorithms
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # capturable optimizer outside a graph: warm-up only
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        run = captured.replay
    times = []
    for s in range(args.warmup + args.steps * 2):
        sync(args.device)
        start = time.perf_counter()
        run()
        sync(args.device)
        if s >= args.warmup:
            times.append(time.perf_counter() - start)
    torch.backends.cudnn.benchmark = benchmark
    return round(b / statistics.median(times), 1)


def loader_img_s(args, hsl: bool) -> float:
    """Every institution's batches of one epoch drawn and stacked on the CPU, no model: images/s."""
    dm = make_data(args, hsl)
    start = time.perf_counter()
    loaders = [dm.train_loader([i], seed=i, with_sat=hsl) for i in range(args.institutions)]
    for batches in zip(*loaders):
        {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    return round(args.institutions * args.batch * args.steps / (time.perf_counter() - start), 1)


VARIANTS = ("one_by_one", "fused", "fused_graph")


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
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--models", default="fedavg,hsl", help="comma-separated, of fedavg, hsl")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms (all variants)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_federation.json"))
    args = p.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3 (round 1 warms up, the last one validates).")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    cuda = args.device.startswith("cuda")
    if not cuda:
        variants = [v for v in variants if v != "fused_graph"]  # CUDA graphs need a CUDA device
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})"
    print(f"{device}, torch {torch.__version__}; {args.institutions} institutions x batch {args.batch}, {args.size} px, "
          f"{args.backbone}, {args.steps} steps per round, rounds 2..{args.rounds - 1} timed"
          f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}, precision {args.precision}", flush=True)
    result = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in [m for m in args.models.split(",") if m]:
        hsl = model == "hsl"
        entry = result[model] = {"ceiling_img_s": ceiling_img_s(args, hsl, graph=False)}
        if cuda:
            entry["ceiling_graph_img_s"] = ceiling_img_s(args, hsl, graph=True)
        entry["loader_img_s"] = loader_img_s(args, hsl)
        graph_ceiling = f", {entry['ceiling_graph_img_s']:,.0f} in one CUDA graph" if cuda else ""
        print(f"{model}: ceiling {entry['ceiling_img_s']:,.0f} images/s eager{graph_ceiling}; "
              f"loader {entry['loader_img_s']:,.0f}", flush=True)
        for variant in variants:
            try:
                entry[variant] = federation_img_s(args, hsl, variant)
            except Exception as exc:  # noqa: BLE001 - report it and go on with the other variants
                entry[variant] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {variant}: FAILED {entry[variant]['error']}", flush=True)
                continue
            v = entry[variant]
            v["pct_of_ceiling"] = round(100 * v["img_s"] / entry["ceiling_img_s"], 1)
            if cuda:
                v["pct_of_graph_ceiling"] = round(100 * v["img_s"] / entry["ceiling_graph_img_s"], 1)
            print(f"  {variant}: {v['img_s']:,.0f} images/s ({v['pct_of_ceiling']}% of the eager ceiling), "
                  f"first round {v['first_round_s']} s, whole run {v['wall_s']} s", flush=True)
            out.write_text(json.dumps(result, indent=2))  # after each variant: a cut-off run keeps its figures
        a, b = entry.get("fused", {}), entry.get("fused_graph", {})
        if "train_losses" in a and "train_losses" in b:  # the same federation, eager and replayed
            diffs = [abs(x - y) for ra, rb in zip(a["train_losses"], b["train_losses"]) for x, y in zip(ra, rb)]
            entry["graph_vs_eager"] = {"max_train_loss_diff": max(diffs),
                                       "test_auc_diff": abs(a["mean_test_auc"] - b["mean_test_auc"])}
            print(f"  fused_graph vs fused: train losses differ by at most {max(diffs):.2e}, mean test AUC by "
                  f"{entry['graph_vs_eager']['test_auc_diff']:.2e}", flush=True)
        out.write_text(json.dumps(result, indent=2))
    models = [m for m in ("fedavg", "hsl") if m in result]
    print(f"\n{'':<8}" + "".join(f"{v:>13}" for v in variants) + f"{'ceiling':>10}{'graph ceil.':>13}{'loader':>10}"
          "   (images/s)")
    for model in models:
        e = result[model]
        print(f"{model:<8}" + "".join(f"{e[v].get('img_s', float('nan')):>13,.0f}" for v in variants)
              + f"{e['ceiling_img_s']:>10,.0f}{e.get('ceiling_graph_img_s', float('nan')):>13,.0f}"
              f"{e['loader_img_s']:>10,.0f}")
    print(f"wrote {out}")
    headline = {"device": device, "cudnn_benchmark": args.cudnn_benchmark, "precision": args.precision}
    for model in models:
        e = result[model]
        headline[f"{model}_ceiling_img_s"] = e["ceiling_img_s"]
        headline[f"{model}_ceiling_graph_img_s"] = e.get("ceiling_graph_img_s")
        for v in variants:
            headline[f"{model}_{v}_img_s"] = e[v].get("img_s")
            headline[f"{model}_{v}_pct_of_ceiling"] = e[v].get("pct_of_ceiling")
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

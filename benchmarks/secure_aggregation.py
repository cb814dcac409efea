"""What secure aggregation's fixed-point sum costs in accuracy: the same configs simulated with
``federation.secure_aggregation`` on (the int64 sum every deployment with masking computes) and off
(the float64 sum), the same seed; prints one line ``RESULT {json}`` per config.

    .venv/bin/python benchmarks/secure_aggregation.py [--configs configs/quickstart.yaml ...] [--seeds 0 1]

Keys per config and seed: ``quantisation_max_abs_error`` (round 1: the largest difference between the
fixed-point sum of the trainees' contributions and their float64 sum, over every entry of the
message), ``quantisation_bound`` (the derived bound, trainees x 2^-41, fixedpoint.error_bound),
``max_abs_weight_diff`` (the deployed weights after the whole run, on against off: differences that
training amplified), ``max_abs_auc_diff`` (per node, test and validation AUC at the deployed round),
``best_round_same``; for scale, ``max_abs_auc_diff_threads_float``: the float64 sum run again
with every institution on the machine's 2 threads in turn instead of one thread each at the same
time (other float roundings in the convolutions, no fixed point). MedMNIST configs need ``HSL_DATA_ROOT`` (../shared/data/medmnist).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
REPO = Path(__file__).resolve().parents[1]


def run(config: Path, seed: int, secure: bool, work: Path, threads: int | None = None) -> tuple[dict, Path]:
    from hsl_lightning.config import HSLCLI

    run_dir = work / f"{config.stem}-{seed}-{'on' if secure else 'off'}-{threads}"
    # every institution on all of the machine's threads, one after another (by default each gets one of them)
    extra = ["--federation.concurrent_institutions", "1"] if threads else []
    cli = HSLCLI(args=["--config", str(config), "--seed_everything", str(seed), "--federation.run_dir", str(run_dir),
                       "--federation.secure_aggregation", str(secure).lower(), "--federation.progress", "false",
                       "--federation.wandb", "disabled", "--federation.checkpoint", "false", *extra], run=False)
    return cli.trainer.fit(cli.model, cli.datamodule), run_dir


def first_round_error(config: Path, seed: int, work: Path) -> tuple[float, float]:
    """Round 1's fixed-point sum against the float64 sum of the very same contributions."""
    from hsl_lightning.federation import fixedpoint

    seen, quantise = [], fixedpoint.quantise

    def spy(vector, trainees, who, round_no):
        if round_no == 1:
            seen.append((vector.detach().double().clone(), trainees))
        return quantise(vector, trainees, who, round_no)

    fixedpoint.quantise = spy
    try:
        run(config, seed, True, work / "spy")
    finally:
        fixedpoint.quantise = quantise
    exact = torch.stack([v for v, _ in seen]).sum(0)
    fixed = fixedpoint.dequantise(torch.stack([quantise(v, n, "x", 1) for v, n in seen]).sum(0))
    return float((fixed - exact).abs().max()), fixedpoint.error_bound(seen[0][1])


def weights(run_dir: Path) -> dict:
    paths = [run_dir / "model.ckpt"] if (run_dir / "model.ckpt").is_file() else sorted((run_dir / "nodes").glob("*.ckpt"))
    return {p.name: torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in paths}


def compare(config: Path, seed: int, work: Path) -> dict:
    on, on_dir = run(config, seed, True, work)
    off, off_dir = run(config, seed, False, work)
    error, bound = first_round_error(config, seed, work)
    wa, wb = weights(on_dir), weights(off_dir)
    dw = max(float((wa[f][k].double() - wb[f][k].double()).abs().max()) for f in wa for k in wa[f] if wa[f][k].numel())
    dauc = max(abs(a[k] - b[k]) for a, b in zip(on["nodes"], off["nodes"]) for k in ("test_auc", "val_auc"))
    one, _ = run(config, seed, False, work, threads=2)  # the float sum again, 2 threads per institution: other roundings
    dthreads = max(abs(a[k] - b[k]) for a, b in zip(one["nodes"], off["nodes"]) for k in ("test_auc", "val_auc"))
    return {"config": str(config.relative_to(REPO)), "seed": seed, "quantisation_max_abs_error": error,
            "quantisation_bound": bound, "max_abs_weight_diff": dw, "max_abs_auc_diff": dauc,
            "max_abs_auc_diff_threads_float": dthreads, "mean_test_auc_threads_float": one["mean_test_auc"],
            "best_round_same": on["best_round"] == off["best_round"], "mean_test_auc_on": on["mean_test_auc"],
            "mean_test_auc_off": off["mean_test_auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=[str(REPO / "configs" / "quickstart.yaml")])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hsl-secagg-"))
    for config in args.configs:
        for seed in args.seeds:
            print("RESULT " + json.dumps(compare(Path(config).resolve(), seed, work)), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

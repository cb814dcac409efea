"""AUC against epsilon: HSL and FedAvg under node-level DP-FedAvg on configs/medmnist_combined.yaml.

For each method (HSL as the config has it; FedAvg composed with configs/methods/fedavg.yaml):

1. a reference run with DP's mechanics but no clipping and no noise (``clip: inf``,
   ``noise_multiplier: 0``): every node weighs 1, as under DP, and the run logs each round's update
   norms before clipping (``dp_update_norm_median``);
2. the clip C = the median over rounds of that run's median update norm (chosen from training
   updates only, never from validation or test data; Opacus's advice is a clip near the median norm);
3. one run per noise multiplier in ``--sigmas`` with that C; epsilon at delta 1e-5 from Opacus's RDP
   accountant after the rounds run.

Each run is ``hsl fit`` with the config's seed and rounds (20 of 2 local epochs, ResNet-18 trunks),
early stopping off, the deployed round chosen on validation as always; reported: mean node test
AUC, the deployed round, epsilon. Runs whose ``summary.json`` exists are not run again (resumable).

    HSL_DATA_ROOT=../shared/data/medmnist .venv/bin/python benchmarks/privacy.py --threads 1

Prints a table, writes benchmarks/results/privacy.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"hsl": ["--config", "configs/medmnist_combined.yaml"],
           "fedavg": ["--config", "configs/medmnist_combined.yaml", "--config", "configs/methods/fedavg.yaml"]}


def fit(args: list[str], run_dir: Path, privacy: dict, threads: int | None) -> dict:
    """One ``hsl fit`` (skipped when its summary exists); ``privacy``'s values as YAML (``.inf``)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        command = [str(Path(sys.executable).parent / "hsl"), "fit", *args, "--federation.run_dir", str(run_dir),
                   "--federation.privacy", f"{{clip: {privacy['clip']}, noise_multiplier: {privacy['noise_multiplier']}}}",
                   "--federation.wandb", "disabled",
                   "--federation.progress", "false", "--federation.checkpoint", "false",
                   "--federation.save_weights", "false"]
        if threads:
            command += ["--federation.threads", str(threads)]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.txt", "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(summary.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, help="federation.threads of every run (default: the machine's)")
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "results" / "privacy_runs"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.json"))
    args = p.parse_args()
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        reference = fit(METHODS[method], Path(args.runs) / method / "reference", {"clip": ".inf", "noise_multiplier": 0.0},
                        args.threads)
        clip = statistics.median(h["dp_update_norm_median"] for h in reference["history"])
        rows.append({"method": method, "sigma": 0.0, "clip": None, "epsilon": None,
                     "mean_test_auc": reference["mean_test_auc"], "best_round": reference["best_round"]})
        print(f"{method}: reference (no clipping, no noise) mean test AUC {reference['mean_test_auc']:.4f}; "
              f"clip C = {clip:.4g} ({time.perf_counter() - start:.0f} s)", flush=True)
        for sigma in args.sigmas:
            start = time.perf_counter()
            s = fit(METHODS[method], Path(args.runs) / method / f"sigma{sigma:g}",
                    {"clip": clip, "noise_multiplier": sigma}, args.threads)
            rows.append({"method": method, "sigma": sigma, "clip": clip, "epsilon": s["privacy"]["epsilon"],
                         "mean_test_auc": s["mean_test_auc"], "best_round": s["best_round"],
                         "clipped_share_round1": s["history"][0]["dp_clipped_share"]})
            print(f"{method}: sigma {sigma:g}, epsilon {s['privacy']['epsilon']:.4g}, mean test AUC "
                  f"{s['mean_test_auc']:.4f}, best round {s['best_round']} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"\n{'method':<8}{'sigma':>7}{'clip C':>10}{'epsilon':>12}{'test AUC':>10}{'best round':>12}")
    for r in rows:
        clip = f"{r['clip']:.4g}" if r["clip"] else "inf"
        eps = f"{r['epsilon']:.4g}" if r["epsilon"] is not None else "-"
        print(f"{r['method']:<8}{r['sigma']:>7g}{clip:>10}{eps:>12}{r['mean_test_auc']:>10.4f}{r['best_round']:>12}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
              "command": " ".join(sys.argv), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({f"{r['method']}_sigma{r['sigma']:g}": [r["epsilon"], round(r["mean_test_auc"], 4)]
                                  for r in rows}))


if __name__ == "__main__":
    main()

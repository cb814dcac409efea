"""Peak memory per rank for N = 4, 16, 64 institutions on CPU.

Institutions' states live on the rank that hosts them, so a rank's memory should grow with the
institutions it hosts (and only for strategies that keep per-node state), not with N. Each
configuration runs in a fresh process (one federated round of a ResNet-10t classifier on the
synthetic task, 28 px, 40 training images per institution) and reports every rank's peak resident
memory (``peak_rss_mb_per_rank`` of the run's summary: ru_maxrss, which includes the Python and
torch runtime, about 0.5 GB), and the MB of institution images each rank holds
(``data_mb_per_rank``: a rank builds the images of the institutions it hosts only).

    .venv/bin/python benchmarks/memory.py            # about 5 minutes on 2 cores

Prints a table, writes benchmarks/results/memory.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = """
import json, sys, torch
sys.path.insert(0, {root!r})
from hsl_lightning import ClassifierModule, FederatedDataModule, Federation, Scenario, SyntheticLesions
n, world, strategy, run_dir = {n}, {world}, {strategy!r}, {run_dir!r}
dm = FederatedDataModule(primary=SyntheticLesions(num_samples=60 * n, size=28), use_sat=False,
                         scenario=Scenario(num_nodes=n), splits="pooled", batch_size=16)
summary = Federation(strategy=strategy, rounds=1, local_epochs=1, devices=world, threads=1, run_dir=run_dir,
                     wandb="disabled", progress=False, checkpoint=False, save_weights=False).fit(
    ClassifierModule(backbone="resnet10t"), dm)
print("PEAKS", json.dumps(summary["peak_rss_mb_per_rank"]))
print("DATA", json.dumps(summary["data_mb_per_rank"]))
"""


def measure(n: int, world: int, strategy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = JOB.format(root=str(ROOT), n=n, world=world, strategy=strategy, run_dir=str(Path(tmp) / "run"))
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    peaks = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("PEAKS"))[6:])
    data = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("DATA"))[5:])
    return {"institutions": n, "ranks": world, "strategy": strategy, "peak_mb_per_rank": peaks,
            "max_rank_mb": max(peaks), "data_mb_per_rank": data, "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "ditto"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = p.parse_args()
    rows = []
    print(f"{'strategy':<9}{'N':>4}{'ranks':>6}{'peak MB per rank':>30}{'data MB per rank':>22}{'wall s':>8}")
    for strategy in args.strategies:
        for world in args.ranks:
            for n in args.nodes:
                row = measure(n, world, strategy)
                rows.append(row)
                peaks = ", ".join(f"{x:.0f}" for x in row["peak_mb_per_rank"])
                data = ", ".join(f"{x:.2f}" for x in row["data_mb_per_rank"])
                print(f"{strategy:<9}{n:>4}{world:>6}{peaks:>30}{data:>22}{row['wall_s']:>8.1f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    headline = {f"{r['strategy']}_N{r['institutions']}_W{r['ranks']}_max_rank_mb": r["max_rank_mb"] for r in rows}
    headline.update({f"{r['strategy']}_N{r['institutions']}_W{r['ranks']}_max_rank_data_mb": max(r["data_mb_per_rank"])
                     for r in rows})
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

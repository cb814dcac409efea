"""Round time and peak memory against the number of institutions (N = 2, 4, 8, 16, 32).

Each institution holds the same amount of data (``--per-node`` training images, 28 px synthetic
task) and trains a ResNet-10t classifier one local epoch per round with FedAvg, one thread, so the
work grows linearly with N. The steady round time (median of rounds 2..R, each from one round's
validation to the next) is fitted as ``a + b * N``: ``b`` is the cost of one institution's round,
``a`` the constant per-round overhead. Each N runs in a fresh process; peak memory is that
process's maximum resident size.

    .venv/bin/python benchmarks/scaling.py            # about 3 minutes on 2 cores

Prints a table, writes benchmarks/results/scaling.json, ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from hsl_lightning import ClassifierModule, FederatedDataModule, Federation, Scenario, SyntheticLesions
from hsl_lightning.federation.federation import Federation as F
stamps = []
validate = F._validate  # once per round, after its validation
def timed(self, *a, **k):
    out = validate(self, *a, **k)
    stamps.append(time.perf_counter())
    return out
F._validate = timed
n = {n}
dm = FederatedDataModule(primary=SyntheticLesions(num_samples=int({per_node} / 0.6) * n, size=28), use_sat=False,
                         scenario=Scenario(num_nodes=n), splits="pooled", split_fractions=(0.6, 0.2, 0.2),
                         batch_size=32, augment=False, rebalance=False)
summary = Federation(strategy="fedavg", rounds={rounds}, local_epochs=1, contribute="last", run_dir="/tmp/hsl_scaling",
                     wandb="disabled", progress=False, checkpoint=False, save_weights=False, threads=1).fit(
    ClassifierModule(backbone="resnet10t"), dm)
rounds = stamps[:{rounds}]
print("RESULT_CHILD " + json.dumps({{"round_s": [b - a for a, b in zip(rounds, rounds[1:])],
                                    "peak_mb": summary["peak_rss_mb_per_rank"][0]}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--per-node", type=int, default=96)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = p.parse_args()
    rows = []
    print(f"{'N':>4}{'steady round s':>16}{'per institution s':>19}{'peak MB':>9}")
    for n in args.nodes:
        code = JOB.format(root=str(ROOT), n=n, per_node=args.per_node, rounds=args.rounds)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        child = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT_CHILD "))[13:])
        steady = statistics.median(child["round_s"])
        rows.append({"institutions": n, "steady_round_s": steady, "round_s": child["round_s"],
                     "peak_mb": child["peak_mb"]})
        print(f"{n:>4}{steady:>16.3f}{steady / n:>19.3f}{child['peak_mb']:>9.0f}", flush=True)
    # least-squares line through (N, round time)
    xs, ys = [r["institutions"] for r in rows], [r["steady_round_s"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    print(f"round time = {a:.3f} s + {b:.3f} s x N  (largest relative deviation from the line {100 * worst:.1f} %)")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "workload": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
              "fit": {"per_round_overhead_s": a, "per_institution_s": b, "max_rel_deviation": worst}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({"per_round_overhead_s": round(a, 4), "per_institution_s": round(b, 4),
                                  "max_rel_deviation": round(worst, 4),
                                  "peak_mb": {str(r["institutions"]): round(r["peak_mb"]) for r in rows}}))


if __name__ == "__main__":
    main()

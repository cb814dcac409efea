"""hsl_lightning against Flower's simulation engine (Ray) on the same FedAvg workload.

Workload: 4 institutions x 480 random 28 px single-channel images, 5 rounds of one local epoch,
batch 32, AdamW (lr 1e-3, weight decay 1e-4; torch's fused kernel in every variant, as
hsl_lightning's modules configure it), a ResNet-10t with one logit (timm), FedAvg weighted by
size; every variant may use all the machine's cores. Whole processes, each run ``--repeats``
times, alternating:

- ``hsl_lightning``: ``Federation(strategy="fedavg")`` as configured by default, in one process:
  min(cores, institutions) institutions train at the same time, one thread each (checkpoints,
  weights and W&B off; it also validates each node every round and tests at the end);
- ``hsl_lightning_one_by_one``: the same with ``concurrent_institutions=1``, institutions one after
  another on all cores as intra-op threads (the default before concurrent institutions);
- ``hsl_lightning_ranks``: one rank per core (spawned), each hosting N / cores nodes;
- ``..._val_last``: the two above validating after the last round only (``val_every_n_rounds=R``),
  the closest to the Flower and plain runs, which validate nothing (they still test at the end);
- ``flower``: ``flwr.simulation.run_simulation`` with a NumPyClient per institution (Ray backend,
  one CPU per client) and Flower's FedAvg, in the interpreter given by ``--flower-python``;
- ``plain``: a hand-written loop doing the same steps and averaging, the cores as threads.

Each child prints time stamps; this script measures the whole process wall time and polls the
resident memory of the child and all its descendants (Ray's raylet, GCS and workers included)
every 0.1 s. Reported, as the issue asks: start-up plus tear-down beyond importing the libraries,
whole-process wall, steady-state round (median of rounds 2..R), peak memory summed over processes.
"Start-up plus tear-down" is everything but importing and the rounds: wall - import - sum(rounds).

Flower is a benchmark-only dependency, in its own environment (it pins protobuf < 7, which the
W&B client here needs):

    python3 -m venv ../flower-venv && ../flower-venv/bin/pip install torch torchvision timm 'flwr[simulation]'
    .venv/bin/python benchmarks/vs_flower.py --flower-python ../flower-venv/bin/python

Prints a table, writes benchmarks/results/vs_flower.json, ends with one line ``RESULT {json}``: the
default variant's figures against Flower first, the other variants under ``other_variants``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

COMMON = r'''
import time, json, os, sys
STAMPS = {{"start": time.time()}}
def stamp(key):
    STAMPS[key] = time.time()
def done():
    stamp("end")
    print("STAMPS " + json.dumps(STAMPS), flush=True)
NODES, PER_NODE, ROUNDS, BATCH, BACKBONE = {nodes}, {per_node}, {rounds}, {batch}, {backbone!r}
CORES, RANKS, VAL_EVERY, AT_ONCE = {cores}, {ranks}, {val_every}, {at_once}
'''

DATA = r'''
def make_data():
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(NODES):
        images = torch.randint(0, 256, (PER_NODE, 1, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 2, (PER_NODE,), generator=g)
        data.append((images, labels))
    return data
'''

HSL = COMMON + r'''
import torch
sys.path.insert(0, {root!r})
from hsl_lightning import ClassifierModule, FederatedDataModule, Federation, Scenario
from hsl_lightning.data.base import ImageSet, Source
stamp("imported")
''' + DATA + r'''
class Random(Source):
    per_node = True
    def load(self, root=None):
        out = {{}}
        for i, (x, y) in enumerate(make_data()):
            out[f"node{{i}}"] = {{"train": ImageSet(x, y), "val": ImageSet(x[:64], y[:64]), "test": ImageSet(x[:64], y[:64])}}
        return out
if __name__ == "__main__":  # spawned ranks import this file: only the launching process runs
    dm = FederatedDataModule(primary=Random(), use_sat=False, scenario=Scenario(num_nodes=NODES), batch_size=BATCH,
                             augment=False, rebalance=False)
    model = ClassifierModule(backbone=BACKBONE)
    stamp("ready")
    summary = Federation(strategy="fedavg", rounds=ROUNDS, local_epochs=1, contribute="last",
                         run_dir="/tmp/hsl_vs_flower", wandb="disabled", progress=False, checkpoint=False,
                         save_weights=False, devices=RANKS, threads=CORES // RANKS,
                         val_every_n_rounds=VAL_EVERY, concurrent_institutions=AT_ONCE).fit(model, dm)
    STAMPS["round_s"] = [h["round_s"] for h in summary["history"]]
    stamp("finished")
    done()
'''

PLAIN = COMMON + r'''
import torch, timm
import torch.nn.functional as F
torch.set_num_threads(CORES)
stamp("imported")
''' + DATA + r'''
data = make_data()
model = timm.create_model(BACKBONE, in_chans=1, num_classes=1)
stamp("ready")
sizes = [len(y) for _, y in data]
state = {{k: v.clone() for k, v in model.state_dict().items()}}
rounds = [time.time()]
for r in range(ROUNDS):
    merged = {{k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}}
    for i, (x, y) in enumerate(data):
        model.load_state_dict(state); model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
        order = torch.randperm(len(y))
        for s in range(len(y) // BATCH):
            idx = order[s * BATCH:(s + 1) * BATCH]
            loss = F.binary_cross_entropy_with_logits(model(x[idx].float() / 255).squeeze(1), y[idx].float())
            opt.zero_grad(); loss.backward(); opt.step()
        for k, v in model.state_dict().items():
            merged[k] += sizes[i] * v.double()
    state = {{k: (v / sum(sizes)).to(state[k].dtype) for k, v in merged.items()}}
    rounds.append(time.time())
STAMPS["round_s"] = [b - a for a, b in zip(rounds, rounds[1:])]
stamp("finished")
done()
'''

FLOWER = COMMON + r'''
import torch, timm, numpy as np
import torch.nn.functional as F
torch.set_num_threads(1)
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
stamp("imported")
''' + DATA + r'''
FIT_LOG = os.environ["HSL_FLOWER_FIT_LOG"]

class Client(NumPyClient):
    def __init__(self, i):
        torch.set_num_threads(1)
        self.x, self.y = make_data()[i]
        self.model = timm.create_model(BACKBONE, in_chans=1, num_classes=1)
    def get_parameters(self, config):
        return [v.detach().cpu().numpy() for v in self.model.state_dict().values()]
    def fit(self, parameters, config):
        with open(FIT_LOG, "a") as f:
            f.write(f"{{time.time()}}\n")
        keys = list(self.model.state_dict())
        self.model.load_state_dict({{k: torch.as_tensor(v) for k, v in zip(keys, parameters)}})
        self.model.train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
        order = torch.randperm(len(self.y))
        for s in range(len(self.y) // BATCH):
            idx = order[s * BATCH:(s + 1) * BATCH]
            loss = F.binary_cross_entropy_with_logits(self.model(self.x[idx].float() / 255).squeeze(1), self.y[idx].float())
            opt.zero_grad(); loss.backward(); opt.step()
        return self.get_parameters(config), len(self.y), {{}}

def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()

rounds = []
class TimedFedAvg(FedAvg):
    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        rounds.append(time.time())
        return out

def server_fn(context: Context):
    model = timm.create_model(BACKBONE, in_chans=1, num_classes=1)
    from flwr.common import ndarrays_to_parameters
    initial = ndarrays_to_parameters([v.detach().numpy() for v in model.state_dict().values()])
    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=NODES, min_available_clients=NODES,
                           initial_parameters=initial)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

stamp("ready")
run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=NODES, backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})
stamp("finished")
with open(FIT_LOG) as f:
    first_fit = min(float(line) for line in f if line.strip())
STAMPS["round_s"] = [b - a for a, b in zip([first_fit] + rounds, rounds)]
done()
'''


def run_child(python: str, code: str, env: dict) -> dict:
    """Run one whole process; wall time, its time stamps and the peak RSS over its process tree."""
    script = Path(f"/tmp/hsl_vs_flower_child_{os.getpid()}.py")  # a file, so spawned ranks can import it
    script.write_text(code)
    start = time.time()
    proc = subprocess.Popen([python, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(ROOT))
    peak = [0]

    def poll():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, _ = proc.communicate(timeout=1800)
    wall = time.time() - start
    watcher.join(timeout=1)
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    stamps = json.loads(next(line for line in out.splitlines() if line.startswith("STAMPS "))[7:])
    rounds = stamps["round_s"]
    imported = stamps["imported"] - start
    return {
        "wall_s": wall,
        "import_s": imported,
        # everything but importing and the rounds themselves: building, starting workers, the final
        # test (hsl_lightning), shutting down and exiting
        "frame_s": wall - imported - sum(rounds),
        "first_round_s": rounds[0],
        "steady_round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else float("nan"),
        "peak_rss_mb": peak[0] / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flower-python", default=os.environ.get("HSL_FLOWER_PYTHON", str(ROOT.parent / "flower-venv" / "bin" / "python")))
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--per-node", type=int, default=480)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_flower.json"))
    args = p.parse_args()
    if not Path(args.flower_python).is_file():
        raise SystemExit(f"No Python with Flower at {args.flower_python}; see this script's docstring.")
    cores = os.cpu_count() or 1
    fmt = dict(nodes=args.nodes, per_node=args.per_node, rounds=args.rounds, batch=args.batch, backbone=args.backbone,
               root=str(ROOT), cores=cores, ranks=1, val_every=1, at_once=None)
    # every variant may use all cores: Flower runs one client per core in Ray actors; hsl_lightning
    # by default runs one process training min(cores, institutions) institutions at once, a thread
    # each; "one_by_one" trains them one after another on all cores (the default before issue 17);
    # "ranks" runs one rank per core hosting N / cores nodes
    codes = {"hsl_lightning": (sys.executable, HSL.format(**fmt)),
             "hsl_lightning_one_by_one": (sys.executable, HSL.format(**{**fmt, "at_once": 1})),
             "hsl_lightning_ranks": (sys.executable, HSL.format(**{**fmt, "ranks": cores})),
             "hsl_lightning_val_last": (sys.executable, HSL.format(**{**fmt, "val_every": args.rounds})),
             "hsl_lightning_ranks_val_last": (sys.executable, HSL.format(**{**fmt, "ranks": cores,
                                                                             "val_every": args.rounds})),
             "plain": (sys.executable, PLAIN.format(**fmt)),
             "flower": (args.flower_python, FLOWER.format(**fmt))}
    runs = {k: [] for k in codes}
    for rep in range(args.repeats):
        for name, (python, code) in codes.items():
            log = Path(f"/tmp/hsl_flower_fit_{os.getpid()}_{rep}.log")
            log.unlink(missing_ok=True)
            env = {**os.environ, "HSL_FLOWER_FIT_LOG": str(log), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
            runs[name].append(run_child(python, code, env))
            r = runs[name][-1]
            print(f"repeat {rep + 1} {name:<28} wall {r['wall_s']:.1f} s, import {r['import_s']:.2f} s, start-up + "
                  f"tear-down {r['frame_s']:.2f} s, steady round {r['steady_round_s']:.2f} s, "
                  f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
    keys = ["wall_s", "import_s", "frame_s", "first_round_s", "steady_round_s", "peak_rss_mb"]
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"\nworkload: FedAvg, {args.nodes} institutions x {args.per_node} images, {args.rounds} rounds, "
          f"{args.backbone}, batch {args.batch}, 28 px, {cores} cores for each variant; medians of {args.repeats}")
    print(f"{'':<30}" + "".join(f"{k:>15}" for k in keys))
    for name, m in med.items():
        print(f"{name:<30}" + "".join(f"{m[k]:>15.2f}" for k in keys))
    def versus_flower(m: dict) -> dict:
        f = med["flower"]
        return {"wall_speedup_vs_flower": round(f["wall_s"] / m["wall_s"], 3),
                "steady_round_ratio_vs_flower": round(m["steady_round_s"] / f["steady_round_s"], 3),
                "startup_plus_teardown_s": round(m["frame_s"], 2),
                "peak_memory_fraction_of_flower": round(m["peak_rss_mb"] / f["peak_rss_mb"], 3)}

    # what a user gets by default first; the other variants as extra keys, named as such
    headline = {"variant": "hsl_lightning (default)", **versus_flower(med["hsl_lightning"]),
                "flower_startup_plus_teardown_s": round(med["flower"]["frame_s"], 2),
                "other_variants": {k: versus_flower(med[k]) for k in codes if k.startswith("hsl") and k != "hsl_lightning"}}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "workload": {k: v for k, v in vars(args).items() if k not in ("out", "flower_python")},
              "runs": runs, "median": med, "headline": headline}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

"""Bit-identity check for refactors: 21 tiny runs whose deployed weights and AUCs must not move.

Every registered strategy on tiny synthetic data (2 rounds; FedRep 2 local epochs), plus fused
training (hsl, fedavg), ``contribute: best`` (fedavg) and ``val_every_n_rounds: 2`` (hsl, 3 rounds).
For each run it records a SHA-256 of the deployed weights (every checkpoint the run wrote, tensors
in key order, raw bytes) and the per-node validation and test AUCs.

Compare a change against the code before it (the library is imported from PYTHONPATH when set)::

    git worktree add /work/before <commit-before>
    PYTHONPATH=/work/before .venv/bin/python benchmarks/identity_check.py --out /tmp/before.json
    .venv/bin/python benchmarks/identity_check.py --out /tmp/after.json --compare /tmp/before.json

The run list does not depend on the library's registry order: the strategy names are fixed here,
so both sides run the same 21 cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's tiny data and models

STRATEGY_NAMES = ["hsl", "fedavg", "swarm", "personalized", "fedprox", "fedbn", "fedper", "fedrep", "scaffold", "moon",
                  "ditto", "splitavg", "fedrcl", "fedcome", "foundation", "local", "central"]
EXTRA = {  # name: (strategy, Federation keyword arguments)
    "fused_hsl": ("hsl", {"fuse_institutions": True}),
    "fused_fedavg": ("fedavg", {"fuse_institutions": True}),
    "contribute_best_fedavg": ("fedavg", {"contribute": "best"}),
    "val_every_2_hsl": ("hsl", {"val_every_n_rounds": 2, "rounds": 3}),
}


def cases() -> dict[str, tuple[str, dict]]:
    runs = {name: (name, {"local_epochs": 2} if name == "fedrep" else {}) for name in STRATEGY_NAMES}
    runs.update(EXTRA)
    return runs


def model_and_data(strategy: str):
    from conftest import tiny_classifier, tiny_data, tiny_hsl
    from hsl_lightning import FoundationProbe, SplitClassifier

    if strategy == "hsl":
        return tiny_hsl(), tiny_data()
    if strategy == "splitavg":
        return SplitClassifier(backbone="test_resnet"), tiny_data(use_sat=False)
    if strategy == "foundation":
        return (FoundationProbe(backbone="test_vit", in_chans=1, pretrained=False),
                tiny_data(use_sat=False, image_size=32))
    return tiny_classifier(strategy), tiny_data(use_sat=False)


def weights_hash(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(run_dir.rglob("*.ckpt")):
        if "checkpoints" in path.relative_to(run_dir).parts:
            continue  # resumable round checkpoints, not the deployed model
        digest.update(str(path.relative_to(run_dir)).encode())
        state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def run(name: str, strategy: str, kwargs: dict, root: Path) -> dict:
    from hsl_lightning import Federation

    torch.manual_seed(0)
    model, data = model_and_data(strategy)
    run_dir = root / name
    options = {"strategy": strategy, "rounds": 2, "run_dir": str(run_dir), "wandb": "disabled", "progress": False,
               **kwargs}
    summary = Federation(**options).fit(model, data)
    return {"weights_sha256": weights_hash(run_dir), "best_round": summary.get("best_round"),
            "nodes": [[n["name"], n.get("val_auc"), n["test_auc"]] for n in summary["nodes"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the 21 runs' hashes and AUCs (JSON)")
    parser.add_argument("--compare", help="a previous --out file: report which runs differ")
    parser.add_argument("--only", nargs="*", help="run only these cases (names as in the output)")
    args = parser.parse_args()
    import hsl_lightning

    print(f"library: {Path(hsl_lightning.__file__).parent}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (strategy, kwargs) in cases().items():
            if args.only and name not in args.only:
                continue
            results[name] = run(name, strategy, kwargs, Path(tmp))
            print(f"{name}: {results[name]['weights_sha256'][:16]} {results[name]['nodes']}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    same = [name for name in results if before.get(name) == results[name]]
    for name in results:
        if name not in same:
            print(f"DIFFERENT {name}: before {before.get(name)} after {results[name]}")
    print(f"{len(same)}/{len(results)} identical")
    return 0 if len(same) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

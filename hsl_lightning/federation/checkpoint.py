"""Round checkpoints: everything a federation needs to continue after a crash or pre-emption.

After every round each rank writes ``<run_dir>/checkpoints/round-NNNN/rank-K.pt`` (the states of
the institutions it hosts, the merged state, the strategy's per-node state, the best round so far
and the metric history), each file written to a temporary name and renamed, so a kill never leaves
a half-written file. When every rank has written, the first rank of every machine marks the round
complete (``complete.json``, also renamed into place) and deletes older rounds, so each machine's
run directory holds a complete, resumable round of its own ranks (a shared directory works too). Only complete rounds are
resumed. Files hold tensors, numbers and strings only and are read with
``torch.load(weights_only=True)``: nothing is unpickled.

Nothing else is needed to continue exactly: every institution's randomness is reseeded from
(seed, round, institution) at the start of its local training, and each round's local training
starts a fresh optimizer (as FedAvg clients do), so neither RNG nor optimizer state crosses rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from hsl_lightning.errors import HSLError

FORMAT = 1


def _round_dir(run_dir: Path, completed: int) -> Path:
    return run_dir / "checkpoints" / f"round-{completed:04d}"


def save_rank(run_dir: Path, completed: int, rank: int, payload: dict) -> None:
    """Rank ``rank``'s share of the checkpoint after ``completed`` rounds."""
    folder = _round_dir(run_dir, completed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"rank-{rank}.pt.tmp"
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, folder / f"rank-{rank}.pt")


def mark_complete(run_dir: Path, completed: int, world_size: int) -> None:
    """Called once every rank has saved: the round becomes resumable; older rounds are removed."""
    folder = _round_dir(run_dir, completed)
    tmp = folder / f"complete.json.{os.getpid()}.tmp"  # machines sharing a directory each write their own
    tmp.write_text(json.dumps({"round": completed, "world_size": world_size}))
    os.replace(tmp, folder / "complete.json")
    for old in (run_dir / "checkpoints").glob("round-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete round folder under ``run_dir``, if any."""
    folders = sorted((run_dir / "checkpoints").glob("round-*"))
    for folder in reversed(folders):
        if (folder / "complete.json").is_file():
            return folder
    return None


def resolve(ckpt_path: str, run_dir: Path) -> Path | None:
    """The round folder to resume from: ``last`` (newest complete round of ``run_dir``; None when
    there is none yet), a round folder, or a run directory."""
    if ckpt_path == "last":
        return latest(run_dir)
    path = Path(ckpt_path).expanduser()
    if (path / "complete.json").is_file():
        return path
    if (path / "checkpoints").is_dir() and latest(path) is not None:
        return latest(path)
    raise HSLError(f"No complete federation checkpoint at {path}. Pass 'last' (the newest complete round of "
                   f"federation.run_dir), a run directory, or a checkpoints/round-NNNN folder.")


def load_rank(folder: Path, rank: int, world_size: int, device) -> dict:
    """Load this rank's part of a complete round checkpoint in ``folder`` (HSLError when it is incomplete or was
    written by another number of ranks)."""
    try:
        info = json.loads((folder / "complete.json").read_text())
    except (OSError, ValueError) as exc:
        raise HSLError(f"Checkpoint {folder} is not complete on this machine ({exc}). On several machines each one "
                       "needs the run directory it wrote (or a shared one).") from exc
    if info["world_size"] != world_size:
        raise HSLError(f"Checkpoint {folder} was written by {info['world_size']} rank(s); resume it with the same "
                       f"devices x machines (now {world_size}).")
    file = folder / f"rank-{rank}.pt"
    try:
        payload = torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise HSLError(f"Checkpoint file {file} is missing (each rank reads its own file: on several machines "
                       "the run directory must be shared or copied to every machine).") from None
    except Exception as exc:  # truncated / corrupt / not ours
        raise HSLError(f"Could not read checkpoint file {file}: {exc}") from exc
    if payload.get("format") != FORMAT:
        raise HSLError(f"Checkpoint file {file} has format {payload.get('format')}, expected {FORMAT}.")
    return payload


def save_round(fabric, run_dir: Path, completed: int, payload: dict) -> None:
    """Every rank's share of the checkpoint after ``completed`` rounds; once all have saved, the first
    rank of each machine marks the round complete (and prunes older ones)."""
    save_rank(run_dir, completed, fabric.global_rank, payload)
    if fabric.world_size > 1:
        fabric.barrier()
    if fabric.local_rank == 0:  # each machine marks its own copy of the round
        mark_complete(run_dir, completed, fabric.world_size)


def load_round(fabric, run_dir: Path, ckpt_path: str, fingerprint: dict) -> dict | None:
    """This rank's share of the round ``ckpt_path`` names (see :func:`resolve`), checked against the
    run's ``fingerprint``; None when ``last`` finds no complete round yet."""
    folder = resolve(ckpt_path, run_dir) if fabric.global_rank == 0 else None
    if fabric.world_size > 1:
        folder = fabric.broadcast(folder, src=0)
    if folder is None:
        if fabric.global_rank == 0:
            print(f"hsl: no complete checkpoint in {run_dir / 'checkpoints'} yet; starting from round 1.")
        return None
    payload = load_rank(Path(folder), fabric.global_rank, fabric.world_size, fabric.device)
    check_fingerprint(payload["fingerprint"], fingerprint, Path(folder))
    if fabric.global_rank == 0:
        best = f"round {payload['best_round'] + 1}" if payload["best_round"] >= 0 else "none validated yet"
        print(f"hsl: resuming from {folder} after round {payload['round']} (best so far: {best}).")
    return payload


def fingerprint(**parts) -> dict:
    """What must match between a checkpoint and the run resuming it (``data`` is hashed)."""
    out = {k: v for k, v in parts.items() if k != "data"}
    out["data"] = hashlib.sha256(json.dumps(parts.get("data"), sort_keys=True, default=str).encode()).hexdigest()
    return json.loads(json.dumps(out, default=str))  # plain lists / dicts / strings


def check_fingerprint(saved: dict, now: dict, folder: Path) -> None:
    """Raise HSLError when a checkpoint's run fingerprint (model, data, strategy, seed) differs from the run
    resuming it."""
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}" for k in differ)
        raise HSLError(f"Checkpoint {folder} comes from a different run (differs in {', '.join(differ)}). {detail}. "
                       "Resume with the same model, data, strategy and seed, or start a new run directory.")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."

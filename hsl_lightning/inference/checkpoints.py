"""The deployed models of a run as Lightning checkpoints.

A finished run writes ``model.ckpt`` when every node deploys the same model, else
``nodes/<node>.ckpt`` per node. Each is a Lightning checkpoint (``state_dict``,
``hyper_parameters``, ``pytorch-lightning_version``), so
``HSLModule.load_from_checkpoint(path)`` (or the class the run used) rebuilds the module without
any config, and ``lightning.Trainer().test/predict`` can use it. An ``hsl`` section adds what
deployment needs besides the weights:

- ``class_path``: the module's class, for :func:`load`;
- ``threshold``: the probability cut chosen on the run's validation data (Youden's J: the cut that
  maximises sensitivity + specificity - 1, :func:`hsl_lightning.metrics.youden`; for ``model.ckpt``
  over all nodes' validation images pooled, for a node's checkpoint over its own);
- ``image_size``, ``in_chans``: how training prepared images (``hsl predict`` does the same);
- ``node``, ``round``, ``strategy``, ``seed``: where it came from;
- ``sat_reference``: the fixed SAT batch of an HSLModule that infers with ``sat_inference:
  reference`` (a buffer that is not part of the state).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import lightning
import torch

from hsl_lightning.errors import HSLError


def write(path: Path, module: torch.nn.Module, info: dict) -> None:
    """``module`` (holding the deployed weights) as a Lightning checkpoint at ``path``, atomically."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    info = {"class_path": f"{type(module).__module__}.{type(module).__qualname__}", **info}
    reference = getattr(module, "sat_reference", None)
    if reference is not None and getattr(module, "sat_inference", None) == "reference":
        info["sat_reference"] = reference.detach().cpu()
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(info.get("round", 0)),
        "global_step": 0,
        "hsl": info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def deployed(run_dir: str | Path) -> dict[str | None, Path]:
    """The run's checkpoints: {None: model.ckpt} or {node name: nodes/<name>.ckpt}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HSLError(f"Run directory not found: {run_dir}.")
    if (run_dir / "model.ckpt").is_file():
        return {None: run_dir / "model.ckpt"}
    nodes = {p.stem: p for p in sorted((run_dir / "nodes").glob("*.ckpt"))} if (run_dir / "nodes").is_dir() else {}
    if not nodes:
        raise HSLError(f"{run_dir} holds no deployed model (model.ckpt or nodes/*.ckpt): the run did not finish, or "
                       "ran with federation.save_weights false.")
    return nodes


def info(path: str | Path) -> dict:
    """The ``hsl`` section of a checkpoint (reads the file; the weights are not instantiated)."""
    path = Path(path)
    if not path.is_file():
        raise HSLError(f"Checkpoint not found: {path}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise HSLError(f"Cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if "hsl" not in payload:
        raise HSLError(f"{path} is not a checkpoint written by hsl fit (it has no 'hsl' section).")
    return payload["hsl"]


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The module of a checkpoint, in eval mode, through its class's ``load_from_checkpoint``; and
    its ``hsl`` section."""
    meta = info(path)
    module_name, _, cls_name = meta["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise HSLError(f"{path} holds a {meta['class_path']}, which cannot be imported here: {exc}") from exc
    module = cls.load_from_checkpoint(str(path), map_location=device, weights_only=True)
    if meta.get("sat_reference") is not None and hasattr(module, "set_sat_reference"):
        module.set_sat_reference(meta["sat_reference"].to(device))
    return module.eval(), meta


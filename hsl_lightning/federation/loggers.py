"""Loggers of a federated run: a CSV file always, Weights & Biases unless disabled.

W&B mode ``auto`` follows ``WANDB_MODE`` when set, else logs online when the user is logged in
(``WANDB_API_KEY`` or a netrc entry for api.wandb.ai) and offline otherwise, so runs never
need the network; ``wandb sync`` uploads an offline run later.
"""

from __future__ import annotations

import netrc
import os
import shutil
from pathlib import Path
from typing import Literal

WandbMode = Literal["auto", "online", "offline", "disabled"]


def wandb_logged_in() -> bool:
    """Whether W&B has credentials here (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: WandbMode) -> str:
    """The W&B mode to use: ``auto`` becomes ``WANDB_MODE`` when set, else online when logged in, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_logged_in() else "offline"


def make_loggers(run_dir: Path, mode: WandbMode, project: str, run_name: str, config: dict | None) -> list:
    """Fabric loggers for a run: a CSV file of one row per round, and W&B unless disabled."""
    from lightning.fabric.loggers import CSVLogger

    # One row per round, written as it comes: a crashed run keeps every finished round. A resumed run
    # writes the restored rounds again, so an old file is replaced (as Lightning would, with a warning).
    shutil.rmtree(run_dir / "csv", ignore_errors=True)
    loggers = [CSVLogger(root_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)]
    resolved = resolve_wandb_mode(mode)
    if resolved != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = WandbLogger(project=project, name=run_name, save_dir=str(run_dir),
                                   offline=resolved == "offline", config=config or {})
        loggers.append(wandb_logger)
    return loggers

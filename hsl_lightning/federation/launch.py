"""How a run's processes start and end: spawn the ranks here, or join those that torchrun or srun
started; and leave the process group before the interpreter exits."""

from __future__ import annotations

import atexit
import os
import warnings

import torch

from hsl_lightning.errors import HSLError


def launched_externally() -> bool:
    """Whether this process is one rank of a torchrun (torchelastic) or SLURM ``srun`` launch."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect() or (
        "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def fabric_strategy(world: int) -> str:
    """Fabric's strategy for ``world`` ranks: one process; join the ranks a launcher started; or spawn them."""
    if world == 1:
        return "auto"
    return "ddp" if launched_externally() else "ddp_spawn"


def machines_of(machines: int, num_nodes: int | None) -> int:
    """The machines a run's ranks span, from ``federation.machines`` and its deprecated name
    ``federation.num_nodes`` (Lightning Fabric's word, easily taken for the hospitals of
    ``data.scenario.num_nodes``): the old name warns, and the two must agree unless ``machines`` is
    left at its default, 1."""
    if num_nodes is None:
        return machines
    if machines not in (1, num_nodes):
        raise HSLError(f"federation.machines is {machines} but federation.num_nodes, its deprecated name, is "
                       f"{num_nodes}: set only federation.machines.")
    warnings.warn("federation.num_nodes is deprecated: it counts machines, not hospitals; use federation.machines",
                  FutureWarning, stacklevel=3)
    return num_nodes


_LEAVING_REGISTERED = False


def leave_process_group_at_exit() -> None:
    """Destroy this process's process group when the interpreter exits, before it is torn down.

    A rank that exits with its Gloo process group alive can abort during interpreter finalisation
    ("terminate called without an active exception", SIGABRT; the group's C++ threads outlive
    Python), and torchrun, or the parent of spawned ranks, then reports the whole run as failed
    even though it finished. Each rank calls this in its own process (spawned ranks finalise too),
    once its first run has finished: a run that failed ends in error either way, and its exit
    should not depend on what a failed collective left behind. At exit, not at once, so a script
    may call ``fit`` again under the same launch and reuse the group. Destroying the group stops
    its threads only while nothing else holds it (a DDP wrapper, a subgroup): this package makes
    no such reference.
    """
    global _LEAVING_REGISTERED
    if not _LEAVING_REGISTERED:
        atexit.register(_destroy_process_group)
        _LEAVING_REGISTERED = True


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

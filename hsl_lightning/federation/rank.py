"""What stays fixed for a whole run on one rank: the plan of trainees, who hosts them, the packing.

Institutions are not processes: W ranks host the trainees of ``Strategy.plan`` (trainee t lives on
rank t % W), so the same configuration runs on one CPU process, several processes or several GPUs.
:class:`RankRun` bundles what every phase of a round reads, so phases take one argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hsl_lightning.federation.message import MessageLayout
from hsl_lightning.federation.sync import StatePacker


@dataclass
class RankRun:
    """What one rank holds for a run: Fabric, the module, the data, the strategy, the node names and the trainees it
    hosts."""
    fabric: object  # lightning.fabric.Fabric
    module: torch.nn.Module  # the one module every hosted trainee is loaded into in turn
    dm: object  # the FederatedDataModule, set up
    strategy: object  # the Strategy
    run_dir: Path
    names: list[str]  # node names
    plan: list[tuple[int, ...]]  # trainee t trains on the nodes plan[t]
    packer: StatePacker  # the shared entries <-> one float64 vector
    local_keys: list[str]  # state entries that stay with their trainee
    data_report: list[dict]  # how each node was drawn (data.json; part of the fingerprint)
    fingerprint: dict  # what a checkpoint must match to be resumed by this run
    workers: object = None  # Workers: threads training (and scoring) several trainees at once, or None
    at_once: tuple[int, int] = (1, 1)  # trainees training at the same time, and intra-op threads each
    secure: bool = False  # the message is summed as fixed-point integers (federation.fixedpoint)
    told_total_weight: float | None = None  # the run's total weight, as a deployed site is told it

    def __post_init__(self):
        world, rank = self.fabric.world_size, self.fabric.global_rank
        self.mine = [t for t in range(len(self.plan)) if t % world == rank]  # trainees hosted here
        self.owner = {node: t % world for t, nodes in enumerate(self.plan) for node in nodes}  # node -> rank
        self.n_train = [sum(len(self.dm.nodes[i].train) for i in nodes) for nodes in self.plan]
        self.layout = MessageLayout(self.packer.numel, self.strategy.extra_size(self.module), len(self.plan))
        # what one trainee sends per round: its shared state, plus strategy extras as float32
        self.payload = self.packer.nbytes + 4 * self.layout.extras if len(self.plan) > 1 else 0
        trainable = {name for name, p in self.module.named_parameters() if p.requires_grad}
        self.is_param = self.packer.mask(trainable).to(self.fabric.device)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def label(self, t: int) -> str:
        """Trainee t's name: its nodes' names joined by '+'."""
        return "+".join(self.names[i] for i in self.plan[t])

    def weight(self, t: int) -> float:
        """Trainee t's weight in the merge (under secure aggregation divided by every trainee's
        summed weight, so that a contribution's entries stay within the fixed-point range)."""
        if self.secure:
            return self.strategy.weight(self.n_train[t]) / self.total_weight
        return self.strategy.weight(self.n_train[t])

    @property
    def total_weight(self) -> float:
        """Every trainee's weight summed (a deployed site, which holds only its own data, is told it)."""
        if self.told_total_weight is not None:
            return self.told_total_weight
        return sum(self.strategy.weight(n) for n in self.n_train)

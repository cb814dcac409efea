"""Merging: how a round's contributions become what each trainee starts the next round from.

A strategy selects one kind (``Strategy.merge_kind``); the round loop calls the same three methods
whatever the kind, so adding a kind never touches the loop:

- :class:`Mean`: everyone receives the weighted mean of the contributions (HSL, FedAvg, ...).
  Contributions go straight into the message; nothing is kept.
- :class:`Personal`: each trainee receives ``Strategy.combine(own, sum, ...)`` of its own
  contribution and the sum (Personalized Learning), so it keeps a shared state of its own.
- :class:`Server`: the merge needs every trainee's contribution, not only their sum
  (``Strategy.aggregate``: FedCOME); they are gathered in a second all-reduce.

Every kind rounds its result to what the entries' own dtypes hold (``StatePacker.representable``),
so what a trainee receives is exactly what a checkpoint restores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from hsl_lightning.federation import sync

if TYPE_CHECKING:  # annotations only
    from hsl_lightning.federation.message import RoundMessage
    from hsl_lightning.federation.state import RankState


class Merge:
    """One round's merge on one rank: built when the round starts, with the state every trainee
    received (``received``); fed each finished trainee's contribution; applied to the reduced message."""

    #: every trainee receives the same merged state (else each keeps its own: ``TraineeState.shared``)
    one_model: ClassVar[bool] = True
    #: the merge reads each contribution, not only the sum, so this rank keeps them for the round
    keeps_contributions: ClassVar[bool] = False

    def __init__(self, run, received: torch.Tensor):
        self.run, self.strategy, self.received = run, run.strategy, received
        self.own: dict[int, torch.Tensor] = {}  # per trainee, packed (keeps_contributions only)

    def contribute(self, message: RoundMessage, trainee: int, state: dict[str, torch.Tensor], weight: float) -> None:
        """Add ``weight * state`` (its shared entries) into the message's ``state`` part."""
        packer = self.run.packer
        if not self.keeps_contributions:
            packer.accumulate(message.state, state, weight)  # no packed copy
            return
        flat = packer.pack(state, message.vector.device)
        message.state.add_(flat, alpha=weight)
        self.own[trainee] = flat

    def dropped(self, trainee: int) -> None:
        """``trainee`` failed this round and contributes nothing."""

    def apply(self, total: RoundMessage, state: RankState) -> None:
        """Write the merge of the all-reduced message into ``state`` (a no-op when nothing is shared)."""
        if self.run.packer.numel:
            self._merge(total, state)
        self.own = {}

    def _merge(self, total: RoundMessage, state: RankState) -> None:
        raise NotImplementedError


class Mean(Merge):
    """Every trainee receives the weighted mean of the finished trainees' states."""

    def _merge(self, total, state):
        state.merged = self.run.packer.representable(total.state / total.weight)


class Personal(Merge):
    """Each trainee receives ``strategy.combine`` of its own contribution and the sum; a dropped
    trainee keeps what it had."""

    one_model = False
    keeps_contributions = True

    def _merge(self, total, state):
        for t, own in self.own.items():
            merged = self.strategy.combine(own, total.state, self.run.weight(t), float(total.weight))
            state.trainees[t].shared = self.run.packer.representable(merged)


class Server(Merge):
    """``strategy.aggregate`` over every trainee's contribution (a dropped trainee's is the state it
    received, with size 0), gathered by a second all-reduce of one row per trainee."""

    keeps_contributions = True

    def dropped(self, trainee):
        self.own[trainee] = self.received  # no update from this trainee

    def _merge(self, total, state):
        run = self.run
        stacked = torch.zeros(len(run.plan), run.packer.numel, dtype=torch.float64, device=total.vector.device)
        for t in run.mine:
            stacked[t] = self.own[t]
        stacked = sync.all_reduce_sum(run.fabric, stacked)
        sizes = torch.tensor(run.n_train, dtype=torch.float64, device=stacked.device) * total.finished
        state.merged = run.packer.representable(self.strategy.aggregate(self.received, stacked, sizes, run.is_param))

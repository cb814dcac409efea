"""What a rank keeps between rounds, as types: each hosted trainee's state, the best round, the history.

A *trainee* is what trains as one model in a round: one institution, or all of them for
``central`` and ``splitavg`` (``Strategy.plan``). Its model is assembled from three parts:

- ``local``: the state entries that never cross its boundary (``Strategy.shared_keys`` leaves them
  out: FedBN's BatchNorm layers, FedPer's head; everything for ``local``);
- ``shared``: its own merged shared state, packed (a :class:`~.merge.Personal` merge), or None when
  it receives the federation's merged state (``RankState.merged``);
- ``personal``: a whole model of its own that it trains beside the shared one and deploys (Ditto).

Each type owns its copy (``clone``), its checkpoint form (``portable``, tensors on the CPU with the
shared part unpacked, so files do not depend on the packing) and its way back (``restore``). The
checkpoint format is ``checkpoint.FORMAT`` 1, unchanged from before these types existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.sync import StatePacker

State = dict[str, torch.Tensor]


def clone_state(state: State) -> State:
    """A detached copy of a state dict."""
    return {k: v.detach().clone() for k, v in state.items()}


def _cpu(state: State) -> State:
    return {k: v.cpu() for k, v in state.items()}


@dataclass
class TraineeState:
    """One trainee's state between rounds: its local state dict, the shared vector it last received and (Ditto) its
    personal model."""
    local: State
    shared: torch.Tensor | None = None
    personal: State | None = None

    def clone(self) -> TraineeState:
        return TraineeState(clone_state(self.local), None if self.shared is None else self.shared.clone(),
                            None if self.personal is None else clone_state(self.personal))

    def start(self, packer: StatePacker, merged: torch.Tensor) -> State:
        """The state it trains from: its shared state (its own, else the merged one) and its local entries."""
        state = packer.unpack(self.shared if self.shared is not None else merged)
        state.update(self.local)
        return state

    def load_start(self, module: torch.nn.Module, packer: StatePacker, merged: torch.Tensor) -> None:
        module.load_state_dict(self.start(packer, merged), strict=True)

    def load_deployed(self, module: torch.nn.Module, packer: StatePacker, merged: torch.Tensor) -> None:
        """Load the model it deploys: its personal model if it has one, else the one it trains."""
        if self.personal is not None:
            module.load_state_dict(self.personal, strict=True)
        else:
            self.load_start(module, packer, merged)

    def portable(self, packer: StatePacker) -> dict:
        return {"local": _cpu(self.local),
                "shared": None if self.shared is None else packer.unpack(self.shared.cpu()),
                "personal": None if self.personal is None else _cpu(self.personal)}

    @classmethod
    def restore(cls, saved: dict, packer: StatePacker, device) -> TraineeState:
        return cls(saved["local"], None if saved["shared"] is None else packer.pack(saved["shared"], device),
                   saved["personal"])


#: how a run picks the round it deploys (``federation.deploy_round``)
DeployRound = Literal["best_auc", "best_loss", "last"]
DEPLOY_ROUNDS = {
    "best_auc": "the validated round of best mean node validation AUC",
    "best_loss": "the validated round of least summed validation loss (every node's binary cross-entropy, "
                 "summed over its validation images, summed over nodes)",
    "last": "the last round run (a fixed number of rounds, the convention of FL-bench and FLamby)",
}


def check_deploy_round(rule: str) -> None:
    """Raise HSLError unless ``rule`` is one of the deployed-round rules (``DEPLOY_ROUNDS``)."""
    if rule not in DEPLOY_ROUNDS:
        raise HSLError(f"federation.deploy_round must be one of {', '.join(DEPLOY_ROUNDS)}, got {rule!r}: "
                       + "; ".join(f"{k}: {v}" for k, v in DEPLOY_ROUNDS.items()) + ".")


def round_score(rule: str, metrics: list[dict], mean_auc: float, r: int) -> float:
    """How good validated round ``r`` (0-based) is under ``rule``; higher is better, and a round
    deploys when it scores above every earlier one (so ``last`` deploys every round it reaches,
    and early stopping, which counts rounds since the deployed one, never ends a ``last`` run).
    ``metrics``: every node's validation metrics (:func:`~.evaluation.validation_metrics`);
    ``mean_auc``: their mean AUC. Undefined values score -inf, so any defined round beats them."""
    check_deploy_round(rule)
    if rule == "last":
        return float(r)
    if rule == "best_loss":
        loss = sum(m["loss"] for m in metrics)
        return -loss if math.isfinite(loss) else -math.inf
    return mean_auc if not math.isnan(mean_auc) else -math.inf


@dataclass
class BestRound:
    """The validated round that deploys so far, by the run's ``deploy_round`` rule (``score``:
    :func:`round_score`; ``round`` -1: none validated yet)."""

    score: float = -math.inf
    round: int = -1  # 0-based
    merged: torch.Tensor | None = None
    trainees: dict[int, TraineeState] = field(default_factory=dict)

    def portable(self, packer: StatePacker) -> dict:
        return {"global": packer.unpack(self.merged.cpu()),
                "hosted": {t: trainee.portable(packer) for t, trainee in self.trainees.items()}}


@dataclass
class RankState:
    """Everything a rank carries from one round to the next."""

    merged: torch.Tensor  # the federation's merged shared state, packed: what trainees receive
    trainees: dict[int, TraineeState]  # the trainees this rank hosts
    best: BestRound = field(default_factory=BestRound)
    history: list[dict] = field(default_factory=list)  # one row of metrics per round
    rounds_done: int = 0

    @classmethod
    def fresh(cls, template: State, packer: StatePacker, local_keys: list[str], mine: list[int], device) -> RankState:
        """Round 0: every trainee holds the template's weights (the local parts shared until replaced)."""
        local = {k: template[k] for k in local_keys}
        return cls(packer.pack(template, device), {t: TraineeState(dict(local)) for t in mine})

    def record_best(self, r: int, score: float) -> None:
        self.best = BestRound(score, r, self.merged.clone(), {t: s.clone() for t, s in self.trainees.items()})

    def portable(self, packer: StatePacker, r: int, fingerprint: dict, strategy_state: dict) -> dict:
        """The checkpoint after round ``r`` (0-based) of this rank."""
        best = self.best
        return {"round": r + 1, "fingerprint": fingerprint, "global": packer.unpack(self.merged.cpu()),
                "hosted": {t: s.portable(packer) for t, s in self.trainees.items()}, "strategy": strategy_state,
                "history": self.history, "best_score": best.score, "best_round": best.round,
                # the best round's states, unless they are this round's (or no round was validated yet)
                "best": None if best.round in (r, -1) else best.portable(packer)}

    @classmethod
    def restore(cls, saved: dict, packer: StatePacker, device) -> RankState:
        """The state a checkpoint (:meth:`portable`) holds."""
        state = cls(packer.pack(saved["global"], device),
                    {t: TraineeState.restore(s, packer, device) for t, s in saved["hosted"].items()},
                    history=saved["history"], rounds_done=saved["round"])
        if saved["best"] is not None:
            best = saved["best"]
            state.best = BestRound(saved["best_score"], saved["best_round"], packer.pack(best["global"], device),
                                   {t: TraineeState.restore(s, packer, device) for t, s in best["hosted"].items()})
        elif saved["best_round"] >= 0:  # the best round is the checkpointed one
            state.record_best(saved["best_round"], saved["best_score"])
        return state

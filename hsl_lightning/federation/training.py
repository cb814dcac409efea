"""Local training of a round: each hosted trainee's epochs on its own data.

A round's training is a *round trainer* with one method, ``train_round(r, state, bar)``, which
yields ``(trainee, outcome)`` for every trainee this rank hosts, in order, where the outcome is an
:class:`Outcome` or the exception that stopped the trainee. The round loop adds each outcome to
the round's message before asking for the next, so a trainee's state may be a view of the module
it trained in. Two implementations:

- :class:`OneByOne` (here): one trainee after another, each loaded into the same module and
  trained through the LightningModule's ``training_step``, with the strategy's local hooks;
- :class:`~hsl_lightning.federation.fused_training.FusedRounds` (``fuse_institutions``): a rank's
  trainees trained as one vmapped model.

Every trainee's randomness (sampling, augmentation, dropout) is seeded from (seed, round, trainee),
never from the rank, and every round starts a fresh optimizer, as FedAvg clients do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from hsl_lightning.data.sampling import prepare_batch
from hsl_lightning.errors import HSLError
from hsl_lightning.federation.evaluation import local_val_auc
from hsl_lightning.federation.randomness import adopt, seed_trainee
from hsl_lightning.federation.state import RankState, State, clone_state


def seed_of(*parts: int) -> int:
    """A seed from (seed, round, trainee[, pass]), the same on every rank."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**31 - 1)
    return value


def optimizer_of(configured) -> torch.optim.Optimizer:
    """The optimizer out of whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        return optimizer_of(configured[0])
    raise HSLError("configure_optimizers must return an optimizer (or a dict / list holding one) for federated "
                   "training.")


def loss_value(out) -> torch.Tensor:
    """The loss out of whatever ``training_step`` returned (a tensor, or a dict holding ``loss``)."""
    return out["loss"] if isinstance(out, dict) else out


def diverged(label: str, r: int, epoch: int, loss: float) -> HSLError:
    """The HSLError for a node whose mean training loss is not finite."""
    return HSLError(f"Training diverged at node {label}, round {r + 1}, epoch {epoch + 1}: mean loss is {loss}. "
                    "Lower the learning rate (model.lr) or check the node's data for NaN/inf pixels.")


@dataclass
class Outcome:
    """What one trainee's local training of a round produced."""

    state: State  # what it contributes: its best or last epoch's state (valid until the next trainee trains)
    loss: float  # its last epoch's mean training loss
    extra: torch.Tensor | None = None  # a strategy vector summed over trainees (Strategy.end_local)
    personal: State | None = None  # its own model after the personal pass (personal-model strategies)


class OneByOne:
    """Trains this rank's trainees one after another in the rank's module."""

    def __init__(self, federation, run):
        self.federation, self.run, self.strategy = federation, run, run.strategy

    def train_round(self, r: int, state: RankState, bar) -> Iterator[tuple[int, Outcome | Exception]]:
        for t in self.run.mine:
            yield t, self.train_trainee(r, t, state, bar)

    def close(self) -> None:
        """Nothing is kept across rounds."""

    def train_trainee(self, r: int, t: int, state: RankState, bar, loader=None, module=None) -> Outcome | Exception:
        """Trainee ``t``'s round, from what it received (``loader``: its round's training loader, when
        already built and not yet iterated; ``module``: the module to train in, default the rank's).
        A failure is returned, after the strategy undid its set-up."""
        run, strategy = self.run, self.strategy
        module = run.module if module is None else module
        trainee = state.trainees[t]
        trainee.load_start(module, run.packer, state.merged)
        received = clone_state(module.state_dict()) if strategy.personal_model else None
        bar.set_postfix_str(f"round {r + 1}/{self.federation.rounds} {run.label(t)}")
        try:
            contributed, loss, extra = self.train_local(r, t, loader=loader, module=module)
            if received is None:
                return Outcome(contributed, loss, extra)
            contributed = clone_state(contributed)  # the personal pass reuses the module
            # then the trainee's own model, anchored at what it received
            module.load_state_dict(trainee.personal or received)
            strategy.begin_personal(module, t, received)
            personal, _, _ = self.train_local(r, t, personal=True, module=module)
            strategy.end_personal(module, t)
            return Outcome(contributed, loss, extra, clone_state(personal))
        except Exception as exc:  # noqa: BLE001 - any failure of one trainee's training is reported by the loop
            strategy.abort_local(module, t)
            return exc

    def train_local(self, r: int, t: int, personal: bool = False, loader=None,
                    module=None) -> tuple[State, float, torch.Tensor | None]:
        """``local_epochs`` of trainee ``t`` in the module: (the state it contributes, its last epoch's
        mean loss, its strategy vector). ``personal``: the pass over its own model, which contributes
        nothing to the merge and runs no local hooks."""
        fed, run, strategy = self.federation, self.run, self.strategy
        module = run.module if module is None else module
        seed = seed_of(fed.seed, r, t, 1) if personal else seed_of(fed.seed, r, t)
        seed_trainee(seed)
        if loader is None:
            loader = run.dm.train_loader(run.plan[t], seed, with_sat=getattr(module, "uses_sat", False),
                                         **strategy.loader_options())
        adopt(loader)
        optimizer = optimizer_of(module.configure_optimizers())
        if not personal:
            strategy.begin_local(module, t)
        select_best = fed.contribute == "best" and fed.local_epochs > 1 and not personal
        best_state, best_auc, epoch_loss, total_steps = None, -math.inf, math.nan, 0
        for epoch in range(fed.local_epochs):
            strategy.begin_epoch(module, epoch, fed.local_epochs)
            epoch_loss, steps = self._epoch(module, loader, optimizer)
            total_steps += steps
            if not math.isfinite(epoch_loss):
                raise diverged(run.label(t), r, epoch, epoch_loss)
            if select_best:
                auc = local_val_auc(run.fabric, module, run.dm, run.plan[t])
                if best_state is None or auc > best_auc:
                    best_auc, best_state = auc, clone_state(module.state_dict())
        extra = None if personal else strategy.end_local(module, t, total_steps, optimizer)
        return (best_state if best_state is not None else module.state_dict()), epoch_loss, extra

    def _epoch(self, module, loader, optimizer) -> tuple[float, int]:
        """One pass of ``module`` over ``loader``: (mean loss, optimizer steps)."""
        fabric, strategy = self.run.fabric, self.strategy
        module.train()
        loss_sum = torch.zeros((), device=fabric.device)
        steps = 0
        for i, batch in enumerate(loader):
            batch = prepare_batch(fabric.to_device(batch))  # augmented on the device
            with fabric.autocast():
                loss = loss_value(module.training_step(batch, i))
                term = strategy.local_loss(module, batch)  # e.g. FedProx's proximal term
                if term is not None:
                    loss = loss + term
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            strategy.after_backward(module)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        return float(loss_sum) / max(1, steps), steps

"""The fused round trainer (``fuse_institutions``): a rank's trainees trained as one vmapped model.

Trainees whose batches have the same shape form a group, trained in lockstep by a
:class:`~hsl_lightning.federation.fused.FusedTrainer` that is kept from round to round (and, with
``cuda_graphs``, replays one captured CUDA graph per step). A trainee alone in its group, or
without a batch, trains one by one. Outcomes are yielded in the order of the rank's trainees,
as :class:`~hsl_lightning.federation.training.OneByOne` yields them, so the merge adds them in
the same order.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator

import torch

from hsl_lightning.data.sampling import prepare_batch
from hsl_lightning.errors import HSLError
from hsl_lightning.federation.evaluation import local_val_auc
from hsl_lightning.federation.fused import FusedModels, FusedTrainer, check_resettable
from hsl_lightning.federation.state import RankState
from hsl_lightning.federation.training import OneByOne, Outcome, diverged, loss_value, optimizer_of, seed_of


def graph_autocast(precision: str):
    """The autocast context of a captured step: Fabric's, but without autocast's weight cache,
    whose casts would not be redone when the graph is replayed."""
    precision = str(precision)
    if precision in ("32-true", "32", "64-true", "64"):
        return contextlib.nullcontext
    if precision in ("bf16-mixed", "bf16"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    raise HSLError(f"cuda_graphs supports precision 32-true and bf16-mixed, not {precision}; change "
                   "federation.precision or set federation.cuda_graphs to false.")


def check_fused_setup(federation, fabric, module) -> None:
    """Refuse, with what to change, an optimizer or device the fused path cannot train."""
    optimizer = optimizer_of(module.configure_optimizers())
    try:
        FusedModels.check_optimizer(optimizer)
    except ValueError as exc:
        raise HSLError(f"fuse_institutions: {exc} Configure one of those, or set federation.fuse_institutions "
                       "to false.") from exc
    if not federation.cuda_graphs:
        return
    if fabric.device.type != "cuda":
        raise HSLError(f"cuda_graphs needs a CUDA device; this rank runs on {fabric.device.type}. Set "
                       "federation.accelerator to gpu, or federation.cuda_graphs to false.")
    graph_autocast(federation.precision)  # refuses precisions a graph cannot hold
    try:
        check_resettable(optimizer)
    except ValueError as exc:
        raise HSLError(f"cuda_graphs: {exc} Or set federation.cuda_graphs to false.") from exc


def stacked_batch(fabric, batches: list[dict]) -> dict:
    """The trainees' batches stacked along a new dimension 0 on the CPU, moved in one copy per key
    (from pinned memory on a GPU, so the copy overlaps the previous step), then augmented on the
    device, image by image as a lone trainee's would be."""
    n = len(batches)
    stacked = {key: torch.stack([b[key] for b in batches]) for key in batches[0]}
    if fabric.device.type == "cuda":
        stacked = {k: v.pin_memory().to(fabric.device, non_blocking=True) for k, v in stacked.items()}
    else:
        stacked = fabric.to_device(stacked)
    flat = prepare_batch({k: v.flatten(0, 1) for k, v in stacked.items()})
    return {k: v.unflatten(0, (n, -1)) for k, v in flat.items()}


class FusedRounds:
    """Trains this rank's trainees fused where their batches stack, the rest one by one."""

    def __init__(self, federation, run):
        check_fused_setup(federation, run.fabric, run.module)
        self.federation, self.run = federation, run
        self.lone = OneByOne(federation, run)
        self.trainers: dict[tuple, FusedTrainer] = {}  # per (rows, group): kept across rounds

    def close(self) -> None:
        self.trainers = {}  # the groups' stacked models and graphs are not needed past training

    def train_round(self, r: int, state: RankState, bar) -> Iterator[tuple[int, Outcome | Exception]]:
        fused, spare = self._train_groups(r, state, bar)
        for t in self.run.mine:
            if t in fused:
                if isinstance(fused[t], Exception):
                    self.run.strategy.abort_local(self.run.module, t)
                yield t, fused.pop(t)
            else:
                yield t, self.lone.train_trainee(r, t, state, bar, loader=spare.pop(t, None))

    def _train_groups(self, r: int, state: RankState, bar) -> tuple[dict, dict]:
        """Every group of two or more equally shaped trainees, trained as one. Returns {trainee:
        Outcome or the exception that stopped it}, and the loaders of the trainees left out."""
        run, fed = self.run, self.federation
        with_sat = getattr(run.module, "uses_sat", False)
        options = run.strategy.loader_options()
        loaders = {t: run.dm.train_loader(run.plan[t], seed_of(fed.seed, r, t), with_sat=with_sat, **options)
                   for t in run.mine}
        groups: dict[int, list[int]] = {}
        for t, loader in loaders.items():  # images per batch: the batch size, or the whole epoch if shorter
            if len(loader):
                groups.setdefault(min(len(loader.sampler), loader.batch_size), []).append(t)
        out = {}
        for rows, group in groups.items():
            if len(group) < 2:
                continue
            bar.set_postfix_str(f"round {r + 1}/{fed.rounds} {len(group)} nodes fused")
            try:
                trainer = self._trainer(rows, group, [state.trainees[t].start(run.packer, state.merged) for t in group])
                out.update(self._train_group(r, group, [loaders[t] for t in group], trainer))
            except Exception as exc:  # noqa: BLE001 - reported per trainee by the round loop
                out.update({t: exc for t in group})
        return out, {t: loader for t, loader in loaders.items() if t not in out}

    def _trainer(self, rows: int, group: list[int], starts: list[dict]) -> FusedTrainer:
        """The group's trainer from earlier rounds, loaded with ``starts``; or a new one."""
        fed, module, fabric = self.federation, self.run.module, self.run.fabric
        key = (rows, tuple(group))
        trainer = self.trainers.get(key)
        if trainer is not None:
            trainer.load(module, starts)
            return trainer
        self.trainers[key] = trainer = FusedTrainer(
            module, starts, optimizer_of(module.configure_optimizers()),
            lambda m, b: loss_value(m.training_step(b, 0)), cuda_graph=fed.cuda_graphs,
            autocast=graph_autocast(fed.precision) if fed.cuda_graphs else fabric.autocast, backward=fabric.backward)
        return trainer

    def _train_group(self, r: int, group: list[int], loaders: list, trainer: FusedTrainer) -> dict:
        """One round of local training of ``group`` as one model, in lockstep.

        Trainee j takes exactly its own steps (its ``local_epochs`` epochs back to back, each as long
        as its loader). Once it has taken them its slice idles: it reruns its last batch with its loss
        masked out until the longest trainee is done. Its result is taken at its own last step, so
        the idle steps never reach it; and since every trainee starts at step 0, the optimizer's step
        count (one per parameter, shared by the slices) is right for each while it is active."""
        fabric, epochs = self.run.fabric, self.federation.local_epochs
        torch.manual_seed(seed_of(self.federation.seed, r, group[0]))  # dropout: one draw for the whole group
        lockstep = _Lockstep(loaders, epochs, fabric.device)
        trainer.fused.train()
        last: list = [None] * len(group)
        for k in range(lockstep.steps):
            for j in lockstep.active(k):
                last[j] = next(lockstep.batches[j])
            losses = trainer.step(stacked_batch(fabric, last), lockstep.mask)
            for j, epoch, mean in lockstep.record(k, losses):  # trainee j finished an epoch with this step
                self._epoch_ended(r, group, trainer, lockstep, j, epoch, mean, k)
        return dict(zip(group, lockstep.result))

    def _epoch_ended(self, r, group, trainer, lockstep, j, epoch, mean, k) -> None:
        """Keep trainee j's state when this epoch is its contribution (its last, or its best so far)."""
        run, epochs = self.run, self.federation.local_epochs
        if not math.isfinite(mean):  # the others train on: the slices are independent
            lockstep.stop(j, k, diverged(run.label(group[j]), r, epoch, mean))
            return
        select_best = self.federation.contribute == "best" and epochs > 1
        finished = epoch == epochs - 1
        if not (select_best or finished):
            return
        # a copy, unless nothing will change the slice before the round loop reads it
        state = trainer.fused.state_dicts([j], copy=select_best or k + 1 < lockstep.steps)[0]
        if not select_best:
            lockstep.result[j] = Outcome(state, mean)
            return
        run.module.load_state_dict(state)
        auc = local_val_auc(run.fabric, run.module, run.dm, run.plan[group[j]])
        if epoch == 0 or auc > lockstep.best_aucs[j]:
            lockstep.best_aucs[j], lockstep.result[j] = auc, Outcome(state, mean)
        elif finished:
            lockstep.result[j] = Outcome(lockstep.result[j].state, mean)  # the best epoch's state, the last loss


class _Lockstep:
    """The bookkeeping of trainees stepping together: which are active, their epochs' running losses,
    and each one's result (an Outcome, or the exception that stopped it)."""

    def __init__(self, loaders: list, epochs: int, device):
        n = len(loaders)
        self.per_epoch = [len(loader) for loader in loaders]
        self.total = [s * epochs for s in self.per_epoch]  # becomes the step a trainee stopped at if it diverges
        self.steps = max(self.total)
        self.batches = [itertools.chain.from_iterable(itertools.repeat(loader, epochs)) for loader in loaders]
        self.loss_sum = torch.zeros(n, device=device)  # each trainee's current epoch, reset when it ends
        self.best_aucs = [-math.inf] * n
        self.result: list = [None] * n
        self.device, self.mask, self._was_active = device, None, None

    def active(self, k: int) -> list[int]:
        """The trainees that take step k; updates the loss mask (idle slices get no gradient)."""
        active = [k < total for total in self.total]
        if active != self._was_active:
            self.mask, self._was_active = torch.tensor(active, device=self.device), active
        return [j for j, a in enumerate(active) if a]

    def record(self, k: int, losses: torch.Tensor) -> list[tuple[int, int, float]]:
        """Add step k's losses; (trainee, epoch, mean loss) for each trainee whose epoch ended with it."""
        self.loss_sum += torch.where(self.mask, losses.float(), 0.0)
        ended = []
        for j, active in enumerate(self._was_active):
            if active and (k + 1) % self.per_epoch[j] == 0:
                ended.append((j, (k + 1) // self.per_epoch[j] - 1, float(self.loss_sum[j]) / self.per_epoch[j]))
                self.loss_sum[j] = 0.0
        return ended

    def stop(self, j: int, k: int, error: Exception) -> None:
        self.result[j], self.total[j] = error, k + 1

"""The round loop's phases behind one small interface: how a federation reaches its trainees.

:meth:`Federation.run_rounds <hsl_lightning.federation.Federation.run_rounds>` owns the loop
(merge, quorum, strategy state, validation judgement, early stopping, history, checkpoints) and
asks a :class:`RoundPhases` for the four things that depend on where the trainees are:

=================  ==============================================  ===================================
phase              the simulator (:class:`RankPhases`)             a deployment (``SitePhases``)
=================  ==============================================  ===================================
``start``          choose how this rank trains; the reporter      ask each site for its data report
``train_and_sum``  train the rank's trainees; one all-reduce      send the merged state; add the replies
``validate``       score every node; gather over ranks            the sites' aggregate metrics
``finish``         test the deployed round; gather                the sites' test scores
=================  ==============================================  ===================================

The simulator's phases are here; a deployment's are
:class:`hsl_lightning.flower.server.SitePhases`, which reaches its sites through a
:class:`~hsl_lightning.flower.server.Sites` transport (in process, or Flower's).
"""

from __future__ import annotations

import math

import torch

from hsl_lightning.federation.concurrent import Concurrent
from hsl_lightning.federation.evaluation import (evaluate_trainees, external_result, gather, threshold_counts,
                                                 validate_trainees)
from hsl_lightning.federation.fused_training import FusedRounds
from hsl_lightning.federation.message import RoundMessage
from hsl_lightning.federation.reporting import Reporter
from hsl_lightning.federation.training import OneByOne


class RoundPhases:
    """The interface: what the round loop needs from wherever its trainees train.

    ``trains_here``: whether this process trains trainees (it then gets the rank's worker threads).
    Rounds ``r`` are 0-based here, as in the loop (the progress lines say ``r + 1``).
    """

    trains_here = True

    def start(self, run, state) -> Reporter:
        """Before the first round (of this process: also after a resume): the run's reporter."""
        raise NotImplementedError

    def statistics(self, run, rules) -> list[dict]:
        """Every node's site statistics (:mod:`hsl_lightning.data.statistics`), computed where its images are."""
        raise NotImplementedError

    def train_and_sum(self, run, state, merge, report, r: int) -> tuple[RoundMessage, torch.Tensor]:
        """Round r's training, summed over every trainee: (the round's message, every node's training loss)."""
        raise NotImplementedError

    def update_norms(self, run, merge) -> torch.Tensor:
        """Every node's update norm before DP clipping this round (NaN where none), for the logs."""
        raise NotImplementedError

    def validate(self, run, state, r: int) -> list[dict]:
        """Every node's validation metrics of the merged state after round r (NaN for nodes not scored)."""
        raise NotImplementedError

    def losses(self, run, losses: torch.Tensor) -> torch.Tensor:
        """Every node's training loss, as the loop records it (the simulator gathers them over ranks)."""
        return losses

    def finish(self, run, module, state, report) -> tuple[list[dict], list[dict], torch.Tensor]:
        """The deployed round's (test metrics per node, external site results, threshold counts per node)."""
        raise NotImplementedError

    def close(self) -> None:
        """After the last round, also when the loop fails."""


class RankPhases(RoundPhases):
    """The simulator's phases: the trainees this Fabric rank hosts, one all-reduce per round."""

    def __init__(self, federation):
        self.federation = federation
        self.trainer = None

    def start(self, run, state) -> Reporter:
        federation = self.federation
        if federation.fuse_institutions:
            self.trainer = FusedRounds(federation, run)
        elif run.workers is not None:
            self.trainer = Concurrent(federation, run, run.workers)
        else:
            self.trainer = OneByOne(federation, run)
        return Reporter(federation, run, state)

    def statistics(self, run, rules):
        from hsl_lightning.data.statistics import node_statistics, salt

        key = salt(rules.salt_file)
        hosted = sorted({i for t in run.mine for i in run.plan[t]})
        mine = {i: node_statistics(run.dm, i, rules, key) for i in hosted}
        if run.fabric.world_size > 1:  # each rank holds its own nodes' images: gather the rows
            import torch.distributed as dist

            every = [None] * run.fabric.world_size
            dist.all_gather_object(every, mine)
            mine = {i: row for part in every for i, row in part.items()}
        return [mine[i] for i in range(len(run.names))]

    def train_and_sum(self, run, state, merge, report, r):
        fed = self.federation
        message = RoundMessage(run.layout, run.fabric.device)
        losses = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        for t, outcome in self.trainer.train_round(r, state, report.bar):
            fed.add_contribution(run, state, message, merge, t, outcome, losses, r)
            report.bar.update(1)
        message.traffic.fill_(fed.strategy.traffic(run.module))
        if run.secure and message.fixed is None:  # a rank whose trainees all failed still takes part in the sum
            message.add_fixed(torch.zeros(run.layout.size, dtype=torch.int64, device=message.vector.device))
        return message.all_reduce(run.fabric, r + 1), losses

    def update_norms(self, run, merge):
        norms = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        for t, norm in merge.norms.items():
            norms[list(run.plan[t])] = norm
        return gather(run.fabric, norms.unsqueeze(1), run.owner)[:, 0]

    def validate(self, run, state, r):
        return validate_trainees(run, state.trainees, state.merged)

    def losses(self, run, losses):
        return gather(run.fabric, losses.unsqueeze(1), run.owner)[:, 0]

    def finish(self, run, module, state, report):
        best = state.best
        test = evaluate_trainees(run, best.trainees, best.merged, "test")
        external = external_result(run, best.trainees, best.merged)
        thresholds = threshold_counts(run, best.trainees, best.merged)
        if run.fabric.world_size == 1:  # leave the user's module holding the deployed model of the first trainee
            best.trainees[run.mine[0]].load_deployed(module, run.packer, best.merged)
        return test, external, thresholds

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None

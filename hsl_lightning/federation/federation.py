"""The Federation: institutions trained round by round, simulated on Fabric ranks or deployed at sites.

The round loop (:meth:`Federation.run_rounds`), each phase with the module that holds it; the four
that depend on where the trainees are (marked *) come from a :class:`~.phases.RoundPhases`: the
simulator's :class:`~.phases.RankPhases`, or a deployment's sites (:mod:`hsl_lightning.flower.server`)::

    set up the rank: data, plan of trainees, packing          rank.py (RankRun), sync.py (StatePacker)
    start fresh, or from a checkpoint                          state.py (RankState), checkpoint.py
    for round in rounds:
      * train this rank's trainees: one by one, at the same    training.py (OneByOne), concurrent.py,
          time in threads, or fused                            fused_training.py
        add each contribution to the round's message           message.py (RoundMessage), merge.py
        one all-reduce of the message over ranks               message.py, sync.py
        merge: mean, personal or server-side (the strategy's)  merge.py
      * validate every node's deployed model; keep the best   evaluation.py, state.py (BestRound)
        record the round's row; checkpoint                     reporting.py (Reporter), checkpoint.py
    * test every node with the deployed round; weights, summary.json, table

Institutions are not processes: W ranks host N institutions (institution t lives on rank
t % W), so the same configuration runs on one CPU process, several processes or several GPUs,
and gives the same result. Every institution's randomness (sampling, augmentation, dropout) is
seeded from (seed, round, institution), never from the rank.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric import Fabric

from hsl_lightning.data.statistics import SiteStatistics
from hsl_lightning.errors import HSLError
from hsl_lightning.federation import checkpoint, fixedpoint
from hsl_lightning.federation.concurrent import Workers
from hsl_lightning.federation.launch import fabric_strategy, leave_process_group_at_exit, machines_of
from hsl_lightning.federation.loggers import WandbMode
from hsl_lightning.federation.message import RoundMessage
from hsl_lightning.federation.phases import RankPhases, RoundPhases
from hsl_lightning.federation.privacy import (DifferentialPrivacy, PrivateMean, check_secure_aggregation,
                                              check_supported)
from hsl_lightning.federation.rank import RankRun
from hsl_lightning.federation.reporting import format_table
from hsl_lightning.federation.state import DeployRound, RankState, check_deploy_round, clone_state, round_score
from hsl_lightning.federation.strategies import STRATEGIES, Contribution, Strategy, get_strategy
from hsl_lightning.federation.sync import StatePacker
from hsl_lightning.federation.training import Outcome, seed_of
from hsl_lightning.metrics import summarize

__all__ = ["Federation", "format_table"]


@dataclass
class Validation:
    """One validated round: every node's metrics, their summary, and whether it is the best so far."""

    metrics: list[dict]
    stats: dict
    improved: bool


class Federation:
    """Trains one LightningModule per simulated institution and merges them with a strategy.

    Args:
        strategy: how institutions share (``hsl``, ``fedavg``, ``fedprox``, ``local``, ...; ``hsl strategies`` lists them).
        strategy_options: keyword arguments of the strategy, e.g. ``{"mu": 0.1}`` for fedprox.
        rounds: synchronisation rounds.
        local_epochs: local epochs per round at each institution.
        contribute: ``best`` (epoch of best local validation AUC within the round) or ``last``;
            default: the strategy's (``best`` for hsl, ``last`` otherwise).
        accelerator: as for Lightning Fabric (``cpu``, ``gpu``, ``auto``).
        devices: ranks per machine, as for Fabric; ``devices`` x ``machines`` ranks host the nodes.
        machines: computers the ranks run on (Lightning Fabric's ``num_nodes``; not hospitals: those
            are the nodes of ``data.scenario.num_nodes``).
        precision: as for Lightning Fabric (``32-true``, ``bf16-mixed``, ...).
        run_dir: where the run writes summary.json, config.yaml, metrics and weights
            (default ``runs/<time>-<strategy>``).
        wandb: ``auto`` (online when logged in, else offline), ``online``, ``offline`` or ``disabled``.
        wandb_project: W&B project name.
        progress: show a progress bar over rounds and institutions.
        min_nodes: what to do when a node's local training fails (an exception, or a non-finite
            loss): None (default) stops the run with a message naming the node, the round and the
            cause; a number drops the failing node from that round (it keeps what it received, and
            the failure is logged) as long as at least that many nodes finished the round.
        save_weights: write the deployed models at the end as Lightning checkpoints: ``model.ckpt``
            when every node deploys the same model, else ``nodes/<name>.ckpt`` per node
            (:mod:`hsl_lightning.inference.checkpoints`).
        checkpoint: write a checkpoint after every round (``<run_dir>/checkpoints``; the newest
            complete round is kept), so ``fit(..., ckpt_path="last")`` continues a killed run.
        val_every_n_rounds: validate every node after every n-th round and after the last; the
            deployed round is the validated round of best mean validation AUC. Validation costs
            about 5 % of a small FedAvg run (benchmarks/overhead.py); raise n to skip most of it.
        privacy: node-level differential privacy of the shared model, DP-FedAvg
            (:class:`~hsl_lightning.federation.privacy.DifferentialPrivacy`: ``clip``,
            ``noise_multiplier``, ``delta``, ``accountant``): every node's update is clipped, the
            round's sum carries Gaussian noise, every node weighs 1, and epsilon (Opacus's
            accountant) is logged every round and written to ``summary.json``. For strategies whose
            message is the nodes' model state, merged by a mean.
        patience: early stopping: end the run once this many rounds have passed since the round of
            best mean node validation AUC (None, the default: run every round). The deployed round
            is the best one either way; ``summary.json`` records the patience and the rounds run.
        deploy_round: which validated round the run deploys: ``best_auc`` (default: best mean node
            validation AUC), ``best_loss`` (least validation loss summed over every node's images) or
            ``last`` (the last round: a fixed number of rounds; early stopping then never ends the
            run). Patience counts rounds since the round the rule deploys. ``summary.json`` records it.
        seed: seeds training (sampling, augmentation, dropout); set from ``seed_everything`` by the CLI.
        threads: CPU threads per rank (default: torch's choice, divided among local ranks).
        concurrent_institutions: on a CPU rank, how many of its institutions train at the same time,
            each in its own thread with its own copy of the module and ``threads // k`` intra-op
            threads (:mod:`~hsl_lightning.federation.concurrent`); validation and testing too. None
            (default): as many as the rank's threads and institutions allow, for strategies that can
            (:meth:`Strategy.concurrent`: no local-training hooks), else 1; 1: one after another on
            all the rank's threads. The result equals training one after another with the same
            threads per institution, which also makes the default's result the same on 1 rank and
            on 2 whenever every institution gets one thread (institutions >= cores).
        fuse_institutions: train the institutions a rank hosts as one model under ``torch.vmap``
            (:class:`~hsl_lightning.federation.fused.FusedModels`: each kernel launch serves all of
            them) instead of one after another. Meant for GPUs, which small models leave idle
            between launches; on CPUs it is mostly slower (a ResNet-10t classifier at 28 px trains at
            0.71x, ``benchmarks/gpu.py --device cpu``). Institutions whose batches have the same
            shape are fused (in practice all of a rank's); one with fewer steps idles, rerunning its
            last batch with its loss masked, until the longest is done, so very unequal sizes spend
            compute on idle slices. Each takes exactly its own steps, equal to separate training up
            to float rounding, but dropout masks are drawn for the group at once, so with dropout a
            run differs from an unfused one (and depends on the ranks' grouping).
            Needs a strategy without local-training hooks (``Strategy.fusable``: hsl, fedavg, swarm,
            personalized, fedbn, fedper, splitavg, fedcome, foundation, local, central) and an
            elementwise torch optimizer.
            ``training_step`` runs once for the group (under vmap) with ``batch_idx`` 0.
        cuda_graphs: with ``fuse_institutions`` on a CUDA device, capture each fused group's
            training step (forward, backward, optimizer) in one CUDA graph on its first batch and
            replay it for every later step and round (new weights and a fresh optimizer state are
            written into the captured tensors in place), so the CPU launches one graph per step
            instead of hundreds of kernels. Needs precision ``32-true`` or ``bf16-mixed`` (both ran
            on an H200, ``benchmarks/gpu_federation.py``) and an optimizer whose state can be reset
            in place (SGD without dampening, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad);
            if capture fails, a warning says why and the group trains without a graph. Results
            equal the eager fused path up to float rounding.
        secure_aggregation: the round's message as fixed-point integers modulo 2^64, so that a deployed
            coordinator can be given only the sum of the sites' masked contributions
            (:mod:`hsl_lightning.flower.secagg`); the simulator sums the same integers, so a deployment
            still gives its numbers bit for bit. None (default): on for strategies whose merge is a
            weighted sum of the contributions (hsl, fedavg, swarm, fedprox, moon, fedbn's shared part,
            DP runs), off for the others; true: on, refusing the others; false: off. DP-FedAvg
            (``privacy``) needs it on: each site adds only its share of the noise.
        statistics: site statistics before round 1 (:class:`~hsl_lightning.data.statistics.SiteStatistics`).
        num_nodes: the old, deprecated name of ``machines`` (it warns; given beside a ``machines``
            other than 1 and its own value, an error).
    """

    def __init__(
        self,
        strategy: str = "hsl",
        strategy_options: dict | None = None,
        rounds: int = 5,
        local_epochs: int = 1,
        contribute: Contribution | None = None,
        accelerator: str = "cpu",
        devices: int = 1,
        machines: int = 1,
        precision: str = "32-true",
        run_dir: str | None = None,
        wandb: WandbMode = "auto",
        wandb_project: str = "hsl_lightning",
        progress: bool = True,
        min_nodes: int | None = None,
        save_weights: bool = True,
        checkpoint: bool = True,
        val_every_n_rounds: int = 1,
        patience: int | None = None,
        deploy_round: DeployRound = "best_auc",
        privacy: DifferentialPrivacy | None = None,
        seed: int = 0,
        threads: int | None = None,
        concurrent_institutions: int | None = None,
        fuse_institutions: bool = False,
        cuda_graphs: bool = False,
        secure_aggregation: bool | None = None,
        statistics: SiteStatistics | None = None,
        num_nodes: int | None = None,
    ):
        machines = machines_of(machines, num_nodes)
        if rounds < 1 or local_epochs < 1:
            raise HSLError(f"rounds and local_epochs must be at least 1, got {rounds} and {local_epochs}.")
        self.strategy: Strategy = get_strategy(strategy, strategy_options)
        self.rounds, self.local_epochs = rounds, local_epochs
        self.contribute = contribute or self.strategy.default_contribution
        self._check_misuse(precision)
        self.accelerator, self.devices, self.machines, self.precision = accelerator, devices, machines, precision
        self.run_dir = run_dir
        self.wandb, self.wandb_project = wandb, wandb_project
        self.progress, self.checkpoint, self.seed, self.threads = progress, checkpoint, seed, threads
        self.save_weights = save_weights
        self._check_rounds_and_nodes(val_every_n_rounds, patience, privacy, min_nodes, secure_aggregation)
        self.val_every_n_rounds, self.patience, self.privacy, self.min_nodes = (val_every_n_rounds, patience, privacy,
                                                                                 min_nodes)
        check_deploy_round(deploy_round)
        self.deploy_round, self.statistics = deploy_round, statistics
        self.fuse_institutions = fuse_institutions
        if fuse_institutions:
            self._check_fusable()
        self._check_concurrent(concurrent_institutions, accelerator, fuse_institutions)
        self.concurrent_institutions = concurrent_institutions
        if cuda_graphs and not fuse_institutions:
            raise HSLError("cuda_graphs captures the fused training step: set federation.fuse_institutions to true "
                           "as well.")
        self.cuda_graphs, self.secure_aggregation = cuda_graphs, secure_aggregation
        self.run_config: dict | None = None  # the resolved CLI config, attached to loggers and saved
        self.summary: dict | None = None
        self.last_run_dir: Path | None = None  # where the last fit wrote

    # ------------------------------------------------------------------ entry point
    def fit(self, model, datamodule, ckpt_path: str | None = None) -> dict:
        """Train ``model`` (a template: each institution starts from its weights) on ``datamodule``'s nodes.

        Args:
            model: the LightningModule every institution starts from.
            datamodule: the federated data (one entry per institution).
            ckpt_path: continue a run: ``last`` (Lightning's convention) takes the newest complete
                round of federation.run_dir (from round 1 when there is none yet); or a run directory
                or a ``checkpoints/round-NNNN`` folder. Model, data, strategy and seed must be those of
                the checkpointed run; ``rounds`` may be larger.
        """
        run_dir = self.run_dir_for(ckpt_path)
        world = int(self.devices) * int(self.machines)
        launch_strategy = fabric_strategy(world)  # one process; join the ranks torchrun/srun started; or spawn
        fabric = Fabric(accelerator=self.accelerator, devices=self.devices, num_nodes=self.machines,
                        precision=self.precision, strategy=launch_strategy)
        self.summary = fabric.launch(self._run, model, datamodule, run_dir, ckpt_path)
        self.last_run_dir = run_dir
        return self.summary

    def run_dir_for(self, ckpt_path: str | None) -> Path:
        """Where this fit writes: ``federation.run_dir``, or ``runs/<time>-<strategy>``; continuing
        (``ckpt_path: last``) needs the directory named."""
        if ckpt_path == "last" and self.run_dir is None:
            raise HSLError("ckpt_path 'last' continues a run directory: set federation.run_dir to the directory of "
                           "the run to continue.")
        return Path(self.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{self.strategy.name}")

    # ------------------------------------------------------------------ one rank: the round loop
    def _run(self, fabric: Fabric, module, dm, run_dir: Path, ckpt_path: str | None = None) -> dict | None:
        summary = self.run_rounds(fabric, module, dm, run_dir, ckpt_path, RankPhases(self))
        if fabric.world_size > 1:  # in the rank's own process, spawned or started by torchrun/srun
            leave_process_group_at_exit()
        return summary

    def run_rounds(self, fabric: Fabric, module, dm, run_dir: Path, ckpt_path: str | None,
                   phases: RoundPhases) -> dict | None:
        """The round loop on this process, its trainees reached through ``phases`` (the simulator's
        :class:`~hsl_lightning.federation.phases.RankPhases`, or a deployment's sites). Returns the
        summary (None on ranks other than 0)."""
        start = time.perf_counter()
        run = self.setup_rank(fabric, module, dm, run_dir, phases.trains_here)
        try:
            return self._rounds(run, module, ckpt_path, start, phases)
        finally:
            phases.close()
            if run.workers is not None:
                run.workers.close()

    def _rounds(self, run: RankRun, module, ckpt_path: str | None, start: float, phases: RoundPhases) -> dict | None:
        state = self._start_state(run, ckpt_path)
        report = phases.start(run, state)
        if self.statistics is not None and state.rounds_done == 0:
            report.statistics(phases.statistics(run, self.statistics))
        for r in range(state.rounds_done, self.rounds):
            if self._patience_spent(state, r):
                break
            clock = time.perf_counter()
            merge = self.merge_of(run, state, r)
            total, losses = phases.train_and_sum(run, state, merge, report, r)
            self._check_quorum(int(total.finished.sum()), len(run.plan), r)
            merge.apply(total, state)
            self.strategy.after_round(total.extras if run.layout.extras else None, len(run.plan))
            norms = phases.update_norms(run, merge) if self.privacy is not None else None
            del merge
            validation = self._judge(state, phases.validate(run, state, r), r) if self.validates(r) else None
            losses = phases.losses(run, losses)
            state.history.append(report.round(r, total, validation, losses, time.perf_counter() - clock, norms))
            if self.checkpoint:
                checkpoint.save_round(run.fabric, run.run_dir, r + 1, state.portable(run.packer, r, run.fingerprint,
                                                                                     self.strategy.state_dict()))
        phases.close()  # before scoring: fused training's stacked models are not needed past training
        report.bar.close()
        test, external, thresholds = phases.finish(run, module, state, report)
        return report.finish(state, test, external, thresholds, start)

    # ------------------------------------------------------------------ what the phases share
    def validates(self, r: int) -> bool:
        """Whether round r (0-based) is validated: every ``val_every_n_rounds``-th and the last."""
        return (r + 1) % self.val_every_n_rounds == 0 or r == self.rounds - 1

    def setup_rank(self, fabric: Fabric, module, dm, run_dir: Path, trains_here: bool = True) -> RankRun:
        """The rank's threads, data, plan of trainees and packing of the shared state (``trains_here``
        false: a coordinator that trains nothing, so no worker threads)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        elif fabric.world_size > 1 and fabric.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, fabric.strategy.num_processes)))
        world, rank = fabric.world_size, fabric.global_rank
        if world > 1 and getattr(dm, "nodes", ()) is None and hasattr(dm, "host"):
            # each rank builds the images of the institutions it hosts only (trainee t lives on rank t % world)
            plan_of = self.strategy.plan
            dm.host(lambda n: {i for t, nodes in enumerate(plan_of(n)) if t % world == rank for i in nodes})
        dm.setup("fit")
        self._check(module, dm)
        self.strategy.setup(module, len(dm.node_names))
        plan = self.strategy.plan(len(dm.node_names))
        module = module.to(fabric.device)
        if getattr(module, "uses_sat", False) and hasattr(module, "set_sat_reference"):
            module.set_sat_reference(dm.sat_reference())
        entries = module.state_dict()
        packer = StatePacker(entries, self.strategy.shared_keys(module))
        shared = set(packer.keys)
        local_keys = [k for k in entries if k not in shared]
        if self.privacy is not None:
            check_supported(self.strategy, plan, packer.numel, self.strategy.extra_size(module))
            self.privacy.warn_if_insecure()
        report = dm.report()  # how each node was drawn: data.json, and part of the checkpoint fingerprint
        fingerprint = checkpoint.fingerprint(
            strategy=self.strategy.name, options=self.strategy.options(), seed=self.seed,
            local_epochs=self.local_epochs, contribute=self.contribute, nodes=dm.node_names, plan=plan,
            model=type(module).__name__, state={k: list(v.shape) for k, v in entries.items()}, data=report)
        run = RankRun(fabric, module, dm, self.strategy, run_dir, dm.node_names, plan, packer, local_keys, report,
                      fingerprint)
        run.secure = fixedpoint.resolve(self.secure_aggregation, self.strategy, len(plan), packer.numel)
        run.at_once = self.threads_each(len(run.mine), run.device.type) if trains_here else (1, torch.get_num_threads())
        if run.at_once[0] > 1:
            run.workers = Workers(module, *run.at_once)
        return run

    def threads_each(self, hosted: int, device_type: str = "cpu") -> tuple[int, int]:
        """(trainees training at the same time, intra-op threads each) on a rank that hosts ``hosted``
        trainees with ``federation.threads`` (default: torch's) threads; see ``concurrent_institutions``.
        A deployed site asks it for a rank hosting every trainee, so it trains with the simulator's arithmetic."""
        threads = self.threads or torch.get_num_threads()
        if self.concurrent_institutions is not None:
            k = max(1, min(self.concurrent_institutions, hosted))
        elif device_type != "cpu" or self.fuse_institutions or not self.strategy.concurrent():
            k = 1
        else:
            k = max(1, min(hosted, threads))
        return k, max(1, threads // k)

    def merge_of(self, run: RankRun, state: RankState, r: int):
        """Round r's merge: the strategy's, or DP-FedAvg's clipped and noised mean."""
        if self.privacy is None:
            return self.strategy.merge_kind(run, received=state.merged)
        return PrivateMean(run, state.merged, self.privacy, seed_of(self.seed, r, 104729))

    def _start_state(self, run: RankRun, ckpt_path: str | None) -> RankState:
        """Round 0's state (every trainee holds the module's weights), or the state after the
        checkpointed rounds when resuming."""
        saved = checkpoint.load_round(run.fabric, run.run_dir, ckpt_path, run.fingerprint) if ckpt_path else None
        if saved is None:
            template = clone_state(run.module.state_dict())
            return RankState.fresh(template, run.packer, run.local_keys, run.mine, run.device)
        if saved["round"] > self.rounds:
            raise HSLError(f"The checkpoint holds {saved['round']} rounds, more than federation.rounds={self.rounds}; "
                           f"set rounds to at least {saved['round']}.")
        self.strategy.load_state_dict(saved["strategy"])
        return RankState.restore(saved, run.packer, run.device)

    def add_contribution(self, run: RankRun, state: RankState, message: RoundMessage, merge, t: int,
                         outcome: Outcome | Exception, losses: torch.Tensor, r: int) -> None:
        """Add trainee t's outcome of round r to the message and keep what stays with it; or report
        its failure (which stops the run unless ``min_nodes`` lets it drop out of the round)."""
        if isinstance(outcome, Exception):
            self.failed(f"node {run.label(t)}", outcome, r)
            merge.dropped(t)
            return
        # DP: every node weighs 1 (normalised like the others under secure aggregation)
        weight = (1.0 / (len(run.plan) if run.secure else 1)) if self.privacy is not None else run.weight(t)
        # under secure aggregation its part of the message on its own, then as fixed-point integers
        target = RoundMessage(run.layout, message.vector.device) if run.secure else message
        merge.contribute(target, t, outcome.state, weight)
        target.add(t, weight, outcome.extra)
        if run.secure:
            message.add_fixed(fixedpoint.quantise(target.vector, len(run.plan), f"node {run.label(t)}", r + 1))
        trainee = state.trainees[t]
        trainee.local = clone_state({k: outcome.state[k] for k in run.local_keys})
        if outcome.personal is not None:
            trainee.personal = outcome.personal
        for i in run.plan[t]:
            losses[i] = outcome.loss

    def _judge(self, state: RankState, metrics: list[dict], r: int) -> Validation:
        """Round r's validation summary and score; the best round so far is recorded to deploy."""
        stats = summarize([m["auc"] for m in metrics])
        score = round_score(self.deploy_round, metrics, stats["mean"], r)
        improved = score > state.best.score or state.best.round < 0
        if improved:
            state.record_best(r, score)
        return Validation(metrics, stats, improved)

    def _patience_spent(self, state: RankState, r: int) -> bool:
        """Whether early stopping ends the run before round r: ``patience`` rounds have passed since
        the best validated round (the same answer on every rank, and after a resume)."""
        return self.patience is not None and state.best.round >= 0 and r - 1 - state.best.round >= self.patience

    # ------------------------------------------------------------------ checks and failures
    def _check(self, module, dm) -> None:
        hp = getattr(module, "hparams", {}) or {}
        if "in_chans" in hp and hp["in_chans"] != dm.in_chans:
            raise HSLError(f"The model expects {hp['in_chans']}-channel images but the data has {dm.in_chans} "
                           f"channel(s); set model in_chans to {dm.in_chans}.")
        if getattr(module, "uses_sat", False) and not dm.uses_sat:
            raise HSLError(f"{type(module).__name__} trains on primary + SAT pairs but the data module has no SAT "
                           "(data.use_sat is false). Give it a SAT, or use ClassifierModule.")

    @staticmethod
    def _check_rounds_and_nodes(val_every_n_rounds: int, patience: int | None, privacy, min_nodes: int | None,
                                secure_aggregation: bool | None = None) -> None:
        if val_every_n_rounds < 1:
            raise HSLError(f"val_every_n_rounds must be at least 1, got {val_every_n_rounds} (the last round is "
                           "always validated; set it to the number of rounds to validate only that one).")
        if patience is not None and patience < val_every_n_rounds:
            raise HSLError(f"patience counts rounds since the best validated round, so it must be at least "
                           f"val_every_n_rounds ({val_every_n_rounds}), got {patience}.")
        if privacy is not None and min_nodes is not None:
            raise HSLError("federation.privacy accounts for every node's share of the noise in every round; with "
                           "min_nodes a dropped node would leave its share out. Set min_nodes to null.")
        check_secure_aggregation(privacy, secure_aggregation)
        if min_nodes is not None and min_nodes < 1:
            raise HSLError(f"min_nodes must be at least 1 (or null to stop on any failure), got {min_nodes}.")

    def _check_misuse(self, precision: str) -> None:
        """Combinations that would run but compute something else than the method: refused."""
        name = self.strategy.name
        if self.contribute == "best" and self.local_epochs > 1 and self.strategy.reads_last_epoch:
            raise HSLError(f"contribute 'best' sends a node's best epoch of the round, but {name} builds its state "
                           f"(end_local) from the last epoch's weights, so the two would not match. Set "
                           f"federation.contribute: last (its default) or local_epochs: 1.")
        if str(precision).startswith("16") and "after_backward" in self.strategy.local_hooks():
            raise HSLError(f"{name} edits the gradients after backward (after_backward), but under precision "
                           f"'{precision}' they are still multiplied by the GradScaler's loss scale then, so the edit "
                           "would be off by that factor. Use precision bf16-mixed or 32-true.")

    def _check_concurrent(self, k: int | None, accelerator: str, fused: bool) -> None:
        if k is None or k == 1:
            return
        if k < 1:
            raise HSLError(f"concurrent_institutions must be at least 1 (or null for automatic), got {k}.")
        if fused:
            raise HSLError("fuse_institutions already trains a rank's institutions together; set "
                           "federation.concurrent_institutions to null or 1.")
        if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
            raise HSLError(f"concurrent_institutions runs institutions in CPU threads, not on accelerator "
                           f"'{accelerator}'; on GPUs use federation.fuse_institutions.")
        if not self.strategy.concurrent():
            able = [name for name, kind in STRATEGIES.items() if kind.concurrent()]
            raise HSLError(f"Strategy '{self.strategy.name}' keeps the state of an institution's local training "
                           f"({', '.join(self.strategy.local_hooks()) or 'its traffic'}) in the strategy object, so its "
                           f"institutions train one after another; concurrent_institutions works with: "
                           f"{', '.join(able)}. Set federation.concurrent_institutions to null or 1.")

    def _check_fusable(self) -> None:
        if not self.strategy.fusable():
            hooks = self.strategy.local_hooks()
            able = [name for name, kind in STRATEGIES.items() if kind.fusable()]
            raise HSLError(f"fuse_institutions trains a rank's institutions as one model, so it cannot run strategy "
                           f"'{self.strategy.name}', which acts on each institution's own training "
                           f"({', '.join(hooks) or 'a personal model'}). It works with: {', '.join(able)}; or set "
                           "federation.fuse_institutions to false.")

    def failed(self, who: str, cause: Exception | str, r: int) -> None:
        """``who`` (``node NAME`` in the simulator, ``site ...`` in a deployment) failed in round r
        (0-based): stop the run with a message naming it and the round, or, with ``min_nodes``, print
        that the round goes on without it (the caller leaves it out of the round)."""
        exc = cause if isinstance(cause, Exception) else None
        text = str(cause) if exc is None or isinstance(exc, HSLError) else f"{type(exc).__name__}: {exc}"
        if self.min_nodes is None:
            if isinstance(exc, HSLError) and f"{who}, round {r + 1}" in text:
                raise exc  # already names the node and the round
            raise HSLError(f"{who} failed in round {r + 1}: {text}. Set federation.min_nodes to drop failing nodes "
                           "from a round instead of stopping.") from exc
        print(f"hsl: {who} dropped from round {r + 1} (min_nodes {self.min_nodes}): {text}", flush=True)

    def _check_quorum(self, finished: int, trainees: int, r: int) -> None:
        if finished == 0 or (self.min_nodes is not None and finished < min(self.min_nodes, trainees)):
            raise HSLError(f"Only {finished} of {trainees} node(s) finished round {r + 1}, fewer than min_nodes="
                           f"{self.min_nodes}; the failures are printed above.")

    def describe(self) -> dict:
        """The federation's settings, for the logs."""
        return {"strategy": self.strategy.name, "strategy_options": self.strategy.options(), "rounds": self.rounds,
                "local_epochs": self.local_epochs, "contribute": self.contribute, "accelerator": self.accelerator,
                "devices": self.devices, "machines": self.machines, "precision": self.precision, "seed": self.seed,
                "checkpoint": self.checkpoint, "save_weights": self.save_weights, "min_nodes": self.min_nodes,
                "val_every_n_rounds": self.val_every_n_rounds, "patience": self.patience,
                "deploy_round": self.deploy_round, "statistics": self.statistics and vars(self.statistics),
                "privacy": None if self.privacy is None else vars(self.privacy),
                "concurrent_institutions": self.concurrent_institutions, "fuse_institutions": self.fuse_institutions,
                "cuda_graphs": self.cuda_graphs, "secure_aggregation": self.secure_aggregation}

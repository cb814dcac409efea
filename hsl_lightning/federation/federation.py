"""The Federation: simulated institutions trained round by round on Fabric ranks.

One picture of a run::

    for round in rounds:
        for each institution hosted on this rank (one after another, or fused: fuse_institutions):
            load the institution's model: the merged shared state + its own local entries
            train ``local_epochs`` on its data (LightningModule.training_step, driven by Fabric)
            contribute its best epoch (by local validation AUC) or its last one
        one all-reduce of the weighted sum of contributions  -> merged shared state
        validate every institution's deployed model on its own validation set
        checkpoint the round (every rank its institutions; resumable with ckpt_path="last")
    test every institution with the round of best mean validation AUC

Institutions are not processes: W ranks host N institutions (institution t lives on rank
t % W), so the same configuration runs on one CPU process, several processes or several GPUs,
and gives the same result. Every institution's randomness (sampling, augmentation, dropout) is
seeded from (seed, round, institution), never from the rank.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import yaml
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from hsl_lightning.data.sampling import prepare_batch
from hsl_lightning.errors import HSLError
from hsl_lightning.federation import checkpoint
from hsl_lightning.federation.fused import FusedModels, FusedTrainer, check_resettable
from hsl_lightning.federation.loggers import WandbMode, make_loggers
from hsl_lightning.federation.strategies import STRATEGIES, Contribution, Strategy, get_strategy
from hsl_lightning.federation.sync import StatePacker, all_reduce_sum
from hsl_lightning.metrics import NodeMetrics, summarize

METRICS = ("auc", "acc", "sensitivity", "specificity")


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**31 - 1)
    return value


def _optimizer(configured):
    """The optimizer out of whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        return _optimizer(configured[0])
    raise HSLError("configure_optimizers must return an optimizer (or a dict / list holding one) for federated training.")


def _loss_value(out):
    """The loss out of whatever ``training_step`` returned (a tensor, or a dict holding ``loss``)."""
    return out["loss"] if isinstance(out, dict) else out


# Strategy hooks that act on one institution's local training: strategies that override any of
# them cannot train institutions fused (fuse_institutions).
_LOCAL_HOOKS = ("begin_local", "begin_epoch", "local_loss", "after_backward", "end_local", "begin_personal",
                "end_personal")


def _local_hooks(kind: type[Strategy]) -> list[str]:
    return [h for h in _LOCAL_HOOKS if getattr(kind, h) is not getattr(Strategy, h)]


def _launched_externally() -> bool:
    """Whether this process is one rank of a torchrun (torchelastic) or SLURM ``srun`` launch."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect() or (
        "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _shared_of(hosted: dict, global_flat: torch.Tensor) -> torch.Tensor:
    """An institution's shared state: its own when the strategy personalises, else the merged one."""
    return hosted["shared"] if hosted["shared"] is not None else global_flat


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _clone_hosted(hosted: dict) -> dict:
    """A detached copy of one institution's entry of ``hosted`` (local, shared, personal state)."""
    return {"local": _clone(hosted["local"]),
            "shared": None if hosted["shared"] is None else hosted["shared"].clone(),
            "personal": None if hosted["personal"] is None else _clone(hosted["personal"])}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Federation:
    """Trains one LightningModule per simulated institution and merges them with a strategy.

    Args:
        strategy: how institutions share (``hsl``, ``fedavg``, ``fedprox``, ``local``, ...; ``hsl strategies`` lists them).
        strategy_options: keyword arguments of the strategy, e.g. ``{"mu": 0.1}`` for fedprox.
        rounds: synchronisation rounds.
        local_epochs: local epochs per round at each institution.
        contribute: ``best`` (epoch of best local validation AUC within the round) or ``last``;
            default: the strategy's (``best`` for hsl, ``last`` otherwise).
        accelerator, devices, num_nodes, precision: as for Lightning Fabric. ``devices`` x
            ``num_nodes`` ranks host the institutions.
        run_dir: where the run writes summary.json, config.yaml, metrics and weights
            (default ``runs/<time>-<strategy>``).
        wandb: ``auto`` (online when logged in, else offline), ``online``, ``offline`` or ``disabled``.
        wandb_project: W&B project name.
        progress: show a progress bar over rounds and institutions.
        min_nodes: what to do when a node's local training fails (an exception, or a non-finite
            loss): None (default) stops the run with a message naming the node, the round and the
            cause; a number drops the failing node from that round (it keeps what it received, and
            the failure is logged) as long as at least that many nodes finished the round.
        save_weights: write the deployed weights (``model.pt``, ``nodes/<name>.pt``) at the end.
        checkpoint: write a checkpoint after every round (``<run_dir>/checkpoints``; the newest
            complete round is kept), so ``fit(..., ckpt_path="last")`` continues a killed run.
        val_every_n_rounds: validate every node after every n-th round and after the last; the
            deployed round is the validated round of best mean validation AUC. Validation costs
            about 5 % of a small FedAvg run (benchmarks/overhead.py); raise n to skip most of it.
        seed: seeds training (sampling, augmentation, dropout); set from ``seed_everything`` by the CLI.
        threads: CPU threads per rank (default: torch's choice, divided among local ranks).
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
            Needs a strategy without local-training hooks (hsl, fedavg, local, central, swarm,
            personalized, fedbn, fedper, splitavg, fedcome, foundation) and an elementwise torch optimizer.
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
        num_nodes: int = 1,
        precision: str = "32-true",
        run_dir: str | None = None,
        wandb: WandbMode = "auto",
        wandb_project: str = "hsl_lightning",
        progress: bool = True,
        min_nodes: int | None = None,
        save_weights: bool = True,
        checkpoint: bool = True,
        val_every_n_rounds: int = 1,
        seed: int = 0,
        threads: int | None = None,
        fuse_institutions: bool = False,
        cuda_graphs: bool = False,
    ):
        if rounds < 1 or local_epochs < 1:
            raise HSLError(f"rounds and local_epochs must be at least 1, got {rounds} and {local_epochs}.")
        self.strategy: Strategy = get_strategy(strategy, strategy_options)
        self.rounds, self.local_epochs = rounds, local_epochs
        self.contribute = contribute or self.strategy.default_contribution
        self.accelerator, self.devices, self.num_nodes, self.precision = accelerator, devices, num_nodes, precision
        self.run_dir = run_dir
        self.wandb, self.wandb_project = wandb, wandb_project
        self.progress, self.checkpoint, self.seed, self.threads = progress, checkpoint, seed, threads
        self.save_weights = save_weights
        if val_every_n_rounds < 1:
            raise HSLError(f"val_every_n_rounds must be at least 1, got {val_every_n_rounds} (the last round is "
                           "always validated; set it to the number of rounds to validate only that one).")
        self.val_every_n_rounds = val_every_n_rounds
        if min_nodes is not None and min_nodes < 1:
            raise HSLError(f"min_nodes must be at least 1 (or null to stop on any failure), got {min_nodes}.")
        self.min_nodes = min_nodes
        self.fuse_institutions = fuse_institutions
        if fuse_institutions:
            self._check_fusable()
        if cuda_graphs and not fuse_institutions:
            raise HSLError("cuda_graphs captures the fused training step: set federation.fuse_institutions to true "
                           "as well.")
        self.cuda_graphs = cuda_graphs
        self._trainers: dict[tuple, FusedTrainer] = {}  # fused groups of this rank, kept across rounds
        self.run_config: dict | None = None  # the resolved CLI config, attached to loggers and saved
        self.summary: dict | None = None

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
        if ckpt_path == "last" and self.run_dir is None:
            raise HSLError("ckpt_path 'last' continues a run directory: set federation.run_dir to the directory of "
                           "the run to continue.")
        run_dir = Path(self.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{self.strategy.name}")
        world = int(self.devices) * int(self.num_nodes)
        if world == 1:
            fabric_strategy = "auto"
        elif _launched_externally():
            fabric_strategy = "ddp"  # every rank was started by torchrun or srun: join, don't spawn
        else:
            fabric_strategy = "ddp_spawn"
        fabric = Fabric(accelerator=self.accelerator, devices=self.devices, num_nodes=self.num_nodes,
                        precision=self.precision, strategy=fabric_strategy)
        self.summary = fabric.launch(self._run, model, datamodule, run_dir, ckpt_path)
        return self.summary

    # ------------------------------------------------------------------ one rank
    def _run(self, fabric: Fabric, module, dm, run_dir: Path, ckpt_path: str | None = None) -> dict | None:
        start = time.perf_counter()
        rank, world = fabric.global_rank, fabric.world_size
        if self.threads:
            torch.set_num_threads(self.threads)
        elif world > 1 and fabric.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, fabric.strategy.num_processes)))
        dm.setup("fit")
        names = dm.node_names
        self._check(module, dm)
        self.strategy.setup(module, len(names))
        plan = self.strategy.plan(len(names))
        mine = [t for t in range(len(plan)) if t % world == rank]
        owner = {node: t % world for t, nodes in enumerate(plan) for node in nodes}
        module = module.to(fabric.device)
        if self.fuse_institutions:
            self._check_fused_setup(fabric, module)
        self._trainers = {}
        if getattr(module, "uses_sat", False) and hasattr(module, "set_sat_reference"):
            module.set_sat_reference(dm.sat_reference())

        template = {k: v.detach().clone() for k, v in module.state_dict().items()}
        packer = StatePacker(template, self.strategy.shared_keys(module))
        shared_set = set(packer.keys)
        local_keys = [k for k in template if k not in shared_set]
        n_train = [sum(len(dm.nodes[i].train) for i in nodes) for nodes in plan]
        n_extra = self.strategy.extra_size(module)  # strategy vectors summed in the same all-reduce
        # What one institution sends per round: its shared state, plus strategy extras as float32.
        payload = packer.nbytes + 4 * n_extra if len(plan) > 1 else 0
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        is_param = packer.mask(trainable).to(fabric.device)
        keep_own = self.strategy.personal or self.strategy.server_aggregates
        global_flat = packer.pack(template, fabric.device)
        # Per institution hosted here: its non-shared entries, and its own shared state if the strategy personalises.
        # "personal": a whole model the node deploys instead of the shared one (Ditto); None otherwise.
        hosted = {t: {"local": {k: template[k] for k in local_keys}, "shared": None, "personal": None} for t in mine}
        report = dm.report()  # how each node was drawn: data.json, and part of the checkpoint fingerprint
        fingerprint = checkpoint.fingerprint(
            strategy=self.strategy.name, options=self.strategy.options(), seed=self.seed,
            local_epochs=self.local_epochs, contribute=self.contribute, nodes=names, plan=plan,
            model=type(module).__name__, state={k: list(v.shape) for k, v in template.items()}, data=report)
        del template
        best = {"score": -math.inf, "round": -1}
        history = []
        first = 0  # rounds already done (by the checkpointed run when resuming)
        if ckpt_path:
            restored = self._restore(fabric, run_dir, ckpt_path, fingerprint, packer, hosted)
            if restored is not None:
                first, global_flat, best, history = restored
                if first > self.rounds:
                    raise HSLError(f"The checkpoint holds {first} rounds, more than federation.rounds={self.rounds}; "
                                   f"set rounds to at least {first}.")

        loggers = []
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(run_dir / "data.json", json.dumps(report, indent=2))
            if self.run_config is not None:
                _atomic_write(run_dir / "config.yaml", yaml.safe_dump(self.run_config, sort_keys=False))
            config = {"federation": self._describe(), **(self.run_config or {})}
            loggers = make_loggers(run_dir, self.wandb, self.wandb_project, run_dir.name, config)
            for row in history:  # a resumed run logs the restored rounds again, into fresh logs
                for logger in loggers:
                    logger.log_metrics({k: v for k, v in row.items() if k not in ("round", "dropped")}, step=row["round"])
        bar = tqdm(total=self.rounds * len(mine), initial=min(first, self.rounds) * len(mine),
                   desc=f"{self.strategy.name}", unit="node-round",
                   disable=not (self.progress and rank == 0), dynamic_ncols=True)

        for r in range(first, self.rounds):
            round_start = time.perf_counter()
            # layout: [weighted shared state | strategy extras | bytes of other traffic | which trainees
            # finished the round (one slot each) | sum of weights]
            acc = torch.zeros(packer.numel + n_extra + 2 + len(plan), dtype=torch.float64, device=fabric.device)
            finished_at = packer.numel + n_extra + 1
            failures = []
            start_flat = global_flat  # what every node received this round
            train_loss = torch.full((len(names),), math.nan, dtype=torch.float64)
            own = {}  # contributions kept only when the merge is personal (one flat state per institution)
            # trainees trained as one model (fuse_institutions): their outcomes, computed first
            fused, spare = self._train_fused_round(fabric, module, dm, plan, mine, names, r, packer, hosted,
                                                   global_flat, bar) if self.fuse_institutions else ({}, {})
            for t in mine:
                if t not in fused:
                    self._load(module, packer, _shared_of(hosted[t], global_flat), hosted[t]["local"])
                received = _clone(module.state_dict()) if self.strategy.personal_model else None
                bar.set_postfix_str(f"round {r + 1}/{self.rounds} {'+'.join(names[i] for i in plan[t])}")
                personal_state = None
                try:
                    if t in fused:
                        if isinstance(fused[t], Exception):
                            raise fused[t]
                        state, loss, extra = fused[t]
                    else:
                        state, loss, extra = self._train_local(fabric, module, dm, plan[t], names, r, t,
                                                               loader=spare.pop(t, None))
                    # packed before a personal pass reuses the module; else added straight into acc
                    flat = packer.pack(state, fabric.device) if keep_own or received is not None else None
                    local = {k: state[k].detach().clone() for k in local_keys}
                    if received is not None:  # then train the node's own model, anchored at what it received
                        module.load_state_dict(hosted[t]["personal"] or received)
                        self.strategy.begin_personal(module, t, received)
                        personal_state, _, _ = self._train_local(fabric, module, dm, plan[t], names, r, t,
                                                                 personal=True)
                        self.strategy.end_personal(module, t)
                except Exception as exc:  # noqa: BLE001 - any failure of one node's training
                    failures.append(self._node_failed(exc, "+".join(names[i] for i in plan[t]), r))
                    self.strategy.abort_local(module, t)
                    if self.strategy.server_aggregates:
                        own[t] = start_flat  # no update from this node
                    bar.update(1)
                    continue
                acc[finished_at + t] = 1
                w = self.strategy.weight(n_train[t])
                if flat is None:
                    packer.accumulate(acc[:packer.numel], state, w)
                else:
                    acc[:packer.numel].add_(flat, alpha=w)
                if extra is not None:
                    acc[packer.numel:packer.numel + n_extra] += extra.to(acc.device)
                acc[-1] += w
                if keep_own:
                    own[t] = flat
                hosted[t]["local"] = local
                if personal_state is not None:
                    hosted[t]["personal"] = _clone(personal_state)
                for i in plan[t]:
                    train_loss[i] = loss
                bar.update(1)
            acc[finished_at - 1] = self.strategy.traffic(module)
            total = all_reduce_sum(fabric, acc)
            finished = total[finished_at:finished_at + len(plan)]
            self._check_quorum(int(finished.sum()), len(plan), r)
            shared_sum = total[:packer.numel]
            if packer.numel:
                if self.strategy.personal:
                    for t in mine:
                        if t not in own:  # dropped this round: keeps its state
                            continue
                        merged = self.strategy.combine(own[t], shared_sum, self.strategy.weight(n_train[t]),
                                                       float(total[-1]))
                        hosted[t]["shared"] = packer.representable(merged)
                else:
                    global_flat = shared_sum / total[-1]
                    if self.strategy.server_aggregates:  # the merge needs every contribution, not their sum
                        stacked = torch.zeros(len(plan), packer.numel, dtype=torch.float64, device=fabric.device)
                        for t in mine:
                            stacked[t] = own[t]
                        stacked = all_reduce_sum(fabric, stacked)
                        sizes = torch.tensor(n_train, dtype=torch.float64, device=fabric.device) * finished
                        global_flat = self.strategy.aggregate(start_flat, stacked, sizes, is_param)
                    global_flat = packer.representable(global_flat)  # what nodes receive, exactly
            self.strategy.after_round(total[packer.numel:packer.numel + n_extra] if n_extra else None, len(plan))
            traffic = int(total[finished_at - 1])
            dropped = [("+".join(names[i] for i in plan[t])) for t in range(len(plan)) if finished[t] == 0]
            del own, start_flat, fused, spare

            loss_all = self._gather(fabric, train_loss.unsqueeze(1), owner)[:, 0]
            # every node sends its state and receives the merge; SplitAVG's feature maps come on top
            row = {"round": r + 1, "bytes_sent_per_node": payload,
                   "bytes_features_round": traffic, "bytes_round": 2 * payload * len(plan) + traffic,
                   "nodes_dropped": len(dropped)}
            validate = (r + 1) % self.val_every_n_rounds == 0 or r == self.rounds - 1
            if validate:
                val = self._evaluate_all(fabric, module, dm, plan, mine, hosted, global_flat, packer, "val", owner)
                stats = summarize([val[i]["auc"] for i in range(len(names))])
                score = stats["mean"] if not math.isnan(stats["mean"]) else -math.inf
                improved = score > best["score"] or best["round"] < 0
                if improved:
                    best = {"score": score, "round": r, "global": global_flat.clone(),
                            "hosted": {t: _clone_hosted(h) for t, h in hosted.items()}}
                row.update({"mean_val_auc": stats["mean"], "std_val_auc": stats["std"], "min_val_auc": stats["min"]})
            for i, name in enumerate(names):
                if validate:
                    row.update({f"{name}/val_{m}": val[i][m] for m in METRICS})
                row[f"{name}/train_loss"] = float(loss_all[i])
            row["round_s"] = round(time.perf_counter() - round_start, 4)
            history.append({**row, "dropped": dropped})
            for logger in loggers:
                logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=r + 1)
            if rank == 0 and self.progress and validate:
                bar.write(f"round {r + 1}/{self.rounds}: mean node val AUC {stats['mean']:.4f} "
                          f"(min {stats['min']:.4f}){'  * best so far' if improved else ''}")
            if self.checkpoint:
                self._save_checkpoint(fabric, run_dir, r, fingerprint, packer, global_flat, hosted, best, history)
        bar.close()
        self._trainers = {}  # the fused groups' models and graphs are not needed past training

        # Deploy the round of best mean validation AUC and score each node on its own test set.
        hosted = best["hosted"]
        test = self._evaluate_all(fabric, module, dm, plan, mine, hosted, best["global"], packer, "test", owner)
        self._save_weights(fabric, run_dir, module, packer, best, plan, names, mine)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
        peaks = fabric.all_gather(peak.to(fabric.device)).reshape(-1).cpu() if world > 1 else peak
        if rank != 0:
            return None
        summary = self._summary(dm, names, plan, val_history=history, best_round=best["round"], test=test,
                                wall=time.perf_counter() - start, nbytes=payload)
        summary["peak_rss_mb_per_rank"] = [round(float(p), 1) for p in peaks]
        _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
        final = {f"{n['name']}/test_auc": n["test_auc"] for n in summary["nodes"]}
        final.update({"test/mean_auc": summary["mean_test_auc"], "test/std_auc": summary["std_test_auc"],
                      "test/min_auc": summary["min_test_auc"], "best_round": best["round"] + 1})
        for logger in loggers:
            logger.log_metrics(final, step=self.rounds + 1)
            logger.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(final)
                wandb.finish()
        print(format_table(summary))
        return summary

    # ------------------------------------------------------------------ pieces
    def _check(self, module, dm) -> None:
        hp = getattr(module, "hparams", {}) or {}
        if "in_chans" in hp and hp["in_chans"] != dm.in_chans:
            raise HSLError(f"The model expects {hp['in_chans']}-channel images but the data has {dm.in_chans} "
                           f"channel(s); set model in_chans to {dm.in_chans}.")
        if getattr(module, "uses_sat", False) and not dm.uses_sat:
            raise HSLError(f"{type(module).__name__} trains on primary + SAT pairs but the data module has no SAT "
                           "(data.use_sat is false). Give it a SAT, or use ClassifierModule.")

    def _node_failed(self, exc: Exception, node: str, r: int) -> str:
        """Stop the run (no ``min_nodes``) or report the node as dropped from round ``r``."""
        cause = str(exc) if isinstance(exc, HSLError) else f"{type(exc).__name__}: {exc}"
        if self.min_nodes is None:
            if isinstance(exc, HSLError) and f"node {node}, round {r + 1}" in cause:
                raise exc  # already names the node and the round
            raise HSLError(f"Local training of node {node} failed in round {r + 1}: {cause}. Set federation.min_nodes "
                           "to drop failing nodes from a round instead of stopping.") from exc
        print(f"hsl: node {node} dropped from round {r + 1} (min_nodes {self.min_nodes}): {cause}")
        return node

    def _check_quorum(self, finished: int, trainees: int, r: int) -> None:
        if finished == 0 or (self.min_nodes is not None and finished < min(self.min_nodes, trainees)):
            raise HSLError(f"Only {finished} of {trainees} node(s) finished round {r + 1}, fewer than min_nodes="
                           f"{self.min_nodes}; the failures are printed above.")

    def _save_checkpoint(self, fabric, run_dir, r, fingerprint, packer, global_flat, hosted, best, history) -> None:
        """This rank's share of the checkpoint after round ``r``; rank 0 marks it complete once all have saved."""
        def portable(h: dict) -> dict:
            return {"local": {k: v.cpu() for k, v in h["local"].items()},
                    "shared": None if h["shared"] is None else packer.unpack(h["shared"].cpu()),
                    "personal": None if h["personal"] is None else {k: v.cpu() for k, v in h["personal"].items()}}

        state = {"round": r + 1, "fingerprint": fingerprint, "global": packer.unpack(global_flat.cpu()),
                 "hosted": {t: portable(h) for t, h in hosted.items()}, "strategy": self.strategy.state_dict(),
                 "history": history, "best_score": best["score"], "best_round": best["round"],
                 # the best round's states, unless they are this round's (or no round was validated yet)
                 "best": None if best["round"] in (r, -1) else {
                     "global": packer.unpack(best["global"].cpu()),
                     "hosted": {t: portable(h) for t, h in best["hosted"].items()}}}
        checkpoint.save_rank(run_dir, r + 1, fabric.global_rank, state)
        if fabric.world_size > 1:
            fabric.barrier()
        if fabric.local_rank == 0:  # each machine marks (and prunes) its own copy of the round
            checkpoint.mark_complete(run_dir, r + 1, fabric.world_size)

    def _restore(self, fabric, run_dir, ckpt_path, fingerprint, packer, hosted):
        """Load this rank's checkpoint into ``hosted`` and the strategy; returns (rounds done, merged
        state, best-so-far, history), or None when ``last`` finds no complete round yet."""
        folder = checkpoint.resolve(ckpt_path, run_dir) if fabric.global_rank == 0 else None
        if fabric.world_size > 1:
            folder = fabric.broadcast(folder, src=0)
        if folder is None:
            if fabric.global_rank == 0:
                print(f"hsl: no complete checkpoint in {run_dir / 'checkpoints'} yet; starting from round 1.")
            return None
        state = checkpoint.load_rank(Path(folder), fabric.global_rank, fabric.world_size, fabric.device)
        checkpoint.check_fingerprint(state["fingerprint"], fingerprint, Path(folder))
        device = fabric.device

        def restored(saved: dict) -> dict:
            return {"local": saved["local"],
                    "shared": None if saved["shared"] is None else packer.pack(saved["shared"], device),
                    "personal": saved["personal"]}

        for t in hosted:
            hosted[t] = restored(state["hosted"][t])
        global_flat = packer.pack(state["global"], device)
        self.strategy.load_state_dict(state["strategy"])
        best = {"score": state["best_score"], "round": state["best_round"]}
        if state["best"] is not None:
            best.update({"global": packer.pack(state["best"]["global"], device),
                         "hosted": {t: restored(state["best"]["hosted"][t]) for t in hosted}})
        elif best["round"] >= 0:  # the best round is the checkpointed one (-1: none validated yet)
            best.update({"global": global_flat.clone(), "hosted": {t: _clone_hosted(h) for t, h in hosted.items()}})
        if fabric.global_rank == 0:
            best_so_far = f"round {state['best_round'] + 1}" if state["best_round"] >= 0 else "none validated yet"
            print(f"hsl: resuming from {folder} after round {state['round']} (best so far: {best_so_far}).")
        return state["round"], global_flat, best, state["history"]

    def _describe(self) -> dict:
        return {"strategy": self.strategy.name, "strategy_options": self.strategy.options(), "rounds": self.rounds,
                "local_epochs": self.local_epochs, "contribute": self.contribute, "accelerator": self.accelerator,
                "devices": self.devices, "num_nodes": self.num_nodes, "precision": self.precision, "seed": self.seed,
                "checkpoint": self.checkpoint, "save_weights": self.save_weights, "min_nodes": self.min_nodes,
                "val_every_n_rounds": self.val_every_n_rounds, "fuse_institutions": self.fuse_institutions,
                "cuda_graphs": self.cuda_graphs}

    def _deploy(self, module, packer: StatePacker, hosted: dict, global_flat: torch.Tensor) -> None:
        """Load the model an institution deploys: its personal model if it has one, else shared + local."""
        if hosted["personal"] is not None:
            module.load_state_dict(hosted["personal"], strict=True)
        else:
            self._load(module, packer, _shared_of(hosted, global_flat), hosted["local"])

    @staticmethod
    def _load(module, packer: StatePacker, shared: torch.Tensor, local: dict) -> None:
        state = packer.unpack(shared)
        state.update(local)
        module.load_state_dict(state, strict=True)

    def _train_local(self, fabric, module, dm, nodes, names, r, t, personal: bool = False,
                     loader=None) -> tuple[dict, float, torch.Tensor | None]:
        """One institution's local training of a round; ``personal``: the pass over its own model
        (strategies with a personal model), which contributes nothing to the merge; ``loader``: its
        round's training loader, when already built (and not yet iterated)."""
        seed = _seed(self.seed, r, t, 1) if personal else _seed(self.seed, r, t)
        torch.manual_seed(seed)
        if loader is None:
            loader = dm.train_loader(nodes, seed, with_sat=getattr(module, "uses_sat", False))
        optimizer = _optimizer(module.configure_optimizers())
        if not personal:
            self.strategy.begin_local(module, t)
        select_best = self.contribute == "best" and self.local_epochs > 1 and not personal
        best_state, best_auc, epoch_loss, total_steps = None, -math.inf, math.nan, 0
        for epoch in range(self.local_epochs):
            self.strategy.begin_epoch(module, epoch, self.local_epochs)
            module.train()
            loss_sum = torch.zeros((), device=fabric.device)
            steps = 0
            for i, batch in enumerate(loader):
                batch = prepare_batch(fabric.to_device(batch))  # augmented on the device
                with fabric.autocast():
                    loss = _loss_value(module.training_step(batch, i))
                    term = self.strategy.local_loss(module, batch)  # e.g. FedProx's proximal term
                    if term is not None:
                        loss = loss + term
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                self.strategy.after_backward(module)
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
            total_steps += steps
            epoch_loss = float(loss_sum) / max(1, steps)
            if not math.isfinite(epoch_loss):
                raise self._diverged("+".join(names[i] for i in nodes), r, epoch, epoch_loss)
            if select_best:
                auc = self._local_val_auc(fabric, module, dm, nodes)
                if best_state is None or auc > best_auc:
                    best_auc = auc
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        extra = None if personal else self.strategy.end_local(module, t, total_steps, optimizer)
        return (best_state if best_state is not None else module.state_dict()), epoch_loss, extra

    def _local_val_auc(self, fabric, module, dm, nodes) -> float:
        """Mean validation AUC of ``module`` over a trainee's nodes, for choosing its best epoch
        (-inf when undefined, so any defined epoch beats it)."""
        auc = summarize([self._evaluate(fabric, module, dm, i, "val")["auc"] for i in nodes])["mean"]
        return -math.inf if math.isnan(auc) else auc

    @staticmethod
    def _diverged(node: str, r: int, epoch: int, loss: float) -> HSLError:
        return HSLError(f"Training diverged at node {node}, round {r + 1}, epoch {epoch + 1}: mean loss is {loss}. "
                        "Lower the learning rate (model.lr) or check the node's data for NaN/inf pixels.")

    def _check_fusable(self) -> None:
        hooks = _local_hooks(type(self.strategy))
        if hooks or self.strategy.personal_model:
            able = [name for name, kind in STRATEGIES.items() if not _local_hooks(kind) and not kind.personal_model]
            raise HSLError(f"fuse_institutions trains a rank's institutions as one model, so it cannot run strategy "
                           f"'{self.strategy.name}', which acts on each institution's own training "
                           f"({', '.join(hooks) or 'a personal model'}). It works with: {', '.join(able)}; or set "
                           "federation.fuse_institutions to false.")

    def _check_fused_setup(self, fabric, module) -> None:
        optimizer = _optimizer(module.configure_optimizers())
        try:
            FusedModels.check_optimizer(optimizer)
        except ValueError as exc:
            raise HSLError(f"fuse_institutions: {exc} Configure one of those, or set federation.fuse_institutions "
                           "to false.") from exc
        if not self.cuda_graphs:
            return
        if fabric.device.type != "cuda":
            raise HSLError(f"cuda_graphs needs a CUDA device; this rank runs on {fabric.device.type}. Set "
                           "federation.accelerator to gpu, or federation.cuda_graphs to false.")
        self._graph_autocast()  # refuses precisions a graph cannot hold
        try:
            check_resettable(optimizer)
        except ValueError as exc:
            raise HSLError(f"cuda_graphs: {exc} Or set federation.cuda_graphs to false.") from exc

    def _graph_autocast(self):
        """The autocast context of a captured step: Fabric's, but without autocast's weight cache,
        whose casts would not be redone when the graph is replayed."""
        precision = str(self.precision)
        if precision in ("32-true", "32", "64-true", "64"):
            return contextlib.nullcontext
        if precision in ("bf16-mixed", "bf16"):
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        raise HSLError(f"cuda_graphs supports precision 32-true and bf16-mixed, not {precision}; change "
                       "federation.precision or set federation.cuda_graphs to false.")

    def _fused_trainer(self, fabric, module, group: list[int], rows: int, starts: list[dict]) -> FusedTrainer:
        """The group's trainer from earlier rounds, loaded with ``starts``; or a new one."""
        key = (rows, tuple(group))
        trainer = self._trainers.get(key)
        if trainer is not None:
            trainer.load(module, starts)
            return trainer
        self._trainers[key] = trainer = FusedTrainer(
            module, starts, _optimizer(module.configure_optimizers()),
            lambda m, b: _loss_value(m.training_step(b, 0)), cuda_graph=self.cuda_graphs,
            autocast=self._graph_autocast() if self.cuda_graphs else fabric.autocast, backward=fabric.backward)
        return trainer

    @staticmethod
    def _stacked_batch(fabric, batches: list[dict]) -> dict:
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

    def _train_fused_round(self, fabric, module, dm, plan, mine, names, r, packer, hosted, global_flat,
                           bar) -> tuple[dict, dict]:
        """This rank's trainees trained as one vmapped model per group of equally shaped batches.
        Returns {trainee: (state, loss, None), or the exception that stopped it}, and the loaders
        of the trainees left out (alone in their group, or without a batch), which train one by one
        in the round loop."""
        with_sat = getattr(module, "uses_sat", False)
        loaders = {t: dm.train_loader(plan[t], _seed(self.seed, r, t), with_sat=with_sat) for t in mine}
        groups: dict[int, list[int]] = {}
        for t, loader in loaders.items():  # images per batch: the batch size, or the whole epoch if shorter
            if len(loader):
                groups.setdefault(min(len(loader.sampler), loader.batch_size), []).append(t)
        out = {}
        for rows, group in groups.items():
            if len(group) < 2:
                continue
            bar.set_postfix_str(f"round {r + 1}/{self.rounds} {len(group)} nodes fused")
            try:
                starts = []
                for t in group:
                    state = packer.unpack(_shared_of(hosted[t], global_flat))
                    state.update(hosted[t]["local"])
                    starts.append(state)
                trainer = self._fused_trainer(fabric, module, group, rows, starts)
                del starts
                out.update(self._train_fused(fabric, module, dm, plan, group, [loaders[t] for t in group], trainer,
                                             names, r))
            except Exception as exc:  # noqa: BLE001 - reported per node by the round loop
                out.update({t: exc for t in group})
        return out, {t: loader for t, loader in loaders.items() if t not in out}

    def _train_fused(self, fabric, module, dm, plan, group, loaders, trainer: FusedTrainer, names, r) -> dict:
        """One round of local training of ``group`` as one model, in lockstep.

        Trainee j takes exactly its own steps (its ``local_epochs`` epochs back to back, each as long
        as its loader). Once it has taken them its slice idles: it reruns its last batch with its loss
        masked out until the longest trainee is done. Its result is taken at its own last step, so
        the idle steps never reach it; and since every trainee starts at step 0, the optimizer's step
        count (one per parameter, shared by the slices) is right for each while it is active."""
        torch.manual_seed(_seed(self.seed, r, group[0]))  # dropout: one draw for the whole group
        fused = trainer.fused
        n, epochs = len(group), self.local_epochs
        labels = ["+".join(names[i] for i in plan[t]) for t in group]
        per_epoch = [len(loader) for loader in loaders]
        total = [s * epochs for s in per_epoch]  # becomes the step a trainee stopped at if it diverges
        batches_of = [itertools.chain.from_iterable(itertools.repeat(loader, epochs)) for loader in loaders]
        select_best = self.contribute == "best" and epochs > 1
        best_aucs = [-math.inf] * n
        result: list = [None] * n  # per trainee: (state, last epoch's mean loss, None), or the exception
        loss_sum = torch.zeros(n, device=fabric.device)  # each trainee's current epoch, reset when it ends
        last: list = [None] * n
        fused.train()
        mask, was_active = None, None
        steps = max(total)
        for k in range(steps):
            active = [k < total[j] for j in range(n)]
            for j in range(n):
                if active[j]:
                    last[j] = next(batches_of[j])
            if active != was_active:  # each active slice gets the gradient of its own loss; idle slices none
                mask, was_active = torch.tensor(active, device=fabric.device), active
            losses = trainer.step(self._stacked_batch(fabric, last), mask)
            loss_sum += torch.where(mask, losses.float(), 0.0)
            ended = [j for j in range(n) if active[j] and (k + 1) % per_epoch[j] == 0]
            for j in ended:  # trainee j finished an epoch with this step
                epoch = (k + 1) // per_epoch[j] - 1
                mean = float(loss_sum[j]) / per_epoch[j]
                loss_sum[j] = 0.0
                if not math.isfinite(mean):  # the others train on: the slices are independent
                    result[j], total[j] = self._diverged(labels[j], r, epoch, mean), k + 1
                    continue
                finished = epoch == epochs - 1
                if not (select_best or finished):
                    continue
                # a copy, unless nothing will change the slice before the round loop reads it
                state = fused.state_dicts([j], copy=select_best or k + 1 < steps)[0]
                if select_best:
                    module.load_state_dict(state)
                    auc = self._local_val_auc(fabric, module, dm, plan[group[j]])
                    if epoch == 0 or auc > best_aucs[j]:
                        best_aucs[j], result[j] = auc, (state, mean, None)
                    elif finished:
                        result[j] = (result[j][0], mean, None)  # the best epoch's state, the last epoch's loss
                else:
                    result[j] = (state, mean, None)
        return dict(zip(group, result))

    @torch.no_grad()
    def _evaluate(self, fabric, module, dm, node: int, split: str) -> dict:
        module.eval()
        metrics = NodeMetrics()
        for i, batch in enumerate(dm.eval_loader(node, split)):
            batch = fabric.to_device(batch)
            with fabric.autocast():
                out = module.validation_step(batch, i) if split == "val" else module.test_step(batch, i)
            metrics.update(out["logits"], out["target"])
        return metrics.compute()

    def _evaluate_all(self, fabric, module, dm, plan, mine, hosted, global_flat, packer, split, owner) -> list[dict]:
        """Each node's metrics with the model it would deploy, gathered on every rank."""
        values = torch.full((len(owner), len(METRICS)), math.nan, dtype=torch.float64)
        for t in mine:
            self._deploy(module, packer, hosted[t], global_flat)
            for i in plan[t]:
                m = self._evaluate(fabric, module, dm, i, split)
                values[i] = torch.tensor([m[k] for k in METRICS], dtype=torch.float64)
        values = self._gather(fabric, values, owner)
        return [{k: float(values[i, j]) for j, k in enumerate(METRICS)} for i in range(len(owner))]

    @staticmethod
    def _gather(fabric, values: torch.Tensor, owner: dict[int, int]) -> torch.Tensor:
        """Row i of the result comes from the rank that hosts node i."""
        if fabric.world_size == 1:
            return values
        gathered = fabric.all_gather(values.to(fabric.device)).cpu()  # (world, nodes, k)
        return torch.stack([gathered[owner[i], i] for i in range(values.shape[0])])

    def _save_weights(self, fabric, run_dir, module, packer, best, plan, names, mine) -> None:
        """``model.pt``: the deployed shared state; ``nodes/<name>.pt``: what differs per node."""
        if self.save_weights:
            self._write_weights(fabric, run_dir, packer, best, plan, names, mine)
        if fabric.world_size == 1:  # leave the user's module holding the deployed model of the first institution
            self._deploy(module, packer, best["hosted"][mine[0]], best["global"])

    def _write_weights(self, fabric, run_dir, packer, best, plan, names, mine) -> None:
        if fabric.global_rank == 0 and packer.numel and not self.strategy.personal:
            # torch.save, not fabric.save: the latter waits at a barrier that only rank 0 would reach.
            torch.save({"round": best["round"] + 1, "state": packer.unpack(best["global"].cpu())}, run_dir / "model.pt")
        for t in mine:
            h = best["hosted"][t]
            own = dict(h["local"])
            if h["shared"] is not None:
                own.update(packer.unpack(h["shared"].cpu()))
            if h["personal"] is not None:
                own = h["personal"]
            if own:
                (run_dir / "nodes").mkdir(parents=True, exist_ok=True)
                name = "+".join(names[i] for i in plan[t])
                torch.save({"round": best["round"] + 1, "state": {k: v.cpu() for k, v in own.items()}},
                           run_dir / "nodes" / f"{name}.pt")

    def _summary(self, dm, names, plan, val_history, best_round, test, wall, nbytes) -> dict:
        best_val = val_history[best_round]
        nodes = []
        for i, name in enumerate(names):
            node = dm.nodes[i]
            row = {"name": name, "n_train": len(node.train), "n_val": len(node.val), "n_test": len(node.test),
                   "test_auc": test[i]["auc"], "val_auc": best_val[f"{name}/val_auc"]}
            row.update({f"test_{k}": test[i][k] for k in METRICS if k != "auc"})
            if math.isnan(test[i]["auc"]):
                pos, n = node.test.positives, len(node.test)
                row["test_auc_undefined"] = ("no test samples" if n == 0 else
                                             f"test set holds one class only ({pos} positive of {n})")
            nodes.append(row)
        stats = summarize([n["test_auc"] for n in nodes])
        return {
            "method": self.strategy.name, "seed": self.seed, "rounds": self.rounds,
            "local_epochs": self.local_epochs, "best_round": best_round + 1, "wall_s": round(wall, 2),
            "nodes": nodes, "mean_test_auc": stats["mean"], "std_test_auc": stats["std"],
            "min_test_auc": stats["min"], "mean_val_auc": best_val["mean_val_auc"],
            "bytes_sent_per_node_per_round": nbytes,
            "bytes_features_per_round": max((h["bytes_features_round"] for h in val_history), default=0),
            "history": val_history,
        }


def format_table(summary: dict) -> str:
    """The per-node result table printed at the end of a run."""
    lines = [f"{'node':<14}{'n_train':>8}{'n_val':>7}{'n_test':>7}{'val AUC':>9}{'test AUC':>10}"]
    for n in summary["nodes"]:
        lines.append(f"{n['name']:<14}{n['n_train']:>8}{n['n_val']:>7}{n['n_test']:>7}"
                     f"{n['val_auc']:>9.4f}{n['test_auc']:>10.4f}")
    lines.append(f"{summary['method']}: mean test AUC {summary['mean_test_auc']:.4f} +- {summary['std_test_auc']:.4f} "
                 f"(min {summary['min_test_auc']:.4f}), best round {summary['best_round']}, {summary['wall_s']:.1f} s")
    return "\n".join(lines)

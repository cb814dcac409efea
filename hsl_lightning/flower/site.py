"""One hospital's side of a deployed federation: its data, its local training, its state.

A :class:`Site` is rank ``node`` of an ``N``-rank simulation in which every other rank is another
hospital: it builds the run's module, data module and :class:`~hsl_lightning.federation.Federation`
from the same YAML as ``hsl fit`` (the site's own ``data`` section composed on top), hosts only
its own node's images, and trains, validates and tests with the simulator's own code
(:class:`~hsl_lightning.federation.training.OneByOne`, :mod:`~hsl_lightning.federation.evaluation`).
Its reply to a round is exactly what that rank adds to the round's message
(:class:`~hsl_lightning.federation.message.RoundMessage`): its weighted shared state, its
strategy vector, its weight and its finished flag, plus its training loss and aggregate
validation metrics. Images, labels and per-image outputs never leave it.

What it keeps between rounds lives in its own directory (``site_dir``), one file per round
(``round-NNNN.pt``: its local entries, personal model and strategy state), so a message may be
handled by a fresh process, a restarted SuperNode continues where it stopped, and a server that
resumes from a checkpoint finds the round it needs. The site writes its deployed model
(``nodes/<name>.ckpt``) there too when it deploys a model of its own (FedBN, Ditto, local).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.evaluation import (METRICS, VAL_EXTRAS, evaluate_trainees, external_result,
                                                 threshold_counts, validate_trainees)
from hsl_lightning.federation.message import RoundMessage
from hsl_lightning.federation.state import RankState, TraineeState, clone_state
from hsl_lightning.federation.training import OneByOne
from hsl_lightning.flower.protocol import (Failure, Finish, FinishReply, Hello, HelloReply, Keys, KeysReply, Recover,
                                           Recovered, Round, RoundReply, Stop, Stopped, round_in_progress)
from hsl_lightning.metrics import youden

#: strategies a deployment runs: one trainee per node and a merge that needs only the sum
DEPLOYABLE_MERGES = ("Mean",)


class SiteFabric:
    """A single-device Fabric seen as rank ``rank`` of ``world``: ``all_gather`` keeps this rank's
    rows (the coordinator gathers the others from their sites' replies); any other collective is
    refused, since the site has no peers to reduce with and a local result would pass silently for
    the federation's."""

    COLLECTIVES = frozenset({"all_reduce", "broadcast", "barrier", "reduce", "send", "recv", "all_to_all",
                             "scatter", "gather", "reduce_scatter"})

    def __init__(self, fabric, world: int, rank: int):
        self._fabric, self.world_size, self.global_rank = fabric, world, rank

    def __getattr__(self, name):
        if name in self.COLLECTIVES:
            raise HSLError(f"A deployed site has no process group: Fabric.{name} has no meaning there (the "
                           "coordinator sums the sites' replies instead). This is a bug in hsl_lightning: please "
                           "report it.")
        return getattr(self._fabric, name)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.world_size, *values.shape), math.nan, dtype=values.dtype)
        out[self.global_rank] = values.cpu()
        return out


def read_config(args: list[str]):
    """``HSLCLI(args=args, run=False)`` in a process Flower started: its own command line (which for the
    ServerApp holds the SuperLink's session token) is hidden from LightningCLI, which would otherwise
    print it in a warning about mixing ``args`` with ``sys.argv``."""
    import sys

    from hsl_lightning.config import HSLCLI

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return HSLCLI(args=args, run=False)
    finally:
        sys.argv = argv


def _config_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


class Site:
    """Hospital ``node`` of the run configured by ``config`` (the ``hsl fit`` YAML, as text).

    Args:
        config: the run's YAML.
        node: this hospital's index among the config's nodes (the SuperNode's ``node-index``).
        site_dir: where the site keeps its state and deployed model (created).
        data_config: YAML text composed on top of ``config`` (usually a ``data:`` section: this
            site's own images and its copy of the public SAT data); None: the config's data, node
            ``node`` of it.
        name: the site's name in messages (default ``site<node>``).
        node_key: the site's node key (OpenSSH ECDSA): signs its mask key for secure aggregation.
        roster: the folder of every site's ``<name>.pub``: checks the peers' mask keys.
        statistics: the site's own floor for site statistics, from its node config: ``stats-min-count``,
            ``stats-noise`` (the stricter of these and the run's apply) and ``fingerprint-salt`` (its secret
            salt's file; default ``fingerprint.salt`` beside the per-run folders). The run's ``salt_file`` is
            never used at a site: a coordinator must not choose files a site reads or writes.
    """

    def __init__(self, config: str, node: int, site_dir: str | Path, data_config: str | None = None,
                 name: str | None = None, node_key: str | Path | None = None, roster: str | Path | None = None,
                 statistics: dict | None = None):
        from lightning.fabric import Fabric

        self.node, self.name = int(node), name or f"site{node}"
        self.site_dir = Path(site_dir)
        self.config_text, self.node_key, self.roster = config, node_key, roster
        self.statistics_floor = dict(statistics or {})
        self._masks = None
        from hsl_lightning.flower.approval import check_site_config, hsl_imports_only

        check_site_config(config, data_config, self.name)  # only hsl_lightning's classes, before anything is parsed
        args = ["--config", str(_config_file(self.site_dir, "run.yaml", config))]
        if data_config:
            args += ["--config", str(_config_file(self.site_dir, "data.yaml", data_config))]
        args += ["--federation.progress", "false", "--federation.wandb", "disabled"]
        with hsl_imports_only():  # jsonargparse's own import allow-list: hsl_lightning alone
            cli = self._guard("reading the run's configuration", read_config, args)
        self.federation, self.module, self.dm = cli.trainer, cli.model, cli.datamodule
        fed = self.federation
        if fed.privacy is not None and fed.privacy.insecure_seeded_noise:
            raise HSLError(f"Site {self.name} refuses federation.privacy.insecure_seeded_noise: its DP noise would be "
                           "drawn from the run's seed, which the coordinator and every site hold, so they could "
                           "subtract it from this site's reply. It is for tests only: set it to false (the default).")
        names = self._guard("building its data", self._build_data)
        plan = fed.strategy.plan(len(names))
        if len(plan) != len(names) or not 0 <= self.node < len(names):
            raise HSLError(f"Site {self.name}: node-index {self.node} is not one of the config's {len(names)} nodes, "
                           f"or strategy '{fed.strategy.name}' trains several nodes as one model (not deployable).")
        # the threads the simulator gives each trainee on one CPU rank hosting every trainee
        torch.set_num_threads(fed.threads_each(len(plan))[1])
        fabric = SiteFabric(Fabric(accelerator=fed.accelerator, devices=1, precision=fed.precision), len(plan),
                            self.node)
        fed.threads, fed.concurrent_institutions = torch.get_num_threads(), 1  # this site's one institution
        self.run = self._guard("setting up its model", fed.setup_rank, fabric, self.module, self.dm,
                               self.site_dir / "run")
        merge = fed.strategy.merge_kind.__name__
        if fed.fuse_institutions or (merge not in DEPLOYABLE_MERGES and fed.privacy is None):
            raise HSLError(f"Strategy '{fed.strategy.name}' merges with {merge}, which needs every node's "
                           f"contribution at the server, not only their sum; a deployment runs strategies whose "
                           f"merge is a (weighted) mean.")
        self.trainer = OneByOne(fed, self.run)
        self._fresh_strategy = copy.deepcopy(fed.strategy.state_dict())  # round 1's strategy state

    # ------------------------------------------------------------------ set-up
    def _guard(self, what: str, fn, *args, **kwargs):
        """``fn(...)``, its failure turned into one message naming the site and the step."""
        from hsl_lightning.data.files import DataProblems

        try:
            return fn(*args, **kwargs)
        except DataProblems as exc:  # the files are named here, in the site's own log, never to the coordinator
            print(f"hsl: site {self.name}: {exc}", file=sys.stderr, flush=True)
            raise HSLError(f"Site {self.name} failed {what}: {exc.without_paths()} (the site's own log names the "
                           "files; hsl check there reports them all)") from None
        except HSLError as exc:
            raise HSLError(f"Site {self.name} failed {what}: {exc}") from exc
        except SystemExit as exc:  # jsonargparse reports a bad config by exiting
            raise HSLError(f"Site {self.name} failed {what}: the configuration does not parse "
                           f"(exit {exc.code}; see the lines above).") from exc
        except Exception as exc:  # noqa: BLE001 - any failure becomes one message that names the site
            raise HSLError(f"Site {self.name} failed {what}: {type(exc).__name__}: {exc}") from exc

    def _build_data(self) -> list[str]:
        node = self.node
        if hasattr(self.dm, "host"):
            self.dm.host(lambda n: {node})
        self.dm.setup("fit")
        return self.dm.node_names

    def hello(self, request: Hello | None = None) -> HelloReply:
        """What the coordinator needs once: this node's data report (sizes and class counts), the
        external site's and the test pool's sizes, and the packing it will receive."""
        report = self.dm.report()
        own = report[self.node]
        external = next((row for row in report if row.get("external")), None)
        pool = getattr(self.dm, "test_pool", None)
        return HelloReply(node=self.node, name=own["name"], site=self.name, report=own, in_chans=self.dm.in_chans,
                          size=self.dm.size, numel=self.run.packer.numel, extras=self.run.layout.extras,
                          threads=torch.get_num_threads(), n_pool=0 if pool is None else len(pool), external=external,
                          secagg=self.masks.advert() if self.run.secure else None, statistics=self._statistics())

    def _statistics(self) -> dict | None:
        """This node's site statistics under the run's rules made stricter by the site's own (None: not asked)."""
        rules = self.federation.statistics
        if rules is None:
            return None
        from hsl_lightning.data.statistics import node_statistics, salt

        floor = self.statistics_floor
        rules = rules.stricter(floor.get("stats-min-count"), floor.get("stats-noise"),
                               floor.get("fingerprint-salt") or str(self.site_dir.parent / "fingerprint.salt"))
        return node_statistics(self.dm, self.node, rules, salt(rules.salt_file))

    @property
    def masks(self):
        """This site's part of secure aggregation (:class:`~.secagg.SiteMasks`), built on first use."""
        if self._masks is None:
            from hsl_lightning.flower.secagg import SiteMasks, run_id_of

            self._masks = SiteMasks(self.site_dir / "secagg", self.node, self.name, run_id_of(self.config_text),
                                    self.node_key, self.roster)
        return self._masks

    # ------------------------------------------------------------------ state between rounds
    def _state_file(self, completed: int) -> Path:
        return self.site_dir / f"round-{completed:04d}.pt"

    def _load(self, completed: int, merged: torch.Tensor) -> RankState:
        """This site's state after ``completed`` rounds (0: the template's), holding ``merged``."""
        run, fed = self.run, self.federation
        if completed == 0:
            template = clone_state(run.module.state_dict())
            state = RankState.fresh(template, run.packer, run.local_keys, run.mine, run.device)
            fed.strategy.load_state_dict(copy.deepcopy(self._fresh_strategy))
        else:
            path = self._state_file(completed)
            if not path.is_file():
                raise HSLError(f"Site {self.name} has no state after round {completed} in {self.site_dir} (was the "
                               f"site's directory deleted, or did another run use it?); start the run afresh.")
            saved = torch.load(path, map_location="cpu", weights_only=False)
            fed.strategy.load_state_dict(saved["strategy"])
            state = RankState(merged, {t: TraineeState.restore(s, run.packer, run.device)
                                       for t, s in saved["trainees"].items()})
        state.merged = merged.to(run.device)
        return state

    def _save(self, completed: int, state: RankState, keep: list[int]) -> None:
        payload = {"trainees": {t: s.portable(self.run.packer) for t, s in state.trainees.items()},
                   "strategy": self.federation.strategy.state_dict()}
        tmp = self._state_file(completed).with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self._state_file(completed))
        # the rounds the server may still ask for: the deployed one, the one just loaded, the new one
        wanted = {self._state_file(k).name for k in (*keep, completed - 1, completed)}
        for old in self.site_dir.glob("round-*.pt"):
            if old.name not in wanted:
                old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ what the coordinator asks
    def handle(self, request):
        """Answer one :mod:`~hsl_lightning.flower.protocol` request with its reply message."""
        if isinstance(request, Hello):
            return self.hello(request)
        if isinstance(request, Stop):
            print(f"hsl: site {self.name}: the coordinator stopped the run: {request.reason}", flush=True)
            return Stopped(False, node=self.node)
        if isinstance(request, Keys):
            self.masks.accept(request.peers)
            self.masks.check_round(request.completed + 1, [int(p["node"]) for p in request.peers], request.threshold)
            return KeysReply(self.node, request.completed, self.masks.deal(request.completed, request.threshold, True))
        if isinstance(request, Recover):
            return Recovered(self.node, request.completed,
                             self.masks.reveal_keys([int(d) for d in request.dropped], request.completed + 1))
        if not isinstance(request, (Round, Finish)):
            raise HSLError(f"Site {self.name} got a message it does not answer: {type(request).__name__}.")
        merged = torch.as_tensor(request.merged, dtype=torch.float64)
        if merged.shape != (self.run.packer.numel,):
            raise HSLError(f"Site {self.name} received a state of {tuple(merged.shape)} entries but its model has "
                           f"{self.run.packer.numel}: the coordinator and the site built different models (check both "
                           "use the same run config and hsl_lightning version).")
        if isinstance(request, Finish):
            return self.finish(request.completed, merged, request.write_weights, request.info)
        extras = None if request.extras is None else torch.as_tensor(request.extras)
        if request.total_weight is not None:  # this site holds only its own data: the run's total is the coordinator's
            told, own = float(request.total_weight), self.federation.strategy.weight(self.run.n_train[self.node])
            if (self.run.told_total_weight not in (None, told)) or told < own:
                raise HSLError(f"Site {self.name}: the coordinator changed the run's total weight ({told}; before "
                               f"{self.run.told_total_weight}, this site's own {own}). Refused.")
            self.run.told_total_weight = told
        if request.secagg and request.train:  # the peers' keys and the shares dealt to this site for the round
            self.masks.accept(request.secagg["peers"])
            self.masks.check_round(request.completed + 1, [int(a) for a in request.secagg["active"]],
                                   int(request.secagg["threshold"]))
            self.masks.receive(request.completed + 1, request.secagg.get("inbox") or {})
        return self.round(request.completed, merged, extras, request.validate, request.train,
                          [int(k) for k in request.keep], request.secagg)

    def round(self, completed: int, merged: torch.Tensor, extras: torch.Tensor | None, validate: bool,
              train: bool, keep: list[int], secagg: dict | None = None) -> RoundReply:
        """Validate the state received after ``completed`` rounds (``validate``) and train round
        ``completed + 1`` from it (``train``). ``extras``: round ``completed``'s summed strategy
        vectors, which the strategy's ``after_round`` reads before training (SCAFFOLD's server control variate)."""
        fed, run = self.federation, self.run
        if run.secure and train and not secagg:  # checked before anything is loaded or trained
            raise HSLError(f"Site {self.name}: the run sums its contributions securely, but the coordinator's request "
                           f"for round {completed + 1} carries no masking: this site never sends its contribution "
                           "in the clear.")
        state = self._load(completed, merged)
        if extras is not None and completed > 0 and run.layout.extras:
            fed.strategy.after_round(extras.to(run.device), len(run.plan))
        reply = RoundReply(node=self.node, completed=completed)
        if validate:
            metrics = validate_trainees(run, state.trainees, state.merged)[self.node]
            reply.val = {k: metrics[k] for k in METRICS + VAL_EXTRAS}
        if not train:
            return reply
        clock = time.perf_counter()
        message = RoundMessage(run.layout, run.device)
        merge = fed.merge_of(run, state, completed)
        losses = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        for t, outcome in self.trainer.train_round(completed, state, _NoBar()):
            if isinstance(outcome, Exception):
                cause = str(outcome) if isinstance(outcome, HSLError) else f"{type(outcome).__name__}: {outcome}"
                print(f"hsl: site {self.name} (node {run.label(t)}): local training failed in round "
                      f"{round_in_progress(completed)}: {cause}", flush=True)  # the site's own log
                reply.error = f"Site {self.name} (node {run.label(t)}): local training failed: {cause}"
                return reply  # its validation metrics still count
            fed.add_contribution(run, state, message, merge, t, outcome, losses, completed)
        message.traffic.fill_(fed.strategy.traffic(run.module))
        self._save(completed + 1, state, keep)
        if run.secure:  # its quantised contribution (federation/fixedpoint.py), always masked (flower/secagg.py)
            masking, round_no, active = time.perf_counter(), completed + 1, [int(a) for a in secagg["active"]]
            reply.fixed = self.masks.mask(message.fixed.cpu().numpy().view(np.uint64), round_no, active)
            reply.seeds = self.masks.reveal_seeds(round_no, active)
            reply.deal = self.masks.deal(round_no, int(secagg["threshold"]), False)
            reply.mask_s = time.perf_counter() - masking
        else:
            for key, value in compact_message(message.vector.cpu(), run.packer.numel).items():
                setattr(reply, key, value)
        reply.loss, reply.train_s = float(losses[self.node]), time.perf_counter() - clock
        norms = getattr(merge, "norms", None)
        if norms:
            reply.update_norm = float(norms[self.node])
        return reply

    def finish(self, completed: int, merged: torch.Tensor, write_weights: bool, info: dict) -> FinishReply:
        """Score the deployed round (after ``completed`` rounds, holding ``merged``) on this node's
        test set, its view of the test pool and the external site; its validation images' counts at
        every threshold; and write its own deployed model when ``write_weights``."""
        from hsl_lightning.inference import checkpoints

        run = self.run
        state = self._load(completed, merged)
        test = evaluate_trainees(run, state.trainees, state.merged, "test")[self.node]
        external = external_result(run, state.trainees, state.merged)
        counts = threshold_counts(run, state.trainees, state.merged)[self.node]
        reply = FinishReply(node=self.node, completed=completed, test=test, thresholds=counts.numpy(),
                            external=external[0]["node_aucs"][run.names[self.node]] if external else None,
                            peak_rss_mb=_peak_rss_mb())
        if write_weights:
            state.trainees[self.node].load_deployed(run.module, run.packer, state.merged)
            threshold = youden(counts)
            path = self.site_dir / "nodes" / f"{run.names[self.node]}.ckpt"
            checkpoints.write(path, run.module, {**info, "image_size": self.dm.size, "in_chans": self.dm.in_chans,
                                                 "reader": self.dm.reading(),
                                                 "node": run.names[self.node], "threshold": threshold})
            reply.weights = str(path)
        return reply


def answer(site: Site | None, request):
    """``site``'s reply to ``request`` as its worker gives it: a :class:`~.protocol.Failure` naming
    the site for anything that went wrong, and ``busy_s``, the site's own time (the rest of a round
    trip is transport). The in-process sites and the site's worker both answer through it."""
    clock = time.perf_counter()
    completed = getattr(request, "completed", None)
    node = getattr(site, "node", None)
    try:
        if site is None:
            raise HSLError("the site is not built")
        reply = site.handle(request)
    except HSLError as exc:
        reply = Failure(str(exc), node=node, completed=completed)
    except Exception as exc:  # noqa: BLE001 - the coordinator gets one line naming the site; the log has the rest
        traceback.print_exc()
        reply = Failure(f"Site {getattr(site, 'name', '?')}: {type(exc).__name__}: {exc} (traceback in the site's "
                        "log)", node=node, completed=completed)
    reply.busy_s = time.perf_counter() - clock
    return reply


def compact(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as float32 when that holds it exactly (a merged state does: it is rounded to its
    entries' dtypes), else as it is: half the bytes, the same numbers."""
    small = vector.float()
    return small if torch.equal(small.double(), vector) else vector


def compact_message(vector: torch.Tensor, numel: int) -> dict:
    """A site's part of the round's message, in as few bytes as give the same sum: its shared state
    divided by its weight, in float32 when exact (a plain mean: weight x float32 state is exact in
    float64, and so is dividing it back), with the weight and the message's tail (strategy vector,
    traffic, finished flag, weight); else the float64 message itself (DP-FedAvg's noised share)."""
    state, weight = vector[:numel], float(vector[-1])
    if weight > 0:
        per = (state / weight).float()
        if torch.equal(per.double() * weight, state):
            return {"state": per, "weight": weight, "tail": vector[numel:]}
    return {"vector": vector}


def expand_message(reply, total: torch.Tensor, numel: int) -> None:
    """Add a site's part (a :class:`~.protocol.RoundReply` made by :func:`compact_message`) into the
    round's ``total`` message: exactly what the simulator adds for that site (weight x state, then the tail)."""
    if reply.vector is not None:
        total += torch.as_tensor(reply.vector, dtype=torch.float64).to(total.device)
        return
    state = torch.as_tensor(reply.state).to(device=total.device, dtype=torch.float64)
    total[:numel].add_(state, alpha=float(reply.weight))
    total[numel:] += torch.as_tensor(reply.tail, dtype=torch.float64).to(total.device)


class _NoBar:
    """The progress bar a site does not show (the server shows the run's)."""

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

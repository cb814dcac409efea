"""The coordinator's side of a deployed federation: ``hsl fit``'s round loop with the sites far away.

:class:`SitePhases` is the deployment's :class:`~hsl_lightning.federation.phases.RoundPhases`:
:meth:`Federation.run_rounds <hsl_lightning.federation.Federation.run_rounds>` runs the same loop
as the simulator (the merge, ``min_nodes``, patience, the deployed-round rule, the history,
checkpoints, ``summary.json``, W&B, ``model.ckpt``), and the phases that depend on where the
trainees are go to the sites as :mod:`~hsl_lightning.flower.protocol` messages:

- training: every site gets the merged state and replies with its part of the round's message;
  the parts are added in hospital order, never in arrival order, so the sum is the simulator's
  to the last bit;
- validation: each site scores the state it received and replies with aggregate metrics. The
  request also carries the next round's training (the site validates, then trains), so a round
  costs one message; when the run stops instead (the last round, or patience), the speculative
  round is discarded;
- the end: each site scores the deployed round on its test set and writes its own
  ``nodes/<name>.ckpt`` when it deploys a model of its own (its local entries never leave it).

How the messages travel is a :class:`~hsl_lightning.flower.transport.Sites` transport, the one
thing another engine needs to implement (:mod:`hsl_lightning.flower.transport`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from types import SimpleNamespace

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.evaluation import METRICS, VAL_EXTRAS, unscored
from hsl_lightning.federation.message import RoundMessage
from hsl_lightning.federation.phases import RoundPhases
from hsl_lightning.federation.reporting import Reporter
from hsl_lightning.flower.protocol import (Failure, Finish, Hello, Keys, KeysReply, Recover, Recovered, Round,
                                           RoundReply, Stop, round_in_progress)
from hsl_lightning.flower.site import compact, expand_message
from hsl_lightning.flower.transport import LocalSites, Sites, Timeouts

__all__ = ["LocalSites", "RemoteData", "SitePhases", "Sites", "Timeouts"]
from hsl_lightning.metrics import GRID, summarize


class _Split:
    """A split the coordinator knows by its size and class counts only."""

    def __init__(self, n: int, positives: int):
        self.n, self.positives = int(n), int(positives)

    def __len__(self) -> int:
        return self.n


class RemoteData:
    """What the coordinator knows of the sites' data: each node's report (sizes, class counts,
    scanner), from its site's :class:`~.protocol.HelloReply`. Stands in for the data module in the
    round loop's bookkeeping. A site that did not answer keeps its row (``names``: the config's node
    names, where the coordinator can tell them), with empty splits and the reason."""

    def __init__(self, hellos: dict[int, object], count: int, uses_sat: bool, names: list[str] | None = None):
        live = [hellos[i] for i in sorted(hellos) if not isinstance(hellos[i], Failure)]
        if not live:
            raise HSLError("No site could start: " + "; ".join(h.error for h in hellos.values()))
        first = live[0]
        self.in_chans, self.size, self.uses_sat = first.in_chans, first.size, uses_sat
        self.rows, self.nodes = [], []
        for i in range(count):
            hello = hellos.get(i) or Failure("no reply", node=i)
            if isinstance(hello, Failure):
                name = names[i] if names and i < len(names) else f"node{i}"
                row = {"name": name, "unavailable": hello.error,
                       **{f"{k}_{s}": 0 for k in ("n", "pos") for s in ("train", "val", "test")}}
            else:
                row = hello.report
            self.rows.append(row)
            self.nodes.append(SimpleNamespace(name=row["name"], **{
                s: _Split(row[f"n_{s}"], row[f"pos_{s}"]) for s in ("train", "val", "test")}))
        self.test_pool = _Split(first.n_pool, 0) if first.n_pool else None
        external = first.external
        self.external = SimpleNamespace(name=external["name"]) if external else None
        self.external_data = _Split(external["n_test"], external["pos_test"]) if external else None

    def reading(self) -> dict | None:
        """How the sites decoded their files (from their reports): one reading when they decode alike, each site's
        own depth kept under ``depths``; None when they differ otherwise."""
        readings = [row.get("reading") for row in self.rows if "unavailable" not in row]
        if not readings or any(r is None for r in readings):
            return None
        depths = {}  # each site's own choice where the depth is per site ("auto"), merged
        for r in readings:
            depths.update(r.get("init_args", {}).get("depths") or {})
        bare = [{**r, "init_args": {k: v for k, v in r.get("init_args", {}).items() if k not in ("depths", "depth")}}
                for r in readings]
        if any(b != bare[0] for b in bare):
            return None
        chosen = {r.get("init_args", {}).get("depth") for r in readings}
        depth = chosen.pop() if len(chosen) == 1 else "auto"
        return {**bare[0], "init_args": {**bare[0]["init_args"], "depth": depth,
                                         **({"depths": depths} if depths else {})}}

    def setup(self, stage: str | None = None) -> None:
        """Nothing to build: the images stay at the sites."""

    @property
    def node_names(self) -> list[str]:
        """The nodes' names, in hospital order."""
        return [n.name for n in self.nodes]

    def sat_reference(self, k: int = 64):
        """None: the coordinator holds no SAT images."""
        return None

    def report(self) -> list[dict]:
        """Every node's row (and the external site's), as ``data.json`` records it."""
        rows = list(self.rows)
        if self.external is not None:
            rows.append({"name": self.external.name, "external": True, "n_test": self.external_data.n,
                         "pos_test": self.external_data.positives})
        return rows


class DeployedReporter(Reporter):
    """The simulator's reporter, for a coordinator that holds no images and no site's local weights."""

    def __init__(self, phases: "SitePhases", run, state):
        self.phases = phases
        super().__init__(phases.federation, run, state)

    def write_checkpoints(self, best, node_thresholds, pooled):
        if self.one_model:  # the merged state is the whole model: the coordinator writes model.ckpt
            super().write_checkpoints(best, node_thresholds, pooled)
        # otherwise each site wrote nodes/<name>.ckpt into its own directory (its local entries stay there)

    def data_mb(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.float64)

    def at_once(self) -> tuple[int, int]:
        """The sites' training (one institution each, the most threads any site reported), not the coordinator's."""
        threads = [int(info["threads"]) for info in self.phases.site_info.values() if "threads" in info]
        return (1, max(threads)) if threads else super().at_once()

    def summary(self, state, test, wall):
        out = super().summary(state, test, wall)
        for i, node in enumerate(out["nodes"]):  # a failed site keeps its row: NaN, with the reason
            if i in self.phases.dead:
                node["failed"] = self.phases.dead[i]
        out["deployment"] = self.phases.deployment_summary()
        return out


class SitePhases(RoundPhases):
    """A :class:`~hsl_lightning.federation.Federation` (as the run's YAML built it) run with remote
    sites (see the module's docstring): ``SitePhases(federation, sites).fit(model)``."""

    trains_here = False

    def __init__(self, federation, sites: Sites, timeouts: Timeouts | None = None, names: list[str] | None = None):
        if federation.fuse_institutions:
            raise HSLError("fuse_institutions trains many institutions in one process; a deployment trains one per "
                           "site. Set federation.fuse_institutions to false.")
        self.federation, self.sites, self.timeouts, self.names = federation, sites, timeouts or Timeouts(), names
        self.pending: dict[int, dict] = {}  # replies to a round's speculative training, by its 0-based round
        self.extras: dict[int, torch.Tensor] = {}
        self.dead: dict[int, str] = {}  # hospital index -> why it left the run
        self.site_info: dict[int, dict] = {}
        self.weights: dict[str, str] = {}
        self.norms: dict[int, float] = {}
        self.slowest_s: float | None = None  # the slowest site's own time on the last round
        self.completed = 0
        self.adverts: dict[int, dict] = {}  # each site's signed mask key (secure aggregation)
        self.site_statistics: dict[int, dict | None] = {}  # each site's statistics from its hello
        self.active: dict[int, list[int]] = {}  # round -> the sites whose masks its sum holds
        self.masks = None  # CoordinatorMasks when the run sums its messages securely
        self.timing = {"requests": 0, "wait_s": 0.0, "site_busy_s": 0.0, "transport_s": 0.0}

    # ------------------------------------------------------------------ entry point
    def fit(self, model, ckpt_path: str | None = None) -> dict:
        """Run the federation with the sites: ``model`` is the template (the YAML's model); the data is
        the sites' own. When the run fails, every site still connected is told why (:class:`~.protocol.Stop`)."""
        from lightning.fabric import Fabric

        fed = self.federation
        run_dir = fed.run_dir_for(ckpt_path)
        try:
            hellos = self.sites.connect(Hello(), self.timeouts.start_s)
            for i, hello in sorted(hellos.items()):
                if isinstance(hello, Failure):
                    self._site_failed(i, hello.error, 1)
                else:
                    self.site_info[i] = {"name": hello.name, "site": hello.site, "threads": hello.threads}
                    self.site_statistics[i] = hello.statistics
                    if hello.secagg:
                        self.adverts[i] = hello.secagg
            dm = RemoteData(hellos, self.sites.count, getattr(model, "uses_sat", False), self.names)
            fabric = Fabric(accelerator="cpu", devices=1, precision=fed.precision)
            fed.summary = fed.run_rounds(fabric, model, dm, run_dir, ckpt_path, self)
        except BaseException as exc:
            self.stop_sites(set(self.live()), _reason(exc))
            raise
        fed.last_run_dir = run_dir
        return fed.summary

    def live(self) -> list[int]:
        """The sites still in the run, in hospital order."""
        return [i for i in range(self.sites.count) if i not in self.dead]

    def stop_sites(self, which: set[int], reason: str) -> None:
        """Tell sites ``which`` that the run has ended for them and why (best effort: a site that
        cannot be reached learns nothing, and its worker stops on its own)."""
        if not which:
            return
        try:
            self.sites.exchange({i: Stop(self.completed, reason) for i in sorted(which)}, 60.0)
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
            print(f"hsl: could not tell the sites that the run stopped: {exc}", flush=True)

    # ------------------------------------------------------------------ the phases
    def statistics(self, run, rules) -> list[dict | None]:
        """The sites' statistics, as each computed them at hello (None: a site that did not start)."""
        return [self.site_statistics.get(i) for i in range(self.sites.count)]

    def start(self, run, state) -> Reporter:
        federation = self.federation
        if len(run.plan) != self.sites.count:
            raise HSLError(f"Strategy '{federation.strategy.name}' trains {len(run.plan)} model(s) for "
                           f"{self.sites.count} sites; a deployment needs one per site.")
        self.completed = state.rounds_done
        if run.secure:
            self._deal_keys(state.rounds_done)
        return DeployedReporter(self, run, state)

    def _deal_keys(self, completed: int) -> None:
        """Secure aggregation's set-up: every live site checks the others' signed mask keys and deals
        encrypted shares of its secrets (:mod:`~hsl_lightning.flower.secagg`)."""
        from hsl_lightning.flower.secagg import CoordinatorMasks

        live = self.live()
        missing = [self.site_label(i) for i in live if i not in self.adverts]
        if missing:
            raise HSLError(f"Secure aggregation is on, but {', '.join(missing)} announced no mask key (an older "
                           "hsl_lightning?). Update the sites, or set federation.secure_aggregation: false.")
        self.masks = CoordinatorMasks({i: self.adverts[i] for i in live})
        request, clock = Keys(completed, self.masks.peers(), self.masks.t), time.perf_counter()
        replies = self._ask({i: request for i in live}, *self.timeouts.limit(None))
        self.timing["secagg_setup_s"] = time.perf_counter() - clock
        for i in live:
            if not isinstance(replies.get(i), KeysReply):
                self._site_failed(i, getattr(replies.get(i), "error", None) or "no keys", completed + 1)
        self.masks.take_deals({i: r for i, r in replies.items() if isinstance(r, KeysReply)})

    def _keep(self, state) -> list[int]:
        return [state.best.round + 1] if state.best.round >= 0 else []

    def _extras_of(self, run, completed: int) -> torch.Tensor | None:
        """The summed strategy vectors of round ``completed`` (None when the strategy has none, or
        before round 1): kept in memory, and in the run directory so that a resumed coordinator
        can hand them to the sites."""
        if not run.layout.extras or completed < 1:
            return None
        if completed not in self.extras:
            path = run.run_dir / "deployment" / f"extras-{completed:04d}.pt"
            if not path.is_file():
                raise HSLError(f"Cannot resume: {path} (round {completed}'s summed strategy vectors) is missing.")
            self.extras[completed] = torch.load(path, map_location="cpu")
        return self.extras[completed]

    def _round(self, run, state, completed: int, validate: bool, train: bool) -> dict:
        """Ask every live site to validate the state after ``completed`` rounds and/or train the next."""
        timeout, why = self.timeouts.limit(self.slowest_s)
        request = Round(completed, compact(state.merged.cpu()), validate, train, self._keep(state),
                        self._extras_of(run, completed), timeout, total_weight=run.total_weight if run.secure else None)
        live = self.live()
        requests = {i: request for i in live}
        if self.masks is not None and train:  # each site's own shares, and who takes part in the masked sum
            requests = {i: replace(request, secagg=self.masks.request_field(i, live)) for i in live}
            self.active[completed + 1] = live
        replies = self._ask(requests, timeout, why)
        busy = [r.busy_s for r in replies.values() if isinstance(r, RoundReply)]
        if busy:
            self.slowest_s = max(busy)
        return replies

    def _ask(self, requests: dict, timeout: float, why: str) -> dict:
        clock = time.perf_counter()
        replies = self.sites.exchange(requests, timeout)
        waited = time.perf_counter() - clock
        busy = max((float(r.busy_s) for r in replies.values()), default=0.0)
        self.timing["requests"] += 1
        self.timing["wait_s"] += waited
        self.timing["site_busy_s"] += busy  # the slowest site's own time; the rest is transport and polling
        self.timing["transport_s"] += max(0.0, waited - busy)
        self._time_stages(replies)
        for reply in replies.values():
            if isinstance(reply, Failure) and reply.error.startswith("stopped answering"):
                reply.error += f" ({why})"
        return replies

    def _time_stages(self, replies: dict) -> None:
        """Split the round trip of the last reply to arrive (the one the round waited for) into
        Flower's delivery (push to ClientApp process start: the SuperNode's and SuperExec's
        polling and the transfer), the ClientApp process's start, the handover to the site's worker
        and back (decoding, the worker's start on a run's first request, the local socket), the
        site's own work, and the way back (the reply's transfer and the SuperNode's and
        coordinator's polling). Sums per stage, and every request's stages in ``stages``. Needs the
        clocks a deployed site adds (:func:`hsl_lightning.flower.app.answer`); one machine's clock,
        or synchronised ones, for the two middle stages to be exact."""
        timed = [r for r in replies.values() if isinstance(r.clock, dict)
                 and all(isinstance(r.clock.get(k), float) for k in ("pushed", "entered", "left", "pulled"))]
        if not timed:
            return
        reply = max(timed, key=lambda r: r.clock["pulled"])
        last = reply.clock
        spawned = last["spawned"] if isinstance(last.get("spawned"), float) else last["entered"]
        work = min(float(reply.busy_s), last["left"] - last["entered"])
        stages = {"deliver_s": spawned - last["pushed"], "clientapp_start_s": last["entered"] - spawned,
                  "handover_s": last["left"] - last["entered"] - work, "site_work_s": work,
                  "return_s": last["pulled"] - last["left"]}
        self.timing["timed_requests"] = self.timing.get("timed_requests", 0) + 1
        for key, value in stages.items():
            self.timing[key] = self.timing.get(key, 0.0) + value
        self.timing.setdefault("stages", []).append({k[:-2]: round(v, 3) for k, v in stages.items()})

    def train_and_sum(self, run, state, merge, report, r):
        self.completed = r
        replies = self.pending.pop(r, None)
        if replies is None:
            replies = self._round(run, state, r, False, True)
        total = RoundMessage(run.layout, run.device)
        losses = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        self.norms = {}
        trained = {}
        for i in range(self.sites.count):  # hospital order, whatever the order the replies came in
            reply = self._contribution(i, replies, run, r)
            if reply is None:
                continue
            trained[i] = reply
            if not run.secure:
                expand_message(reply, total.vector, run.packer.numel)
            losses[i] = reply.loss
            if reply.update_norm is not None:
                self.norms[i] = reply.update_norm
            report.bar.update(1)
        if run.secure:
            total = self._secure_total(run, trained, r)
        if run.layout.extras:
            self.extras[r + 1] = total.extras.clone().cpu()
            folder = run.run_dir / "deployment"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.extras[r + 1], folder / f"extras-{r + 1:04d}.pt")
        return total, losses

    def _secure_total(self, run, trained: dict, r: int) -> RoundMessage:
        """Round r + 1's message from the sites' masked fixed-point contributions: summed, the masks
        removed (a dropped site's from the others' shares of its key), checked (secure aggregation)."""
        if not trained:
            fixed = torch.zeros(run.layout.size, dtype=torch.int64)
        else:
            def recover(dropped):
                ask = {i: Recover(r, dropped) for i in trained}
                return {i: a for i, a in self._ask(ask, *self.timeouts.limit(self.slowest_s)).items()
                        if isinstance(a, Recovered)}

            active = self.active.pop(r + 1, sorted(trained))
            clock = time.perf_counter()
            fixed = torch.from_numpy(self.masks.total(trained, r + 1, active, recover).copy())
            self.masks.take_deals(trained)
            # the round's added time: the slowest site's masking, and the coordinator's unmasking
            self.timing["secagg_s"] = (self.timing.get("secagg_s", 0.0) + time.perf_counter() - clock
                                       + max(t.mask_s for t in trained.values()))
        return RoundMessage.from_fixed(run.layout, fixed, r + 1)

    def _contribution(self, i: int, replies: dict, run, r: int) -> RoundReply | None:
        """Site i's reply to round r + 1's training, checked; None (reported) when it has none."""
        if i in self.dead:
            return None
        reply = replies.get(i) or Failure("no reply", node=i)
        if isinstance(reply, Failure) or not isinstance(reply, RoundReply) or not reply.trained:
            self._site_failed(i, getattr(reply, "error", None) or "no training result", r + 1)
        elif reply.completed != r:
            self._site_failed(i, f"answered for round {reply.completed + 1}, not round {r + 1}", r + 1)
        elif reply.entries() != run.layout.size:
            self._site_failed(i, f"sent a message of {reply.entries()} entries, expected {run.layout.size} (a "
                                 "different model or strategy?)", r + 1)
        else:
            return reply
        return None

    def update_norms(self, run, merge) -> torch.Tensor:
        norms = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        for i, norm in self.norms.items():
            norms[i] = norm
        return norms

    def validate(self, run, state, r):
        self.completed = r + 1
        ahead = r + 1 < self.federation.rounds  # the next round's training rides on this request
        replies = self._round(run, state, r + 1, True, ahead)
        if ahead:
            self.pending[r + 1] = replies
        metrics = []
        for i in range(self.sites.count):
            reply = replies.get(i)
            val = getattr(reply, "val", None)
            if val is not None and reply.completed != r + 1:
                self._site_failed(i, f"answered for round {reply.completed}, not round {r + 1}", r + 1)
                val = None
            if val is None and i not in self.dead:  # no reply at all: it failed in the round it was asked to train
                self._site_failed(i, getattr(reply, "error", None) or "no validation result",
                                  round_in_progress(r + 1, ahead))
            metrics.append(val or unscored(METRICS + VAL_EXTRAS))
        return metrics

    def finish(self, run, module, state, report):
        self.pending.clear()
        best = state.best
        info = {"round": best.round + 1, "strategy": run.strategy.name, "seed": self.federation.seed,
                "run": str(run.run_dir), "nodes": list(run.names)}
        request = Finish(best.round + 1, compact(best.merged.cpu()), not report.one_model, info)
        replies = self._ask({i: request for i in self.live()},
                            *self.timeouts.limit(self.slowest_s))
        test, aucs, rows = [], [], torch.zeros(len(run.names), 2 * len(GRID) + 2, dtype=torch.float64)
        keys = METRICS + (("pool_auc",) if run.dm.test_pool is not None else ())
        for i in range(self.sites.count):
            reply = replies.get(i)
            scored = getattr(reply, "test", None)
            if scored is not None and reply.completed != best.round + 1:
                self._site_failed(i, f"tested round {reply.completed}, not round {best.round + 1}", None)
                scored = None
            if scored is None and i not in self.dead:
                self._site_failed(i, getattr(reply, "error", "no test result"), None)
            test.append({**unscored(keys), **{k: v for k, v in (scored or {}).items() if k in keys}})
            aucs.append(math.nan if getattr(reply, "external", None) is None else reply.external)
            if scored is not None:
                rows[i] = torch.as_tensor(reply.thresholds, dtype=torch.float64)
                if reply.weights:
                    self.weights[run.names[i]] = reply.weights
        external = []
        if run.dm.external is not None:
            site = run.dm.external_data
            external = [{"name": run.dm.external.name, "n": len(site), "positives": site.positives,
                         "auc": summarize(aucs)["mean"], "node_aucs": dict(zip(run.names, aucs))}]
        if report.one_model:
            best.trainees[run.mine[0]].load_deployed(module, run.packer, best.merged)
        return test, external, rows

    # ------------------------------------------------------------------ failures
    def site_label(self, i: int) -> str:
        """``site 1 (hospital2)``: the index and the name its operator gave it."""
        info = self.site_info.get(i, {})
        name = info.get("site") or info.get("name")
        return f"site {i} ({name})" if name else f"site {i}"

    def _site_failed(self, i: int, cause: str, round_no: int | None) -> None:
        """Site i failed (or stopped answering) during round ``round_no`` (as the progress lines
        number it; None: the final test): stop the run naming it, unless ``min_nodes`` lets the run
        go on without it; it is then told why and left out of every later round."""
        fed, who = self.federation, self.site_label(i)
        name = self.site_info.get(i, {}).get("site")
        if name:  # the site's own message names it (and its node) already
            cause = re.sub(rf"^site {re.escape(name)}( \(node [^)]*\))?:?\s*", "", cause, flags=re.IGNORECASE)
        if round_no is None:
            if fed.min_nodes is None:
                raise HSLError(f"{who} failed in the final test of the deployed round: {cause}.")
            print(f"hsl: {who} failed in the final test: {cause}; its scores are NaN.", flush=True)
        else:
            fed.failed(who, cause, round_no - 1)
        if i not in self.dead:
            self.dead[i] = cause
            when = "the final test" if round_no is None else f"round {round_no}"
            self.stop_sites({i}, f"{who} left the run in {when}: {cause}")

    def deployment_summary(self) -> dict:
        """``summary.json``'s ``deployment``: the sites, those that failed and why, where the
        site-held weights are, and the time the coordinator spent waiting for replies."""
        return {"sites": {str(i): info.get("name") for i, info in sorted(self.site_info.items())},
                "site_names": {str(i): info.get("site") for i, info in sorted(self.site_info.items())},
                "failed": {str(i): cause for i, cause in sorted(self.dead.items())},
                "site_checkpoints": self.weights, "secure_aggregation": self.masks is not None,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.timing.items()}}


def _reason(exc: BaseException) -> str:
    """What a site is told when the run stops on ``exc``."""
    if isinstance(exc, HSLError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "the coordinator's run was interrupted"
    return f"the coordinator's run failed: {type(exc).__name__}: {exc}"


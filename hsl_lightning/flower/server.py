"""The server's side of a deployed federation: ``hsl fit``'s round loop with the sites far away.

:class:`DeployedFederation` is the :class:`~hsl_lightning.federation.Federation` itself with three
phases replaced; everything else (the merge, ``min_nodes``, patience, the deployed-round rule, the
history, checkpoints, ``summary.json``, W&B, ``model.ckpt``) is the simulator's own code:

- training: instead of training its trainees, the server sends every site the merged state and
  adds the sites' replies (each exactly one rank's part of the round's message) in hospital order,
  never in arrival order, so the sum is the simulator's to the last bit;
- validation: each site scores the state it received and replies with aggregate metrics. The
  request also carries the next round's training (the site validates, then trains), so a round
  costs one message; when the run stops instead (the last round, or patience), the speculative
  round is discarded;
- the end: each site scores the deployed round on its test set and writes its own
  ``nodes/<name>.ckpt`` when it deploys a model of its own (its local entries never leave it).

How the requests travel is a :class:`Sites` object: :class:`LocalSites` calls
:class:`~hsl_lightning.flower.site.Site` objects in this process (tests), and
:mod:`hsl_lightning.flower.app` sends them as Flower messages to the SuperNodes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.evaluation import METRICS, VAL_EXTRAS
from hsl_lightning.federation.federation import Federation
from hsl_lightning.federation.message import RoundMessage
from hsl_lightning.federation.reporting import Reporter
from hsl_lightning.flower.site import compact, expand_message
from hsl_lightning.inference.checkpoints import GRID
from hsl_lightning.metrics import summarize


class Sites:
    """The sites of a deployment, addressed by hospital index. Requests and replies are dicts of
    numbers, strings, lists and arrays (the protocol; :meth:`Site.handle` answers them). Each method
    returns one reply per index asked (``{"error": message}`` for a site that failed or did not
    answer); ``skip``: indices not to ask (sites that failed before)."""

    count: int

    def _send(self, requests: dict[int, dict]) -> dict[int, dict]:
        raise NotImplementedError

    def hello(self) -> dict[int, dict]:
        return self._send({i: {"action": "hello"} for i in range(self.count)})

    def round(self, r: int, merged: torch.Tensor, extras: torch.Tensor | None, validate: bool, train: bool,
              keep: list[int], skip: set[int]) -> dict[int, dict]:
        request = {"action": "round", "round": r, "merged": compact(merged), "validate": validate, "train": train,
                   "keep": keep}
        if extras is not None:
            request["extras"] = extras
        return self._send({i: request for i in range(self.count) if i not in skip})

    def finish(self, best_round: int, merged: torch.Tensor, write_weights: bool, info: dict,
               skip: set[int]) -> dict[int, dict]:
        request = {"action": "finish", "best_round": best_round, "merged": compact(merged), "write_weights": write_weights,
                   "info": info}
        return self._send({i: request for i in range(self.count) if i not in skip})


class LocalSites(Sites):
    """Sites answered in this process, in hospital order (the tests' and the benchmark's reference)."""

    def __init__(self, sites: list):
        self.sites, self.count = sites, len(sites)

    def _send(self, requests):
        out = {}
        for i, request in requests.items():
            copied = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in request.items()}
            try:
                out[i] = self.sites[i].handle(copied)
            except HSLError as exc:
                out[i] = {"error": str(exc)}
        return out


class _Split:
    """A split the server knows by its size and class counts only."""

    def __init__(self, n: int, positives: int):
        self.n, self.positives = int(n), int(positives)

    def __len__(self) -> int:
        return self.n


class RemoteData:
    """What the server knows of the sites' data: each node's report (sizes, class counts, scanner),
    from its site's first reply. Stands in for the data module in the round loop's bookkeeping."""

    def __init__(self, hellos: dict[int, dict], count: int, uses_sat: bool):
        live = [hellos[i] for i in sorted(hellos) if "error" not in hellos[i]]
        if not live:
            raise HSLError("No site answered: " + "; ".join(h["error"] for h in hellos.values()))
        first = live[0]
        self.in_chans, self.size, self.uses_sat = first["in_chans"], first["size"], uses_sat
        self.rows, self.nodes = [], []
        for i in range(count):
            hello = hellos.get(i, {"error": "no reply"})
            row = hello.get("report") or {"name": f"site{i}", "unavailable": hello["error"],
                                          **{f"{k}_{s}": 0 for k in ("n", "pos") for s in ("train", "val", "test")}}
            self.rows.append(row)
            self.nodes.append(SimpleNamespace(name=row["name"], **{
                s: _Split(row[f"n_{s}"], row[f"pos_{s}"]) for s in ("train", "val", "test")}))
        self.test_pool = _Split(first["n_pool"], 0) if first.get("n_pool") else None
        external = first.get("external")
        self.external = SimpleNamespace(name=external["name"]) if external else None
        self.external_data = _Split(external["n_test"], external["pos_test"]) if external else None

    def setup(self, stage: str | None = None) -> None:
        """Nothing to build: the images stay at the sites."""

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def sat_reference(self, k: int = 64):
        return None

    def report(self) -> list[dict]:
        rows = list(self.rows)
        if self.external is not None:
            rows.append({"name": self.external.name, "external": True, "n_test": self.external_data.n,
                         "pos_test": self.external_data.positives})
        return rows


class DeployedReporter(Reporter):
    """The simulator's reporter, for a server that holds no images and no site's local weights."""

    def write_checkpoints(self, best, node_thresholds, pooled):
        if self.one_model:  # the merged state is the whole model: the server writes model.ckpt
            super().write_checkpoints(best, node_thresholds, pooled)
        # otherwise each site wrote nodes/<name>.ckpt into its own directory (its local entries stay there)

    def _data_mb(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.float64)

    def at_once(self) -> tuple[int, int]:
        """The sites' training (one institution each, the most threads any site reported), not the server's."""
        threads = [int(info["threads"]) for info in self.federation._site_info.values() if "threads" in info]
        return (1, max(threads)) if threads else super().at_once()

    def summary(self, state, test, wall):
        out = super().summary(state, test, wall)
        out["deployment"] = self.federation.deployment_summary()
        return out


def _nan_metrics(keys) -> dict:
    return {k: math.nan for k in keys}


class DeployedFederation(Federation):
    """A :class:`Federation` whose institutions are remote sites (see the module's docstring)."""

    @classmethod
    def wrap(cls, federation: Federation, sites: Sites) -> "DeployedFederation":
        """The deployed form of ``federation`` (as the run's YAML built it), talking to ``sites``."""
        if federation.fuse_institutions:
            raise HSLError("fuse_institutions trains many institutions in one process; a deployment trains one per "
                           "site. Set federation.fuse_institutions to false.")
        deployed = cls.__new__(cls)
        deployed.__dict__.update(federation.__dict__)
        deployed.sites = sites
        deployed.concurrent_institutions = 1  # the server trains nothing
        deployed._pending, deployed._extras, deployed._dead = {}, {}, {}
        deployed._site_info, deployed._timing = {}, {"requests": 0, "wait_s": 0.0, "site_busy_s": 0.0,
                                                         "transport_s": 0.0}
        return deployed

    # ------------------------------------------------------------------ entry point
    def fit(self, model, datamodule=None, ckpt_path: str | None = None) -> dict:
        """Run the federation with the sites: ``model`` is the template (the YAML's model); the data
        is the sites' own (``datamodule`` is ignored)."""
        from lightning.fabric import Fabric

        if ckpt_path == "last" and self.run_dir is None:
            raise HSLError("ckpt_path 'last' continues a run directory: set federation.run_dir.")
        hellos = self.sites.hello()
        for i, hello in hellos.items():
            if "error" in hello:
                self._site_failed(i, hello["error"], 0)
        self._site_info = {i: {k: h[k] for k in ("name", "site", "threads") if k in h} for i, h in hellos.items()}
        dm = RemoteData(hellos, self.sites.count, getattr(model, "uses_sat", False))
        run_dir = Path(self.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{self.strategy.name}")
        fabric = Fabric(accelerator="cpu", devices=1, precision=self.precision)
        self.summary = self._run(fabric, model, dm, run_dir, ckpt_path)
        self.last_run_dir = run_dir
        return self.summary

    # ------------------------------------------------------------------ the replaced phases
    def _reporter(self, run, state):
        self._run_dir = run.run_dir
        if len(run.plan) != self.sites.count:
            raise HSLError(f"Strategy '{self.strategy.name}' trains {len(run.plan)} model(s) for {self.sites.count} "
                           "sites; a deployment needs one per site.")
        return DeployedReporter(self, run, state)

    def _keep(self, state) -> list[int]:
        return [state.best.round + 1] if state.best.round >= 0 else []

    def _extras_of(self, run, r: int) -> torch.Tensor | None:
        """Round r's summed strategy vectors (None when the strategy has none): kept in memory, and
        in the run directory so that a resumed server can hand them to the sites."""
        if not run.layout.extras or r < 0:
            return None
        if r not in self._extras:
            path = run.run_dir / "deployment" / f"extras-{r + 1:04d}.pt"
            if not path.is_file():
                raise HSLError(f"Cannot resume: {path} (round {r + 1}'s summed strategy vectors) is missing.")
            self._extras[r] = torch.load(path, map_location="cpu")
        return self._extras[r]

    def _ask(self, call, *args):
        clock = time.perf_counter()
        replies = call(*args)
        waited = time.perf_counter() - clock
        busy = max((float(r.get("busy_s", 0.0)) for r in replies.values()), default=0.0)
        self._timing["requests"] += 1
        self._timing["wait_s"] += waited
        self._timing["site_busy_s"] += busy  # the slowest site's own time; the rest is transport and polling
        self._timing["transport_s"] += max(0.0, waited - busy)
        self._time_stages(replies)
        return replies

    def _time_stages(self, replies: dict) -> None:
        """Split the round trip of the last reply to arrive (the one the round waited for) into
        Flower's delivery (server push to ClientApp process start: the SuperNode's and SuperExec's
        polling and the transfer), the ClientApp process's start, the handover to the site's worker
        and back (decoding, the worker's start on a run's first request, the local socket), the
        site's own work, and the way back (the reply's transfer and the SuperNode's and server's
        polling). Sums per stage, and every request's stages in ``stages``. Needs the clocks a
        deployed site adds (:func:`hsl_lightning.flower.app.answer`); one machine's clock, or
        synchronised ones, for the two middle stages to be exact."""
        timed = [r for r in replies.values() if isinstance(r.get("clock"), dict)
                 and all(isinstance(r["clock"].get(k), float) for k in ("pushed", "entered", "left", "pulled"))]
        if not timed:
            return
        reply = max(timed, key=lambda r: r["clock"]["pulled"])
        last = reply["clock"]
        spawned = last["spawned"] if isinstance(last.get("spawned"), float) else last["entered"]
        work = min(float(reply.get("busy_s", 0.0)), last["left"] - last["entered"])
        stages = {"deliver_s": spawned - last["pushed"], "clientapp_start_s": last["entered"] - spawned,
                  "handover_s": last["left"] - last["entered"] - work, "site_work_s": work,
                  "return_s": last["pulled"] - last["left"]}
        self._timing["timed_requests"] = self._timing.get("timed_requests", 0) + 1
        for key, value in stages.items():
            self._timing[key] = self._timing.get(key, 0.0) + value
        self._timing.setdefault("stages", []).append({k[:-2]: round(v, 3) for k, v in stages.items()})

    def _train_and_sum(self, run, state, trainer, merge, report, r):
        replies = self._pending.pop(r, None)
        if replies is None:
            replies = self._ask(self.sites.round, r, state.merged.cpu(), self._extras_of(run, r - 1), False, True,
                                self._keep(state), set(self._dead))
        total = RoundMessage(run.layout, run.device)
        losses = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        self._norms = {}
        for i in range(self.sites.count):  # hospital order, whatever the order the replies came in
            reply = replies.get(i) or {"error": self._dead.get(i, "no reply")}
            if "error" in reply or not ("vector" in reply or "state" in reply):
                self._site_failed(i, reply.get("error", "no training result"), r)
                continue
            sizes = [len(reply[k]) for k in ("vector", "state", "tail") if k in reply]
            if sum(sizes) != run.layout.size:
                self._site_failed(i, f"sent a message of {sum(sizes)} entries, expected {run.layout.size} (a "
                                     "different model or strategy?)", r)
                continue
            expand_message(reply, total.vector, run.packer.numel)
            losses[i] = reply["loss"]
            if "update_norm" in reply:
                self._norms[i] = reply["update_norm"]
            report.bar.update(1)
        if run.layout.extras:
            self._extras[r] = total.extras.clone().cpu()
            folder = run.run_dir / "deployment"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self._extras[r], folder / f"extras-{r + 1:04d}.pt")
        return total, losses

    def _update_norms(self, run, merge) -> torch.Tensor:
        """Every node's update norm before DP clipping this round, as its site reported it."""
        norms = torch.full((len(run.names),), math.nan, dtype=torch.float64)
        for i, norm in self._norms.items():
            norms[i] = norm
        return norms

    def _validate(self, run, state, r):
        if (r + 1) % self.val_every_n_rounds and r != self.rounds - 1:
            return None
        ahead = r + 1 < self.rounds  # the next round's training rides on this request
        replies = self._ask(self.sites.round, r + 1, state.merged.cpu(), self._extras_of(run, r), True, ahead,
                            self._keep(state), set(self._dead))
        if ahead:
            self._pending[r + 1] = replies
        metrics = []
        for i in range(self.sites.count):
            reply = replies.get(i) or {}
            if "val" not in reply and i not in self._dead:
                self._site_failed(i, reply.get("error", "no validation result"), r)
            metrics.append(reply.get("val") or _nan_metrics(METRICS + VAL_EXTRAS))
        return self._judge(state, metrics, r)

    def _finish(self, run, module, state, report, start):
        self._pending.clear()
        best = state.best
        info = {"round": best.round + 1, "strategy": run.strategy.name, "seed": self.seed, "run": str(run.run_dir),
                "nodes": list(run.names)}
        replies = self._ask(self.sites.finish, best.round, best.merged.cpu(), not report.one_model, info,
                            set(self._dead))
        test, aucs, rows = [], [], torch.zeros(len(run.names), 2 * len(GRID) + 2, dtype=torch.float64)
        pool = run.dm.test_pool is not None
        self._weights = {}
        for i in range(self.sites.count):
            reply = replies.get(i) or {}
            if "test" not in reply and i not in self._dead:
                self._site_failed(i, reply.get("error", "no test result"), best.round)
            keys = METRICS + (("pool_auc",) if pool else ())
            test.append({k: reply.get("test", {}).get(k, math.nan) for k in keys})
            aucs.append(math.nan if reply.get("external") is None else reply["external"])
            if "thresholds" in reply:
                rows[i] = torch.as_tensor(reply["thresholds"], dtype=torch.float64)
            if "weights" in reply:
                self._weights[run.names[i]] = reply["weights"]
        external = []
        if run.dm.external is not None:
            site = run.dm.external_data
            external = [{"name": run.dm.external.name, "n": len(site), "positives": site.positives,
                         "auc": summarize(aucs)["mean"], "node_aucs": dict(zip(run.names, aucs))}]
        if report.one_model:
            best.trainees[run.mine[0]].load_deployed(module, run.packer, best.merged)
        return report.finish(state, test, external, rows, start)

    # ------------------------------------------------------------------ failures
    def _site_failed(self, i: int, cause: str, r: int) -> None:
        """A site failed (or did not answer) in round ``r``: stop, naming it, unless ``min_nodes``
        lets the run go on without it (it is then left out of every later round)."""
        info = self._site_info.get(i, {})
        name = info.get("site") or info.get("name") or f"site{i}"
        if not cause.lower().startswith("site"):
            cause = f"site {i} ({name}): {cause}"
        if self.min_nodes is None:
            raise HSLError(f"{cause} [round {r + 1}]. Set federation.min_nodes to go on without a failed site.")
        if i not in self._dead:
            print(f"hsl: {cause}; round {r + 1} goes on without it (min_nodes {self.min_nodes}).")
        self._dead[i] = cause

    def deployment_summary(self) -> dict:
        """``summary.json``'s ``deployment``: the sites, those that failed, where the site-held weights
        are, and the time the server spent waiting for replies."""
        return {"sites": {str(i): info.get("name") for i, info in sorted(self._site_info.items())},
                "site_names": {str(i): info.get("site") for i, info in sorted(self._site_info.items())},
                "failed": {str(i): cause for i, cause in sorted(self._dead.items())},
                "site_checkpoints": getattr(self, "_weights", {}),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in self._timing.items()}}

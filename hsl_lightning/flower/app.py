"""The Flower ServerApp and ClientApp of a deployed federation (flwr >= 1.42, deployment engine).

``server`` (``hsl_lightning.flower.app:server``) runs :class:`~.server.SitePhases` on the
SuperLink's machine; its sites are SuperNodes, addressed through Flower's Grid. ``client``
(``hsl_lightning.flower.app:client``) runs at every SuperNode and forwards each request to the
site's worker (:mod:`~.worker`), which answers it with :class:`~.site.Site`.

The run's configuration is the ``hsl fit`` YAML, carried as text in the run config
(``hsl-config``, written by ``hsl flower app``). A SuperNode's node config says which hospital it
is and where its data and state are:

``node-index`` (required)
    this hospital's index among the config's nodes (0, 1, ...);
``site-dir`` (default ``~/.hsl/sites/<node-index>``)
    where the site keeps its state (one folder per run) and its deployed model;
``data-config`` (optional)
    a YAML file composed on top of the run's config: usually a ``data:`` section with this
    site's own images (an ``ImageFolders`` root or MedMNIST file) and its copy of the SAT data;
``name`` (optional)
    the site's name in messages and logs;
``persistent`` (default true)
    false answers every message in the ClientApp process itself (no worker): slower, simpler;
``approved-runs`` (required to run anything)
    the site's file of approved run digests (:mod:`~.approval`): any other run is refused before a
    worker starts or anything is built.

Every message carries one :mod:`~.protocol` message in the protocol's one encoding: its arrays
in an ``ArrayRecord`` (``arrays``), its JSON header in a ``ConfigRecord`` (``config``).
:class:`FlowerSites` is the coordinator's transport (:class:`~.transport.Sites`) over Flower.

The run config's reply timeouts (:class:`~.transport.Timeouts`): ``start-timeout-s`` (1800: the
sites' first request and first round), ``timeout-factor`` (5) x the slowest site's last round, at
least ``timeout-floor-s`` (300); ``round-timeout-s`` (0: off) a fixed limit instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from hsl_lightning.errors import HSLError
from hsl_lightning.flower import protocol
from hsl_lightning.flower.transport import Sites, Timeouts

server = ServerApp()
client = ClientApp()


# ---------------------------------------------------------------------- the protocol on Flower records
def encode(message) -> RecordDict:
    """A :mod:`~hsl_lightning.flower.protocol` message as Flower records: its encoding's arrays in an
    ``ArrayRecord``, its JSON header in a ``ConfigRecord``."""
    header, arrays = protocol.encode(message)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "config": ConfigRecord({"json": header})})


def decode(content: RecordDict):
    """The message that :func:`encode` put into Flower records."""
    return protocol.decode(content["config"]["json"], {k: a.numpy() for k, a in content["arrays"].items()})


def nbytes(content: RecordDict) -> int:
    """The bytes a message's arrays and JSON carry (Flower's framing aside)."""
    arrays = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in content["arrays"].values())
    return arrays + len(content["config"]["json"])


# ---------------------------------------------------------------------- the client (a SuperNode's)
def _site_setup(context: Context) -> tuple[Path, dict, bool]:
    from hsl_lightning.flower.nodeconfig import load_site_config

    config, node = context.node_config, context.node_config.get("node-index")
    if node is None:
        raise HSLError("This SuperNode has no node-index in its --node-config (e.g. --node-config 'node-index=0'): "
                       "the server cannot tell which hospital it is.")
    name = str(config.get("name") or f"site{node}")
    run_yaml = context.run_config.get("hsl-config")
    if not run_yaml:
        raise HSLError(f"Site {name}: the run has no hsl-config; submit an app made by `hsl flower app`.")
    root = Path(str(config.get("site-dir") or Path.home() / ".hsl" / "sites" / str(node))).expanduser()
    # one folder per run: the same YAML into another --run-dir is another run; a resumed run (same YAML,
    # same run directory) finds its folder again
    run_key = hashlib.sha256(f"{run_yaml}\0{context.run_config.get('run-dir') or ''}".encode()).hexdigest()[:12]
    site_dir = root / f"run-{run_key}"
    try:
        data_config = load_site_config(config.get("data-config"))
    except HSLError as exc:
        raise HSLError(f"Site {name}: {exc}") from exc
    setup = {"config": str(run_yaml), "node": int(node), "data_config": data_config, "name": name,
             "site_dir": str(site_dir), "node_key": config.get("node-key"), "roster": config.get("consortium-keys"),
             "statistics": {key: config.get(key) for key in ("stats-min-count", "stats-noise", "fingerprint-salt")}}
    persistent = str(config.get("persistent", "true")).lower() not in ("false", "0", "no")
    return site_dir, setup, persistent


_IN_PROCESS: dict = {}  # persistent=false: the site of this (short-lived) process


def _process_started() -> float | None:
    """When this process started (Unix time), from /proc; None where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _answer(request, context: Context):
    """The site's reply to ``request``: from its worker (started on the run's first request), or in
    this process (``persistent=false``)."""
    site_dir, setup, persistent = _site_setup(context)
    if isinstance(request, protocol.Stop):
        # the site's operator sees why the run ended, in the SuperNode's output as in the worker's log
        print(f"hsl: site {setup['name']}: the coordinator stopped the run: {request.reason}", flush=True)
        if not persistent or not site_dir.is_dir():
            return protocol.Stopped(False)  # nothing outlives this process; no worker ever ran this run here
    else:  # a site runs only what it approved, before any worker starts (a Stop can only end one: honoured)
        from hsl_lightning.flower.approval import check_run

        check_run(context.node_config, context.run_config, setup["name"], setup.get("data_config"))
    from hsl_lightning.flower import worker

    if not persistent:  # the worker's own handling, in this process
        _IN_PROCESS["site"], reply = worker.handle(_IN_PROCESS.get("site"), setup, request)
        return reply
    return protocol.decode(*worker.call(site_dir, setup, protocol.encode(request)))


@client.query()
def answer(msg: Message, context: Context) -> Message:
    """Answer one request of the coordinator, from the site's worker (or in this process)."""
    entered = time.time()
    completed = None
    try:
        request = decode(msg.content)
        completed = getattr(request, "completed", None)
        reply = _answer(request, context)
    except (HSLError, RuntimeError, OSError) as exc:
        reply = protocol.Failure(str(exc), completed=completed)
    if getattr(reply, "node", None) is None and context.node_config.get("node-index") is not None:
        reply.node = int(context.node_config["node-index"])
    if isinstance(reply, protocol.Failure):
        print(f"hsl: {reply.error}", flush=True)  # the site's operator sees what the coordinator is told
    # when Flower started this ClientApp process, when it handed over the message, and when the answer
    # was ready: the coordinator splits a round trip into Flower's delivery, the process start, the site's
    # work and the way back (timestamps only; nothing about the data)
    reply.clock = {"spawned": _process_started(), "entered": entered, "left": time.time()}
    return Message(content=encode(reply), reply_to=msg)


# ---------------------------------------------------------------------- the server (the SuperLink's)
def flower_error(code: int, reason: str) -> str:
    """A Flower error reply in the coordinator's words: a SuperNode that stopped sending heartbeats
    (NODE_UNAVAILABLE) or a message that expired unanswered has stopped answering."""
    from flwr.common.constant import ErrorCode

    if code in (getattr(ErrorCode, "NODE_UNAVAILABLE", -1), getattr(ErrorCode, "MESSAGE_UNAVAILABLE", -1)):
        return f"stopped answering: its SuperNode is gone or the message expired (Flower error {code}: {reason})"
    return f"Flower error {code}: {reason}"


class FlowerSites(Sites):
    """The sites as SuperNodes: requests pushed through the Grid, replies pulled every ``poll_s``
    and put in hospital order (Flower's node ids are random; each site says its index)."""

    def __init__(self, grid: Grid, count: int, wait_s: float, poll_s: float = 0.1):
        self.grid, self.count, self.wait_s, self.poll_s = grid, count, wait_s, poll_s
        self.node_of: dict[int, int] = {}  # hospital index -> Flower node id
        self.unknown: list[int] = []  # SuperNodes that connected but never said which hospital they are
        self.bytes_sent, self.bytes_received, self.exchanges = 0, 0, 0

    def _push(self, requests: dict[int, object], timeout_s: float) -> dict[str, int]:
        """Push one message per Flower node id; their message ids -> node ids."""
        built = []
        for node_id, payload in requests.items():
            content = encode(payload)
            self.bytes_sent += nbytes(content)
            # Flower's own expiry comes after ours, so that a silent site is reported as such, not as an expired message
            built.append(Message(content, node_id, MessageType.QUERY, ttl=timeout_s + 600,
                                 group_id=str(getattr(payload, "completed", 0))))
        return dict(zip(self.grid.push_messages(built), requests))

    def _pull(self, ids: dict[str, int], timeout_s: float) -> dict[int, object]:
        replies, pushed, deadline = {}, time.time(), time.monotonic() + timeout_s
        while len(replies) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m in ids if ids[m] not in replies]):
                node_id = ids.get(reply.metadata.reply_to_message_id)
                if node_id is None:
                    continue
                if reply.has_error():
                    replies[node_id] = protocol.Failure(flower_error(reply.error.code, reply.error.reason))
                    continue
                self.bytes_received += nbytes(reply.content)
                replies[node_id] = decode(reply.content)
                if isinstance(replies[node_id].clock, dict):
                    replies[node_id].clock.update(pushed=pushed, pulled=time.time())
            if len(replies) < len(ids):
                time.sleep(self.poll_s)
        return replies

    def _by_node(self, requests: dict[int, object], timeout_s: float) -> dict[int, object]:
        """One request per Flower node id; every reply (or a Failure saying the site stopped answering)."""
        replies = self._pull(self._push(requests, timeout_s), timeout_s) if requests else {}
        for node_id in requests:
            replies.setdefault(node_id, protocol.Failure(f"stopped answering: no reply within {timeout_s:.0f} s"))
        self.exchanges += 1
        return replies

    def connect(self, hello, timeout_s: float) -> dict[int, object]:
        """Wait for the sites to connect, ask each which hospital it is, and map the answers."""
        deadline = time.monotonic() + self.wait_s
        nodes = set(self.grid.get_node_ids())
        while len(nodes) < self.count and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = set(self.grid.get_node_ids())
        print(f"hsl: {len(nodes)} of {self.count} site(s) connected", flush=True)
        answers = self._by_node({node_id: hello for node_id in nodes}, timeout_s)
        out = {}
        for node_id, reply in answers.items():
            index = reply.node
            if index is None or not 0 <= int(index) < self.count:
                self.unknown.append(node_id)
                print(f"hsl: a SuperNode (Flower node {node_id}) connected but gave no valid node-index: "
                      f"{getattr(reply, 'error', reply)}", flush=True)
                continue
            index = int(index)
            if index in self.node_of:
                raise HSLError(f"Two SuperNodes say they are node-index {index}; give each site its own index.")
            self.node_of[index] = node_id
            out[index] = reply
        for i in range(self.count):
            out.setdefault(i, protocol.Failure(f"no SuperNode with node-index {i} connected within "
                                               f"{self.wait_s:.0f} s", node=i))
        return out

    def exchange(self, requests: dict[int, object], timeout_s: float) -> dict[int, object]:
        by_node = {self.node_of[i]: request for i, request in requests.items() if i in self.node_of}
        stops = [r for r in requests.values() if isinstance(r, protocol.Stop)]
        if stops and self.unknown:  # a SuperNode that never said which hospital it is hears why the run ended too
            by_node.update({node_id: stops[0] for node_id in self.unknown})
        answers = self._by_node(by_node, timeout_s)
        out = {i: answers[self.node_of[i]] for i in requests if i in self.node_of}
        for i in requests:
            out.setdefault(i, protocol.Failure(f"site {i} is not connected", node=i))
        return out


def timeouts_of(cfg) -> Timeouts:
    """The run config's reply timeouts (see :class:`~hsl_lightning.flower.server.Timeouts`)."""
    def number(key, default):
        try:
            return float(cfg.get(key, default))
        except (TypeError, ValueError) as exc:
            raise HSLError(f"Run config {key} must be a number of seconds, got {cfg.get(key)!r}.") from exc

    return Timeouts(start_s=number("start-timeout-s", 1800), factor=number("timeout-factor", 5),
                    floor_s=number("timeout-floor-s", 300), fixed_s=number("round-timeout-s", 0) or None)


@server.main()
def run(grid: Grid, context: Context) -> None:
    """The ServerApp: build the run from its hsl-config and run the deployed federation."""
    import tempfile

    from hsl_lightning.flower.server import SitePhases
    from hsl_lightning.flower.site import read_config

    cfg = context.run_config
    text = cfg.get("hsl-config")
    if not text:
        raise HSLError("The run has no hsl-config: make the app with `hsl flower app --config RUN.yaml`.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(str(text))
        args = ["--config", str(path)]
        if cfg.get("run-dir"):
            args += ["--federation.run_dir", str(cfg["run-dir"])]
        cli = read_config(args)
    listed = getattr(cli.datamodule.primary, "nodes", None)  # ImageFolders(nodes=[...]): the sites' folders
    count = len(cli.trainer.strategy.plan(len(listed) if listed else int(cli.datamodule.scenario.num_nodes)))
    sites = FlowerSites(grid, count, float(cfg.get("wait-for-sites-s", 600)), float(cfg.get("poll-s", 0.1)))
    phases = SitePhases(cli.trainer, sites, timeouts_of(cfg), names=list(listed) if listed else None)
    summary = phases.fit(cli.model, ckpt_path=str(cfg.get("ckpt-path") or "") or None)  # tells the sites if it fails
    run_dir = Path(cli.trainer.last_run_dir)
    traffic = {"bytes_sent": sites.bytes_sent, "bytes_received": sites.bytes_received, "exchanges": sites.exchanges}
    out = run_dir / "deployment" / "traffic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(traffic, indent=2))
    print(f"hsl: deployed run written to {run_dir} (mean test AUC {summary['mean_test_auc']:.4f})", flush=True)


def app_pyproject(config_text: str, name: str = "hsl-run", run_dir: str | None = None) -> str:
    """The pyproject.toml of a Flower app that runs ``config_text`` (an ``hsl fit`` YAML)."""
    def toml_string(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid TOML basic string

    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", f"name = {toml_string(name)}", 'version = "1.0.0"',
             'description = "An hsl_lightning federation (hsl flower app)"', "dependencies = []", "",
             "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
             "[tool.flwr.app]", 'publisher = "hsl_lightning"', "",
             "[tool.flwr.app.components]", 'serverapp = "hsl_lightning.flower.app:server"',
             'clientapp = "hsl_lightning.flower.app:client"', "",
             "[tool.flwr.app.config]", f"hsl-config = {toml_string(config_text)}",
             f"run-dir = {toml_string(run_dir or '')}", 'ckpt-path = ""', "start-timeout-s = 1800",
             "timeout-factor = 5", "timeout-floor-s = 300", "round-timeout-s = 0", "wait-for-sites-s = 600",
             "poll-s = 0.1", ""]
    return "\n".join(lines)


def write_app(config: str | os.PathLike, out: str | os.PathLike, run_dir: str | None = None) -> Path:
    """``hsl flower app``: a Flower app folder that runs the ``hsl fit`` config ``config``."""
    config, out = Path(config), Path(out)
    if not config.is_file():
        raise HSLError(f"Config file {config} does not exist.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(app_pyproject(config.read_text(), out.resolve().name.replace("_", "-"),
                                                      run_dir))
    from hsl_lightning.flower.approval import write_digest

    write_digest(out)  # DIGEST.txt: what each site approves (hsl flower approve)
    return out

"""The Flower ServerApp and ClientApp of a deployed federation (flwr >= 1.42, deployment engine).

``server`` (``hsl_lightning.flower.app:server``) runs :class:`~.server.DeployedFederation` on the
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
    false answers every message in the ClientApp process itself (no worker): slower, simpler.

Every message carries one request of the protocol of :class:`~.server.Sites`: arrays in an
``ArrayRecord`` (``arrays``), everything else as JSON in a ``ConfigRecord`` (``config``).
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

server = ServerApp()
client = ClientApp()


# ---------------------------------------------------------------------- the protocol on Flower records
def encode(payload: dict) -> RecordDict:
    """A request or reply as Flower records: arrays (torch or numpy) apart, the rest as JSON."""
    arrays, rest = {}, {}
    for key, value in payload.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        else:
            rest[key] = value
    return RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"json": json.dumps(rest)})})


def decode(content: RecordDict) -> dict:
    """The request or reply that :func:`encode` put into Flower records."""
    payload = json.loads(content["config"]["json"])
    payload.update({key: array.numpy() for key, array in content["arrays"].items()})
    return payload


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
             "site_dir": str(site_dir)}
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


@client.query()
def answer(msg: Message, context: Context) -> Message:
    """Answer one request of the server, from the site's worker (or in this process)."""
    entered = time.time()
    request = decode(msg.content)
    try:
        site_dir, setup, persistent = _site_setup(context)
        if not persistent and request.get("action") == "stop":
            reply = {"stopped": False}  # nothing outlives this process
        elif persistent:
            from hsl_lightning.flower import worker

            reply = worker.call(site_dir, setup, request)
        else:
            from hsl_lightning.flower import worker

            site, reply = worker.handle(_IN_PROCESS.get("site"), setup, request)
            _IN_PROCESS["site"] = site
    except (HSLError, RuntimeError, OSError) as exc:
        reply = {"error": str(exc)}
    reply.setdefault("node", context.node_config.get("node-index"))
    # when Flower started this ClientApp process, when it handed over the message, and when the answer
    # was ready: the server splits a round trip into Flower's delivery, the process start, the site's
    # work and the way back (timestamps only; nothing about the data)
    reply["clock"] = {"spawned": _process_started(), "entered": entered, "left": time.time()}
    return Message(content=encode(reply), reply_to=msg)


# ---------------------------------------------------------------------- the server (the SuperLink's)
class FlowerSites:
    """The sites as SuperNodes: requests pushed through the Grid, replies pulled every ``poll_s``
    and put in hospital order (Flower's node ids are random; each site says its index)."""

    def __init__(self, grid: Grid, count: int, timeout_s: float, wait_s: float, poll_s: float = 0.1):
        self.grid, self.count, self.timeout_s, self.wait_s, self.poll_s = grid, count, timeout_s, wait_s, poll_s
        self.node_of: dict[int, int] = {}  # hospital index -> Flower node id
        self.bytes_sent, self.bytes_received, self.exchanges = 0, 0, 0

    def _exchange(self, requests: dict[int, dict], timeout_s: float | None = None) -> dict[int, dict]:
        """Push one message per Flower node id and wait for every reply (or the timeout: ``timeout_s``,
        default the run's round timeout)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        messages, ids = [], {}
        for node_id, payload in requests.items():
            content = encode(payload)
            self.bytes_sent += nbytes(content)
            messages.append(Message(content, node_id, MessageType.QUERY, ttl=timeout_s,
                                    group_id=str(payload.get("round", 0))))
        pushed = time.time()
        for node_id, message_id in zip(requests, self.grid.push_messages(messages)):
            ids[message_id] = node_id
        replies, deadline = {}, time.monotonic() + timeout_s
        while len(replies) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m in ids if ids[m] not in replies]):
                node_id = ids.get(reply.metadata.reply_to_message_id)
                if node_id is None:
                    continue
                if reply.has_error():
                    replies[node_id] = {"error": f"Flower error {reply.error.code}: {reply.error.reason}"}
                else:
                    self.bytes_received += nbytes(reply.content)
                    replies[node_id] = decode(reply.content)
                    clock = replies[node_id].get("clock")
                    if isinstance(clock, dict):
                        clock.update(pushed=pushed, pulled=time.time())
            if len(replies) < len(ids):
                time.sleep(self.poll_s)
        for node_id in requests:
            replies.setdefault(node_id, {"error": f"no reply within {timeout_s:.0f} s (disconnected?)"})
        self.exchanges += 1
        return replies

    def hello(self) -> dict[int, dict]:
        """Wait for the sites to connect, ask each which hospital it is, and map the answers."""
        deadline = time.monotonic() + self.wait_s
        nodes = set(self.grid.get_node_ids())
        while len(nodes) < self.count and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = set(self.grid.get_node_ids())
        print(f"hsl: {len(nodes)} of {self.count} site(s) connected", flush=True)
        answers = self._exchange({node_id: {"action": "hello"} for node_id in nodes})
        out = {}
        for node_id, reply in answers.items():
            index = reply.get("node")
            if index is None or not 0 <= int(index) < self.count:
                print(f"hsl: a SuperNode (Flower node {node_id}) gave no valid node-index: {reply.get('error', reply)}")
                continue
            index = int(index)
            if index in self.node_of:
                raise HSLError(f"Two SuperNodes say they are node-index {index}; give each site its own index.")
            self.node_of[index] = node_id
            out[index] = reply
        for i in range(self.count):
            out.setdefault(i, {"error": f"site {i}: no SuperNode with node-index {i} connected within "
                                        f"{self.wait_s:.0f} s"})
        return out

    def stop(self, timeout_s: float = 60.0) -> None:
        """Tell every connected site that the run has stopped, so its worker exits now (best effort:
        a site that does not answer within ``timeout_s`` keeps its worker until it idles out)."""
        if not self.node_of:
            return
        try:
            self._exchange({node_id: {"action": "stop"} for node_id in self.node_of.values()},
                           min(self.timeout_s, timeout_s))
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
            print(f"hsl: could not tell the sites to stop their workers: {exc}", flush=True)

    def _send(self, requests: dict[int, dict]) -> dict[int, dict]:
        by_node = {self.node_of[i]: request for i, request in requests.items() if i in self.node_of}
        answers = self._exchange(by_node)
        out = {i: answers[self.node_of[i]] for i in requests if i in self.node_of}
        for i in requests:
            out.setdefault(i, {"error": f"site {i} is not connected"})
        return out


def _flower_sites_class():
    from hsl_lightning.flower.server import Sites

    class _FlowerSites(FlowerSites, Sites):
        """FlowerSites with the protocol's request builders."""

    return _FlowerSites


@server.main()
def run(grid: Grid, context: Context) -> None:
    """The ServerApp: build the run from its hsl-config and run the deployed federation."""
    import tempfile

    from hsl_lightning.flower.server import DeployedFederation
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
    sites = _flower_sites_class()(grid, count, float(cfg.get("round-timeout-s", 3600)),
                                  float(cfg.get("wait-for-sites-s", 600)), float(cfg.get("poll-s", 0.1)))
    federation = DeployedFederation.wrap(cli.trainer, sites)
    ckpt = str(cfg.get("ckpt-path") or "") or None
    try:
        summary = federation.fit(cli.model, ckpt_path=ckpt)
    except BaseException:
        sites.stop()  # the sites' workers would otherwise hold their data and model for IDLE_S
        raise
    traffic = {"bytes_sent": sites.bytes_sent, "bytes_received": sites.bytes_received, "exchanges": sites.exchanges}
    out = Path(federation.last_run_dir) / "deployment" / "traffic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(traffic, indent=2))
    print(f"hsl: deployed run written to {federation.last_run_dir} (mean test AUC {summary['mean_test_auc']:.4f})",
          flush=True)


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
             f"run-dir = {toml_string(run_dir or '')}", 'ckpt-path = ""', "round-timeout-s = 3600",
             "wait-for-sites-s = 600", "poll-s = 0.1", ""]
    return "\n".join(lines)


def write_app(config: str | os.PathLike, out: str | os.PathLike, run_dir: str | None = None) -> Path:
    """``hsl flower app``: a Flower app folder that runs the ``hsl fit`` config ``config``."""
    config, out = Path(config), Path(out)
    if not config.is_file():
        raise HSLError(f"Config file {config} does not exist.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(app_pyproject(config.read_text(), out.resolve().name.replace("_", "-"),
                                                      run_dir))
    return out

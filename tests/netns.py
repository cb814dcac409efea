"""Linux network namespaces for the deployment test (tests/test_flower_deploy.py): the coordinator
and 3 hospitals each in a namespace of its own, as on four machines of one LAN.

The layout (made by :func:`namespaces`, removed on leaving it, also when the test fails):

- ``<tag>-lan``: a namespace holding only the bridge ``br0`` (no address): the LAN's switch;
- ``<tag>-coord``: the coordinator, ``10.231.7.1/24`` on ``eth0``: the SuperLink on its own
  127.0.0.1, nginx (``hsl flower proxy``) on ``10.231.7.1:8443``, the ServerApps and the ``flwr`` CLI;
- ``<tag>-hospitalN``: site N, ``10.231.7.1N/24`` (.11, .12, .13) on ``eth0``: ``hsl flower supernode`` (its
  ClientApps and its worker inherit the namespace);
- each node's ``eth0`` is one end of a veth pair whose other end is a port of ``br0``; every veth is
  made in the bridge's namespace with its peer put straight into the node's, so the root namespace
  gets no interface, no address and no route (checked), and the test's traffic never leaves them;
- ``/etc/netns/<ns>/hosts`` (``ip netns exec`` bind-mounts it over ``/etc/hosts``) maps
  ``superlink.example.org`` to ``10.231.7.1``: the sites dial the coordinator by name, and the
  certificate names that host (``hsl flower keys --hosts superlink.example.org``).

Making them needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN, iproute2's ``ip``, nginx and a writable
/etc; :data:`HOW` says how to get them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hsl_lightning.flower.proxy import nginx_binary

HOST = "superlink.example.org"  # the sites' name for the coordinator
SUBNET = "10.231.7"  # 10.231.7.0/24: used only inside the test's namespaces
COORDINATOR_IP = f"{SUBNET}.1"
PROXY_PORT = 8443
SITES = ["hospital1", "hospital2", "hospital3"]
NETNS_DIR = Path("/var/run/netns")  # where `ip netns add` mounts a namespace
ETC_NETNS = Path("/etc/netns")  # what `ip netns exec` bind-mounts over /etc
PREFIX = "hslns"  # the test's namespace names: hslns<pid>-<role>
HOW = ("To make them: run the suite as root on Linux (CI's .ci/run is root) with iproute2 installed "
       "(`apt-get install iproute2`), CAP_NET_ADMIN and CAP_SYS_ADMIN (`ip netns add` mounts the namespace; in a "
       "container: `docker run --cap-add NET_ADMIN --cap-add SYS_ADMIN ...`, or `--privileged`).")

#: run inside a namespace: ``python -c PROBE '{"ca": ..., "resolve": {name: host}, "connect": {name: [host,
#: port]}, "tls": {name: address}, "http": {name: [address, path]}}'``; prints one JSON object of the answers
PROBE = r"""
import json, socket, sys
from hsl_lightning.flower.commands import check_tls
from hsl_lightning.flower.proxy import http_status
args, out = json.loads(sys.argv[1]), {}
def failure(exc):
    return "refused" if isinstance(exc, ConnectionRefusedError) else f"{type(exc).__name__}: {exc}"
for name, host in args.get("resolve", {}).items():
    try:
        out[name] = socket.gethostbyname(host)
    except OSError as exc:
        out[name] = failure(exc)
for name, (host, port) in args.get("connect", {}).items():
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        out[name] = "open"
    except OSError as exc:
        out[name] = failure(exc)
for name, address in args.get("tls", {}).items():
    try:
        check_tls(address, args["ca"], "probe", timeout=5)
        out[name] = "ok"
    except Exception as exc:
        out[name] = str(exc)
for name, (address, path) in args.get("http", {}).items():
    try:
        out[name] = http_status(address, path, args["ca"])
    except OSError as exc:
        out[name] = failure(exc)
print(json.dumps(out))
"""


class CannotMake(Exception):
    """The namespaces, the bridge or the veth pairs cannot be made here: the test skips."""


def _ip_binary() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
                                       if os.access(p, os.X_OK)), None)


def _why_not() -> str | None:
    """Why this machine cannot make the test's namespaces (None: it can try)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux's; this is {sys.platform}."
    if os.geteuid() != 0:
        return f"making network namespaces needs root; this runs as uid {os.geteuid()}."
    if _ip_binary() is None:
        return "the `ip` command (iproute2) is not installed."
    status = Path("/proc/self/status").read_text()
    caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    missing = [name for name, bit in (("CAP_NET_ADMIN", 12), ("CAP_SYS_ADMIN", 21)) if not caps & (1 << bit)]
    if missing:
        return f"this process lacks {' and '.join(missing)}."
    if nginx_binary() is None:
        return "nginx is not installed, and the sites must reach the SuperLink through the proxy."
    if not os.access("/etc", os.W_OK):
        return "/etc is not writable, so no /etc/netns/<ns>/hosts can name the coordinator."
    used = subprocess.run([_ip_binary(), "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    if f" {SUBNET}." in used:
        return f"this machine's own network already uses {SUBNET}.0/24, the test's private range."
    return None


def _net_id(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Network:
    """The bridge's namespace, the coordinator's and one per site (see the module's doc)."""

    def __init__(self, tag: str):
        self.ip = _ip_binary()
        self.lan, self.coordinator = f"{tag}-lan", f"{tag}-coord"
        self.sites = {site: f"{tag}-{site}" for site in SITES}
        self.addresses = {self.coordinator: COORDINATOR_IP,
                          **{ns: f"{SUBNET}.{11 + i}" for i, ns in enumerate(self.sites.values())}}
        self.made: list[str] = []  # namespaces, in the order made
        self.ids: dict[tuple[int, int], str] = {}  # a namespace's (device, inode): its name
        self.etc: list[Path] = []
        self.made_etc_netns = False
        self.root_before = self.root_state()

    # --------------------------------------------------------------------------------- helpers
    def exec(self, ns: str) -> list[str]:
        return [self.ip, "netns", "exec", ns]

    @property
    def wrap(self) -> dict[str, list[str]]:
        """Localhost's command prefix per role: the coordinator's namespace, each site's own."""
        return {"coordinator": self.exec(self.coordinator), **{s: self.exec(ns) for s, ns in self.sites.items()}}

    def _run(self, *args: str, skip: bool = False) -> str:
        done = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=30)
        if done.returncode:
            message = f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
            raise CannotMake(message) if skip else RuntimeError(message)
        return done.stdout

    def root_state(self) -> tuple[str, str]:
        """The root namespace's interfaces and routes (the test must leave both as they were)."""
        links = subprocess.run([_ip_binary(), "-o", "link", "show"], capture_output=True, text=True).stdout
        routes = subprocess.run([_ip_binary(), "-o", "route", "show", "table", "all"], capture_output=True,
                                text=True).stdout
        names = "\n".join(sorted(re.sub(r"^\d+: ", "", line).split(":")[0] for line in links.splitlines()))
        return names, routes

    def namespace_of(self, pid: int) -> str | None:
        """The name of the test's namespace that process ``pid`` is in ("root" for this process's own)."""
        net = _net_id(f"/proc/{pid}/ns/net")
        if net is not None and net == _net_id("/proc/self/ns/net"):
            return "root"
        return self.ids.get(net)

    def processes(self) -> dict[int, str]:
        """Every process in one of the test's namespaces: pid -> namespace."""
        found = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                ns = self.ids.get(_net_id(f"/proc/{entry}/ns/net") or (-1, -1))
                if ns is not None:
                    found[int(entry)] = ns
        return found

    # --------------------------------------------------------------------------------- up and down
    def add(self, ns: str) -> None:
        self._run("netns", "add", ns, skip=True)
        self.made.append(ns)
        net = _net_id(NETNS_DIR / ns)
        if net is None:
            raise RuntimeError(f"`ip netns add {ns}` left no {NETNS_DIR / ns}")
        self.ids[net] = ns

    def up(self) -> None:
        self.add(self.lan)  # the LAN's switch: a bridge with no address, in a namespace of its own
        self._run("-n", self.lan, "link", "add", "br0", "type", "bridge", skip=True)
        self._run("-n", self.lan, "link", "set", "br0", "up")
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir()
            self.made_etc_netns = True
        hosts = "".join(line + "\n" for line in Path("/etc/hosts").read_text().splitlines() if HOST not in line)
        for i, (ns, address) in enumerate(self.addresses.items()):
            self.add(ns)
            port = f"port{i}"  # the bridge's end, in the bridge's namespace; the node's end is its eth0
            self._run("-n", self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                      skip=True)
            self._run("-n", self.lan, "link", "set", port, "master", "br0")
            self._run("-n", self.lan, "link", "set", port, "up")
            self._run("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self._run("-n", ns, "link", "set", "eth0", "up")
            self._run("-n", ns, "link", "set", "lo", "up")
            etc = ETC_NETNS / ns
            etc.mkdir()
            self.etc.append(etc)
            (etc / "hosts").write_text(hosts + f"{COORDINATOR_IP} {HOST}\n")

    def kill_all(self, grace_s: float = 10.0) -> list[str]:
        """SIGTERM every process in the test's namespaces, SIGKILL what is left after ``grace_s``; the
        command lines of any that survive even that."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            deadline = time.monotonic() + wait_s
            while True:
                alive = self.processes()
                if not alive or time.monotonic() > deadline:
                    break
                for pid in alive:  # each process, never a group: a group may hold this test's own process
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
                time.sleep(0.2)
        return [f"{pid} in {ns}: {_cmdline(pid)}" for pid, ns in self.processes().items()]

    def down(self) -> list[str]:
        """Remove everything ``up`` made; what could not be removed (empty when all went)."""
        left = self.kill_all()
        for ns in reversed(self.made):  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, timeout=30)
        for etc in self.etc:
            shutil.rmtree(etc, ignore_errors=True)
        if self.made_etc_netns:
            try:
                ETC_NETNS.rmdir()
            except OSError:
                pass
        left += [f"namespace {ns}" for ns in self.made if (NETNS_DIR / ns).exists()]
        left += [f"folder {etc}" for etc in self.etc if etc.exists()]
        if self.root_state() != self.root_before:
            left.append(f"the root namespace's interfaces or routes changed:\n{self.root_state()}\nwere\n"
                        f"{self.root_before}")
        return left


def _remove_stale() -> None:
    """Namespaces an earlier run of this test left (its process killed before its teardown)."""
    names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    stale = [n for n in names if (m := re.fullmatch(rf"{PREFIX}(\d+)-.+", n)) and not Path(f"/proc/{m[1]}").exists()]
    if stale:
        old = Network("stale")
        old.made = stale
        old.ids = {net: n for n in stale if (net := _net_id(NETNS_DIR / n)) is not None}
        old.etc = [ETC_NETNS / n for n in stale]
        old.down()


@contextlib.contextmanager
def namespaces():
    """The test's network, made and (on leaving, also after a failure) removed; raises
    :class:`CannotMake` with the reason where this machine cannot make it."""
    why = _why_not()
    if why:
        raise CannotMake(why)
    _remove_stale()
    net = Network(f"{PREFIX}{os.getpid()}")
    try:
        net.up()
        yield net
    finally:
        left = net.down()
        assert not left, "the test's network was not removed entirely:\n" + "\n".join(left)


def probe(net: Network, ns: str, ca: Path, **checks) -> dict:
    """Run :data:`PROBE` inside namespace ``ns``."""
    done = subprocess.run([*net.exec(ns), sys.executable, "-c", PROBE, json.dumps({"ca": str(ca), **checks})],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the probe in {ns} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def listeners(pid: int) -> set[str]:
    """The TCP addresses (``HOST:PORT``, ``[V6]:PORT``) listening in process ``pid``'s network namespace,
    from its ``/proc/<pid>/net/tcp`` and ``tcp6`` (which show the sockets of the process's namespace)."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            host, port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))  # host byte order
            address = ipaddress.ip_address(raw)
            found.add(f"{address}:{int(port, 16)}" if address.version == 4 else f"[{address}]:{int(port, 16)}")
    return found


def exposed(addresses: set[str]) -> set[str]:
    """Those of ``addresses`` another host could reach (not on a loopback address)."""
    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address.rpartition(":")[0].strip("[]"))
        return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
    return {a for a in addresses if not loopback(a)}


class Watcher(threading.Thread):
    """While the run goes on: which of the test's namespaces held each kind of process, and in which
    namespace each site's worker (its ``worker.pid``) ran."""

    KINDS = {"serverapp": "serverapp", "clientapp": "clientapp", "supernode": "supernode",
             "hsl_lightning.flower.worker": "worker"}

    def __init__(self, net: Network, sites_dir: Path, coordinator_pid: int):
        super().__init__(daemon=True)
        self.net, self.sites_dir, self.done = net, sites_dir, threading.Event()
        self.coordinator_pid = coordinator_pid  # a process in the coordinator's namespace (the SuperLink)
        self.seen: set[tuple[str, str]] = set()  # (namespace, kind)
        self.workers: dict[str, set[str | None]] = {}  # site -> the namespaces its workers ran in
        self.exposed: set[str] = set()  # what the coordinator listened on beyond its loopback, during the run

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.exposed |= exposed(listeners(self.coordinator_pid))
            for pid, ns in self.net.processes().items():
                line = _cmdline(pid)
                self.seen.update((ns, kind) for key, kind in self.KINDS.items() if key in line)
            for pid_file in self.sites_dir.glob("*/*/worker.pid"):
                try:
                    pid = int(pid_file.read_text())
                except (OSError, ValueError):
                    continue
                if Path(f"/proc/{pid}").exists():
                    self.workers.setdefault(pid_file.parent.parent.name, set()).add(self.net.namespace_of(pid))

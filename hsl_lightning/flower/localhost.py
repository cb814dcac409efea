"""A whole deployment on one machine, run by the deployment guide's own commands: for the
end-to-end test and ``benchmarks/flower_deploy.py``.

:class:`Localhost` makes the keys (``hsl flower keys``), starts a SuperLink with TLS and node
authentication, registers each site's public key (``flwr supernode register``), starts one
SuperNode per site (``hsl flower supernode``, each with its ``approved-runs`` file), submits the run
(``hsl flower app``, ``hsl flower approve`` at every site, then ``flwr run``) and, on leaving its
``with`` block, kills every process group it started.

As the guide has it, the SuperLink listens on 127.0.0.1 only and, where nginx is installed, the
sites reach it through the proxy ``hsl flower proxy`` configures (TLS, only the Fleet API
forwarded): :attr:`Localhost.address` is the sites' address (the proxy's), while the ``flwr`` CLI's
config (``FLWR_HOME/config.toml``) names :attr:`Localhost.superlink_address`, the SuperLink itself,
as on the coordinator's own machine. ``Localhost(..., proxy=False)`` lets the sites connect to the
SuperLink directly.

Across hosts (``tests/test_flower_deploy.py`` with ``tests/netns.py``: a coordinator and each site in a
network namespace of its own), three optional hooks, all off by default: ``wrap`` maps a role, ``"coordinator"`` (the
SuperLink, the proxy, the ``flwr`` CLI, ``hsl flower app``) or a site's name (its SuperNode, with
the ClientApps and worker it starts, and its ``hsl flower approve``), to a command prefix such as
``["ip", "netns", "exec", "NS"]``; the harness's own TLS checks run as a subprocess under the same
prefix. ``proxy_listen`` is the address nginx listens on (default ``127.0.0.1:<free port>``) and
``site_address`` the address the sites dial (default: the proxy's, or the SuperLink's without one),
e.g. ``superlink.example.org:8443``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Localhost:
    """A SuperLink and ``sites`` SuperNodes on this machine, in ``workdir``; ``proxy``: the sites go
    through nginx (``hsl flower proxy``); None: when nginx is installed."""

    def __init__(self, workdir: str | os.PathLike, sites: int = 3, proxy: bool | None = None, *,
                 wrap: dict[str, list[str]] | None = None, proxy_listen: str | None = None,
                 site_address: str | None = None):
        from hsl_lightning.flower.proxy import nginx_binary

        self.workdir, self.sites = Path(workdir), [f"hospital{i + 1}" for i in range(sites)]
        self.keys, self.port = self.workdir / "keys", free_port()
        self.superlink_address = f"127.0.0.1:{self.port}"  # the SuperLink itself: the flwr CLI's connection
        self.nginx = nginx_binary()
        self.proxied = self.nginx is not None if proxy is None else proxy
        if self.proxied and self.nginx is None:
            raise RuntimeError("Localhost(proxy=True) needs nginx: apt-get install nginx-light")
        # a command prefix per role ("coordinator", or a site's name): none by default (see the module's doc)
        self.wrap = {role: list(prefix) for role, prefix in (wrap or {}).items()}
        self.proxy_listen = (proxy_listen or f"127.0.0.1:{free_port()}") if self.proxied else None
        self.proxy_port = int(self.proxy_listen.rpartition(":")[2]) if self.proxied else None
        # where the sites connect: the proxy (only the Fleet API), or the SuperLink without one
        self.address = site_address or (self.proxy_listen if self.proxied else self.superlink_address)
        self.processes: list[subprocess.Popen] = []
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower starts its own tools
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr"), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "PATH": path}
        self.env.setdefault("WANDB_MODE", "offline")

    # ------------------------------------------------------------------ processes
    def run(self, *command: str, timeout: float = 120, check: bool = True,
            role: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.wrap.get(role, ()), *command], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done

    def start(self, name: str, *command: str, role: str | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([*self.wrap.get(role, ()), *command], env=self.env, cwd=self.workdir, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text() if path.is_file() else ""

    def __enter__(self) -> "Localhost":
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill every process group started here (SuperExec children and site workers included)."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for key in (self.workdir / "sites").glob("*/*/worker.pid"):  # site workers run in sessions of their own
            self._stop_worker(key.parent)

    @staticmethod
    def _stop_worker(site_dir: Path) -> None:
        pid = site_dir / "worker.pid"
        try:
            os.kill(int(pid.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ the guide's steps
    def make_keys(self, extra: list[str] = ()) -> None:
        self.run(_bin("hsl"), "flower", "keys", "--out", str(self.keys), "--sites", *self.sites, *extra)
        home = self.workdir / "flwr"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.superlink_address}"\n'
            f'root-certificates = "{self.keys / "ca.crt"}"\n')

    def start_superlink(self, timeout: float = 60) -> float:
        """Start the SuperLink (TLS on, node authentication on, on 127.0.0.1) and, when proxied, the
        proxy in front of it; seconds until the SuperLink accepts TLS."""
        clock = time.perf_counter()
        self.start("superlink", _bin("flower-superlink"), "--ssl-ca-certfile", str(self.keys / "ca.crt"),
                   "--ssl-certfile", str(self.keys / "server.pem"), "--ssl-keyfile", str(self.keys / "server.key"),
                   "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                   "--port", str(self.port), "--database", str(self.workdir / "superlink.db"), role="coordinator")
        self._wait_tls(self.superlink_address, "superlink", clock, timeout, role="coordinator")
        started = time.perf_counter() - clock
        if self.proxied:
            self.start_proxy(timeout)
        return started

    def _wait_tls(self, address: str, name: str, clock: float, timeout: float, role: str | None = None) -> None:
        from hsl_lightning.flower.commands import check_tls

        while True:
            try:
                if self.wrap.get(role):  # checked from the role's own network (e.g. its namespace)
                    self.run(sys.executable, "-c", "import sys; from hsl_lightning.flower.commands import check_tls; "
                             "check_tls(sys.argv[1], sys.argv[2], sys.argv[3], timeout=2)", address,
                             str(self.keys / "ca.crt"), name, timeout=30, role=role)
                else:
                    check_tls(address, self.keys / "ca.crt", name, timeout=2)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.perf_counter() - clock > timeout:
                    raise RuntimeError(f"the {name} did not come up:\n{self.log(name)[-3000:]}") from None
                time.sleep(0.3)

    def start_proxy(self, timeout: float = 30) -> float:
        """Write the proxy's configuration (``hsl flower proxy``) and start nginx with it in the
        foreground (a process group of its own, killed at the end); seconds until it accepts TLS."""
        from hsl_lightning.flower.proxy import start_command

        clock = time.perf_counter()
        out = self.workdir / "proxy"
        self.run(_bin("hsl"), "flower", "proxy", "--out", str(out), "--listen", self.proxy_listen, "--superlink-port",
                 str(self.port), "--keys", str(self.keys), role="coordinator")
        self.start("proxy", *start_command(out / "nginx.conf", self.nginx), role="coordinator")
        self._wait_tls(self.address, "proxy", clock, timeout, role="coordinator")  # as the sites dial it
        return time.perf_counter() - clock

    def register(self, site: str) -> None:
        self.run(_bin("flwr"), "supernode", "register", str(self.keys / f"{site}.pub"), "local", "--name", site,
                 role="coordinator")

    def start_supernode(self, index: int, key: str | None = None, extra: str = "") -> subprocess.Popen:
        """Start site ``index``'s SuperNode (``key``: another key file name, e.g. an unregistered one)."""
        site = self.sites[index] if index < len(self.sites) else f"extra{index}"
        config = f'node-index={index} name="{site}" site-dir="{self.workdir / "sites" / site}" {extra}'.strip()
        config += f' approved-runs="{self.approvals(site)}"'  # the runs this site approved (submit adds them)
        return self.start(f"supernode-{site}", _bin("hsl"), "flower", "supernode", "--superlink", self.address,
                          "--root-certificates", str(self.keys / "ca.crt"), "--auth-supernode-private-key",
                          str(self.keys / (key or site)), "--node-config", config, "--port", str(free_port()),
                          role=site)

    def prepare(self, config: Path, run_dir: Path, app: str = "app", approve: bool = True) -> Path:
        """Write the app for ``config`` into ``workdir/app`` (``hsl flower app``) and, with ``approve``,
        have every site approve it; the app's folder. Several apps may be prepared and then launched
        at once (:meth:`launch` from threads): the SuperLink runs them side by side."""
        folder = self.workdir / app
        self.run(_bin("hsl"), "flower", "app", "--config", str(config), "--out", str(folder), "--run-dir",
                 str(run_dir), role="coordinator")
        if approve:
            self.approve(folder)
        return folder

    def launch(self, app: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a prepared app to its end (``flwr run APP local --stream``)."""
        return self.run(_bin("flwr"), "run", str(app), "local", "--stream", timeout=timeout, check=False,
                        role="coordinator")

    def submit(self, config: Path, run_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Write the app for ``config``, have every site approve it, and run it to the end."""
        return self.launch(self.prepare(config, run_dir), timeout)

    def approvals(self, site: str) -> Path:
        """Site ``site``'s approvals file (its node config's ``approved-runs``), outside its site-dir."""
        return self.workdir / "approved" / f"{site}.txt"

    def approve(self, app: Path, sites: list[str] | None = None) -> str:
        """Every site (or those of ``sites``) approves the run of ``app`` (``hsl flower approve`` with the
        digest in its ``DIGEST.txt``, as the guide has it); the digest."""
        from hsl_lightning.flower.approval import read_digest

        digest = read_digest(app)
        for site in self.sites if sites is None else sites:
            self.run(_bin("hsl"), "flower", "approve", "--file", str(self.approvals(site)), digest, "--note",
                     f"{app.name}, submitted by the test harness", role=site)
        return digest

    def refusals(self, app: Path, run_dir: Path, done: subprocess.CompletedProcess, wait_s: float = 60,
                 sites: list[str] | None = None) -> dict:
        """After an app that no site (or none of ``sites``) approved was launched: ``refused`` is true when
        each of those sites' SuperNode output names the run's digest as refused and the run wrote no
        ``summary.json``; ``digest``, ``sites`` (those that refused it) and ``output`` (flwr run's) for a
        report."""
        from hsl_lightning.flower.approval import read_digest

        digest, expected = read_digest(app), self.sites if sites is None else sites
        deadline = time.monotonic() + wait_s
        while True:  # each site's own line (the coordinator's reason, which other sites print, quotes one site's)
            refused = [site for site in self.sites if f"hsl: Site {site} refuses run {digest}" in
                       self.log(f"supernode-{site}")]
            if set(refused) >= set(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ran = (Path(run_dir) / "summary.json").exists()
        return {"refused": set(refused) == set(expected) and not ran, "digest": digest, "sites": refused,
                "output": done.stdout[-3000:] + done.stderr[-3000:]}

    def submit_unapproved(self, config: Path, run_dir: Path, timeout: float = 300, wait_s: float = 60) -> dict:
        """Submit the app for ``config`` that no site approved (``hsl flower app``, then ``flwr run``
        without ``hsl flower approve``); what :meth:`refusals` finds."""
        app = self.prepare(config, run_dir, "unapproved-app", approve=False)
        return self.refusals(app, run_dir, self.launch(app, timeout), wait_s)

    def runs(self) -> list[dict]:
        out = self.run(_bin("flwr"), "ls", "local", "--format", "json", check=False, role="coordinator")
        try:
            return json.loads(out.stdout).get("runs", [])
        except json.JSONDecodeError:
            return []

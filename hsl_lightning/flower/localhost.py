"""A whole deployment on one machine, run by the deployment guide's own commands: for the
end-to-end test and ``benchmarks/flower_deploy.py``.

:class:`Localhost` makes the keys (``hsl flower keys``), starts a SuperLink with TLS and node
authentication, registers each site's public key (``flwr supernode register``), starts one
SuperNode per site (``hsl flower supernode``), submits the run (``hsl flower app`` then
``flwr run``) and, on leaving its ``with`` block, kills every process group it started.
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
    """A SuperLink and ``sites`` SuperNodes on this machine, in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, sites: int = 3):
        self.workdir, self.sites = Path(workdir), [f"hospital{i + 1}" for i in range(sites)]
        self.keys, self.port = self.workdir / "keys", free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower starts its own tools
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr"), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "PATH": path}
        self.env.setdefault("WANDB_MODE", "offline")

    # ------------------------------------------------------------------ processes
    def run(self, *command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done

    def start(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(list(command), env=self.env, cwd=self.workdir, stdout=log,
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
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.keys / "ca.crt"}"\n')

    def start_superlink(self, timeout: float = 60) -> float:
        """Start the SuperLink (TLS on, node authentication on); seconds until it accepts TLS."""
        from hsl_lightning.flower.commands import check_tls

        clock = time.perf_counter()
        self.start("superlink", _bin("flower-superlink"), "--ssl-ca-certfile", str(self.keys / "ca.crt"),
                   "--ssl-certfile", str(self.keys / "server.pem"), "--ssl-keyfile", str(self.keys / "server.key"),
                   "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--port", str(self.port),
                   "--database", str(self.workdir / "superlink.db"))
        while True:
            try:
                check_tls(self.address, self.keys / "ca.crt", "superlink", timeout=2)
                return time.perf_counter() - clock
            except Exception:  # noqa: BLE001 - not up yet
                if time.perf_counter() - clock > timeout:
                    raise RuntimeError(f"the SuperLink did not come up:\n{self.log('superlink')[-3000:]}") from None
                time.sleep(0.3)

    def register(self, site: str) -> None:
        self.run(_bin("flwr"), "supernode", "register", str(self.keys / f"{site}.pub"), "local", "--name", site)

    def start_supernode(self, index: int, key: str | None = None, extra: str = "") -> subprocess.Popen:
        """Start site ``index``'s SuperNode (``key``: another key file name, e.g. an unregistered one)."""
        site = self.sites[index] if index < len(self.sites) else f"extra{index}"
        config = f'node-index={index} name="{site}" site-dir="{self.workdir / "sites" / site}" {extra}'.strip()
        return self.start(f"supernode-{site}", _bin("hsl"), "flower", "supernode", "--superlink", self.address,
                          "--root-certificates", str(self.keys / "ca.crt"), "--auth-supernode-private-key",
                          str(self.keys / (key or site)), "--node-config", config, "--port", str(free_port()))

    def submit(self, config: Path, run_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Write the app for ``config`` and run it to the end (``flwr run ... --stream``)."""
        app = self.workdir / "app"
        self.run(_bin("hsl"), "flower", "app", "--config", str(config), "--out", str(app), "--run-dir", str(run_dir))
        return self.run(_bin("flwr"), "run", str(app), "local", "--stream", timeout=timeout, check=False)

    def runs(self) -> list[dict]:
        out = self.run(_bin("flwr"), "ls", "local", "--format", "json", check=False)
        try:
            return json.loads(out.stdout).get("runs", [])
        except json.JSONDecodeError:
            return []

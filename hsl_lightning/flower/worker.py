"""A site's long-lived process: its imports, data and model built once per run.

Flower starts a new ClientApp process for every message. Building a site (importing torch and
Lightning, drawing its data, building its model) then costs seconds per message. So the
ClientApp forwards each request to one worker process per site and run, which keeps the
:class:`~hsl_lightning.flower.site.Site` in memory between rounds: :func:`call` starts it on
the first request (in its own session, so it outlives the ClientApp process that started it) and
talks to it over a Unix socket that only holders of the site's key (``worker.key``, mode 0600, in
the site's directory) can use. The worker stops after the run's last request, when the server
stops a failed run (``{"action": "stop"}``), or after ``IDLE_S`` seconds without a request. What
it keeps in memory is also on disk (the site's round files), so a worker that dies costs a
rebuild, not the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

#: a worker with no request for this long stops (a run's rounds come far more often)
IDLE_S = 1800.0
#: how long a new worker may take to import and build its site before its first answer
START_S = 300.0


def address_of(site_dir: Path) -> str:
    """The worker's socket: a short path (Unix sockets allow about 100 characters)."""
    digest = hashlib.sha256(str(site_dir.resolve()).encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"hsl-site-{digest}.sock")


def _key(site_dir: Path) -> bytes:
    site_dir.mkdir(parents=True, exist_ok=True)
    path = site_dir / "worker.key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _connect(site_dir: Path, deadline: float, process: subprocess.Popen | None):
    log = site_dir / "worker.log"
    while True:
        try:
            return Client(address_of(site_dir), family="AF_UNIX", authkey=_key(site_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            if process is None:
                return None
            if process.poll() is not None:
                tail = log.read_text()[-2000:] if log.is_file() else ""
                raise RuntimeError(f"the site's worker exited (code {process.returncode}) before answering:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the site's worker did not start within {START_S:.0f} s (see {log})")
            time.sleep(0.05)


def call(site_dir: str | Path, setup: dict, request: dict) -> dict:
    """Send ``request`` to the worker of ``site_dir`` (starting one when none answers) and return its
    reply. ``setup``: what builds the site (``config``, ``node``, ``data_config``, ``name``)."""
    site_dir = Path(site_dir)
    conn = _connect(site_dir, 0, None)
    if conn is None and request.get("action") == "stop":
        return {"stopped": False}  # no worker to stop: never start one for it
    if conn is None:
        site_dir.mkdir(parents=True, exist_ok=True)
        log = open(site_dir / "worker.log", "a")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen([sys.executable, "-m", "hsl_lightning.flower.worker", str(site_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        conn = _connect(site_dir, time.monotonic() + START_S, process)
    with conn:
        conn.send({"setup": setup, "request": request})
        return conn.recv()


def handle(site, setup: dict, request: dict):
    """One request for a site: (the site, built when needed, and the reply)."""
    from hsl_lightning.errors import HSLError
    from hsl_lightning.flower.site import Site

    try:
        clock = time.perf_counter()
        if site is None or site.setup_key != setup:
            site = Site(setup["config"], setup["node"], setup["site_dir"], setup.get("data_config"), setup.get("name"))
            site.setup_key = setup
        reply = site.handle(request)
        reply["busy_s"] = time.perf_counter() - clock  # the site's own time: the rest of a round trip is transport
        return site, reply
    except HSLError as exc:
        return site, {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the server gets one line naming the site; the log has the rest
        traceback.print_exc()
        name = setup.get("name") or f"site{setup.get('node')}"
        return site, {"error": f"Site {name}: {type(exc).__name__}: {exc} (traceback in the site's worker.log)"}


def plain(reply: dict) -> dict:
    """Tensors as numpy arrays: pickled by value (torch would pass them as shared memory handles,
    which another process tree cannot open)."""
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in reply.items()}


def serve(site_dir: Path) -> None:
    """The worker's loop: one request at a time, until the run's last request or ``IDLE_S`` idle."""
    address = address_of(site_dir)
    if os.path.exists(address):
        os.unlink(address)  # a stale socket of a worker that died
    listener = Listener(address, family="AF_UNIX", authkey=_key(site_dir))
    last = [time.monotonic()]

    def idle_watch():
        while time.monotonic() - last[0] < IDLE_S:
            time.sleep(5)
        print(f"hsl worker: idle for {IDLE_S:.0f} s, stopping", flush=True)
        os.unlink(address)
        os._exit(0)

    threading.Thread(target=idle_watch, daemon=True).start()
    (site_dir / "worker.pid").write_text(str(os.getpid()))
    site = None
    print(f"hsl worker: serving {site_dir} on {address}", flush=True)
    while True:
        with listener.accept() as conn:
            message = conn.recv()
            last[0] = time.monotonic()
            if message["request"].get("action") == "stop":  # the run failed: free the site's memory now
                conn.send({"stopped": True})
                print("hsl worker: the server stopped the run, stopping", flush=True)
                listener.close()
                return
            site, reply = handle(site, message["setup"], message["request"])
            conn.send(plain(reply))
            last[0] = time.monotonic()
        if message["request"].get("action") == "finish":
            print("hsl worker: the run finished, stopping", flush=True)
            listener.close()
            return


def main(argv: list[str] | None = None) -> None:
    """``python -m hsl_lightning.flower.worker SITE_DIR``: serve one site's requests."""
    parser = argparse.ArgumentParser(description="A site's worker process (started by the hsl ClientApp).")
    parser.add_argument("site_dir")
    serve(Path(parser.parse_args(argv).site_dir))


if __name__ == "__main__":
    main()

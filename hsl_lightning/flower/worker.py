"""A site's long-lived process: its imports, data and model built once per run.

Flower starts a new ClientApp process for every message. Building a site (importing torch and
Lightning, drawing its data, building its model) then costs seconds per message. So the
ClientApp forwards each request to one worker process per site and run, which keeps the
:class:`~hsl_lightning.flower.site.Site` in memory between rounds: :func:`call` starts it on
the first request (in its own session, so it outlives the ClientApp process that started it) and
passes it each request in the protocol's encoding (:func:`~.protocol.encode`) over a Unix socket that only holders of the site's key (``worker.key``, mode 0600, in
the site's directory) can use. The worker stops when its run ends, whatever ends it: after the run's
last request, when the coordinator stops the run (a :class:`~.protocol.Stop`, whose ``reason`` goes to
``worker.log``), when its SuperNode is gone (:func:`supernode_pid`, watched from the worker), on
SIGTERM, SIGINT or SIGHUP (:func:`stop_workers` sends one), or when no request came for twice the
coordinator's reply limit of the last round and a margin (:func:`run_idle_limit`: a run stopped with
``flwr stop``, or whose coordinator died), before a first round after ``IDLE_S`` seconds (environment
variable ``HSL_WORKER_IDLE_S``); time spent handling a request never counts. Whatever stops it, it removes its socket
and its pid file (``worker.pid``). What it keeps in memory is also on disk (the site's round files),
so a worker that dies costs a rebuild, not the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import AuthenticationError, Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path

from hsl_lightning.flower import protocol

#: a worker with no request to handle for this long stops (a run's rounds come far more often)
IDLE_S = 1800.0
#: the environment variable that overrides ``IDLE_S`` (seconds), e.g. for tests
IDLE_ENV = "HSL_WORKER_IDLE_S"
#: how often a worker checks that its SuperNode is still there
WATCH_S = 0.5
#: the worker's module, as its command line names it (``python -m hsl_lightning.flower.worker``)
MODULE = "hsl_lightning.flower.worker"
#: added to twice the coordinator's reply limit to give a worker's idle limit during a run (:func:`run_idle_limit`)
RUN_MARGIN_S = 60.0
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


def call(site_dir: str | Path, setup: dict, request: tuple) -> tuple:
    """Send ``request`` (a :mod:`~hsl_lightning.flower.protocol` message, encoded) to the worker of
    ``site_dir`` (starting one when none answers) and return its encoded reply. ``setup``: what builds
    the site (``config``, ``node``, ``data_config``, ``name``). A worker it starts watches this
    process's SuperNode (:func:`supernode_pid`) and stops when that is gone."""
    site_dir = Path(site_dir)
    conn = _connect(site_dir, 0, None)
    if conn is None and isinstance(protocol.decode(*request), protocol.Stop):
        return protocol.encode(protocol.Stopped(False))  # no worker to stop: never start one for it
    if conn is None:
        site_dir.mkdir(parents=True, exist_ok=True)
        log = open(site_dir / "worker.log", "a")  # noqa: SIM115 - handed to the child
        command = [sys.executable, "-m", MODULE, str(site_dir.resolve()), "--watch-pid", str(supernode_pid())]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        conn = _connect(site_dir, time.monotonic() + START_S, process)
    with conn:
        conn.send({"setup": setup, "request": request})
        try:
            return conn.recv()
        except (EOFError, ConnectionError) as exc:
            raise RuntimeError(f"the site's worker stopped while answering ({type(exc).__name__}); see "
                               f"{site_dir / 'worker.log'}") from exc


def handle(site, setup: dict, request):
    """One request (a protocol message) for a site: (the site, built when needed, and its reply message)."""
    from hsl_lightning.errors import HSLError
    from hsl_lightning.flower.site import Site, answer

    if site is None or site.setup_key != setup:
        try:
            site = Site(setup["config"], setup["node"], setup["site_dir"], setup.get("data_config"), setup.get("name"),
                        setup.get("node_key"), setup.get("roster"), setup.get("statistics"))
            site.setup_key = setup
        except HSLError as exc:
            return None, protocol.Failure(str(exc), node=setup.get("node"))
        except Exception as exc:  # noqa: BLE001 - the coordinator gets one line naming the site; the log has the rest
            traceback.print_exc()
            name = setup.get("name") or f"site{setup.get('node')}"
            return None, protocol.Failure(f"Site {name}: {type(exc).__name__}: {exc} (traceback in the site's "
                                          "log)", node=setup.get("node"))
    return site, answer(site, request)


# ---------------------------------------------------------------------- processes, read from /proc
def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from its third field on ([0]: state, [1]: parent pid, [19]: start time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def _alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, given its ``started`` time, is still that process."""
    if pid <= 0:
        return False
    stat = _stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (not Linux): ask the kernel
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[0] not in ("Z", "X", "x") and (started is None or _start_time(pid) == started)


def supernode_pid() -> int:
    """The process whose end ends this site's runs: the nearest ancestor of this process that runs
    ``flower-supernode`` (flwr 1.42 starts ``flower-supernode`` -> ``flower-superexec`` ->
    ``flwr-clientapp``, which calls :func:`call`), else this process's parent (the SuperExec, when it
    runs apart from the SuperNode: ``--isolation process``)."""
    parent = pid = os.getppid()
    for _ in range(64):  # a bounded walk up the process tree
        if pid <= 1:
            break
        if any(Path(arg).name.startswith("flower-supernode") for arg in _cmdline(pid)[:3]):
            return pid
        stat = _stat(pid)
        if stat is None:
            break
        pid = int(stat[1])
    return parent


def _is_worker(pid: int, site_dir: Path) -> bool:
    """Whether ``pid`` is a worker (``python -m hsl_lightning.flower.worker``) of ``site_dir``."""
    args = _cmdline(pid)
    if MODULE not in args:
        return False
    cwd, target = Path(f"/proc/{pid}/cwd"), site_dir.resolve()
    for arg in args[args.index(MODULE) + 1:]:
        try:
            if (cwd / arg).resolve() == target:  # an absolute arg stays itself; a relative one is the worker's
                return True
        except (OSError, RuntimeError):
            continue
    return False


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _listening(address: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``address``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # e.g. no permission: someone else's, leave it
        return True


def _remove_leftovers(site_dir: Path, pid: int | None) -> None:
    """A gone worker's pid file (when it still names ``pid``) and its socket (when nobody listens)."""
    pid_file = site_dir / "worker.pid"
    if pid_file.is_file() and _read_pid(pid_file) == pid:
        pid_file.unlink(missing_ok=True)
    address = address_of(site_dir)
    if os.path.exists(address) and not _listening(address):
        Path(address).unlink(missing_ok=True)


def stop_workers(site_root: str | Path, timeout_s: float = 30.0) -> list[int]:
    """Stop the workers of the site at ``site_root`` (its ``site-dir``: ``<site_root>/run-<key>/worker.pid``;
    a run folder itself also works) and return their pids. Only a process whose command line shows it is
    the worker of that run folder gets SIGTERM; after ``timeout_s`` one still running gets SIGKILL (said on
    stderr). A pid file whose process is gone, or is no such worker, is stale: removed, nothing signalled."""
    root = Path(site_root).expanduser().resolve()
    running: dict[int, tuple[Path, str | None]] = {}
    for pid_file in sorted({*root.glob("worker.pid"), *root.glob("*/worker.pid")}):
        pid = _read_pid(pid_file)
        if pid is not None and pid != os.getpid() and _is_worker(pid, pid_file.parent):
            started = _start_time(pid)
            try:
                os.kill(pid, signal.SIGTERM)
                running[pid] = (pid_file.parent, started)
                continue
            except ProcessLookupError:
                pass
        _remove_leftovers(pid_file.parent, pid)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid, started) for pid, (_, started) in running.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, (run_dir, started) in running.items():
        if _alive(pid, started):
            print(f"hsl: the worker {pid} of {run_dir} did not stop within {timeout_s:g} s of SIGTERM: killing it",
                  file=sys.stderr, flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            kill_deadline = time.monotonic() + 10
            while _alive(pid, started) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
        _remove_leftovers(run_dir, pid)
    return list(running)


# ---------------------------------------------------------------------- the worker
def idle_limit() -> float:
    """Seconds with no request to handle after which a worker stops: ``$HSL_WORKER_IDLE_S``, else ``IDLE_S``."""
    value = os.environ.get(IDLE_ENV, "").strip()
    try:
        return float(value) if value else IDLE_S
    except ValueError:
        raise ValueError(f"{IDLE_ENV}={value!r} is not a number of seconds") from None


def _listen(address: str) -> socket.socket:
    """The worker's listening socket at ``address`` (mode 0600), replacing a stale one; a socket that a
    live process listens on stays (the site already has a worker: this one does not start)."""
    if os.path.exists(address):
        if _listening(address):
            raise RuntimeError(f"another worker already serves {address}")
        Path(address).unlink(missing_ok=True)  # the socket of a worker that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


def _accept(listener: socket.socket, key: bytes) -> Connection | None:
    """The next client that holds the site's key; None after the listener's timeout or for a client
    without the key (which the worker outlives)."""
    try:
        sock, _ = listener.accept()
    except socket.timeout:
        return None
    sock.setblocking(True)
    conn = Connection(sock.detach())
    try:  # the handshake of multiprocessing's Listener.accept
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
    except (AuthenticationError, EOFError, OSError) as exc:
        conn.close()
        print(f"hsl worker: dropped a connection that did not authenticate ({type(exc).__name__})", flush=True)
        return None
    return conn


def run_idle_limit(request, idle_s: float) -> tuple[float, str]:
    """The idle limit after answering ``request`` (a protocol message), and why: twice the
    coordinator's own reply limit for it plus a margin, when the request says it (a
    :class:`~.protocol.Round`'s ``timeout_s``: the next request comes within that unless the run has
    ended, stopped with ``flwr stop`` or lost its coordinator), else ``idle_s``. A run of long rounds
    thus never loses a worker that waits for slower sites."""
    limit = getattr(request, "timeout_s", None)
    if not isinstance(limit, (int, float)) or limit <= 0:
        return idle_s, f"{idle_s:g} s"
    run_limit = 2 * float(limit) + RUN_MARGIN_S
    return run_limit, (f"{run_limit:g} s, twice the coordinator's reply limit of {float(limit):g} s and "
                       f"{RUN_MARGIN_S:g} s")


def _answer(site, message: dict, handler, idle_s: float, stop: dict):
    """One received ``{"setup", "request"}``: (the site, the encoded reply, the idle limit after it);
    a Stop or the run's Finish also says in ``stop`` why the worker ends."""
    try:
        request = protocol.decode(*message["request"])
        if isinstance(request, protocol.Stop):  # the run failed or was stopped: free the site's memory now
            stop["why"] = (f"the coordinator stopped the run: {request.reason or 'no reason given'} (rounds "
                           f"completed: {request.completed})")
            return site, protocol.encode(protocol.Stopped(True)), None
        site, answered = handler(site, message["setup"], request)
    except Exception as exc:  # noqa: BLE001 - a request the protocol refuses: one line back
        return site, protocol.encode(protocol.Failure(f"the site's worker could not read the request: {exc}")), \
            run_idle_limit(None, idle_s)
    if isinstance(request, protocol.Finish):
        stop["why"] = "the run finished"
    return site, protocol.encode(answered), run_idle_limit(request, idle_s)


def _loop(listener: socket.socket, key: bytes, idle_s: float, handler, stop: dict) -> None:
    """Answer requests until ``stop["why"]`` says why not: the idle clock runs only between requests."""
    site, last, limit = None, time.monotonic(), (idle_s, f"{idle_s:g} s")
    listener.settimeout(max(0.01, min(1.0, idle_s / 4)))
    while "why" not in stop:
        if time.monotonic() - last >= limit[0]:
            stop["why"] = f"no request for {limit[1]}"
            break
        conn = _accept(listener, key)
        if conn is None:
            continue
        with conn:  # busy from here until the reply has gone
            try:
                message = conn.recv()
            except (EOFError, OSError):
                continue
            site, reply, after = _answer(site, message, handler, idle_s, stop)
            limit = after or limit
            try:
                conn.send(reply)
            except OSError as exc:
                print(f"hsl worker: could not send the reply ({type(exc).__name__}: {exc})", flush=True)
        last = time.monotonic()


def _remove_own(address: str, pid_file: Path, mine: dict) -> None:
    """The socket and pid file this worker made, not those of a newer worker of the same site."""
    try:
        if "inode" in mine and os.stat(address).st_ino == mine["inode"]:
            os.unlink(address)
    except OSError:
        pass
    if _read_pid(pid_file) == os.getpid():
        pid_file.unlink(missing_ok=True)


def _trap_signals(stop: dict, cleanup) -> None:
    """SIGTERM, SIGINT and SIGHUP stop the worker through ``serve``'s cleanup (SystemExit 0, also in the
    middle of a request); a second signal while one is handled removes the files and exits at once."""
    def on_signal(signum, frame):  # noqa: ARG001 - the signal module's signature
        if stop.get("cleaning"):
            return  # serve is removing its files already
        if stop.get("signalled"):
            cleanup()
            os._exit(0)
        stop["signalled"] = True
        why = stop.get("gone") or f"got {signal.Signals(signum).name}"
        print(f"hsl worker: {why}, stopping", flush=True)
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)


def _watch(pid: int, stop: dict, interrupt: bool) -> None:
    """Stop the worker when process ``pid`` (its SuperNode) is gone: at once (SIGTERM to itself, which
    ends a request under way too) when ``interrupt``, else after the request at hand."""
    started = _start_time(pid)

    def watch():
        while _alive(pid, started):
            time.sleep(WATCH_S)
        why = f"its SuperNode (pid {pid}) is gone"
        if interrupt:
            stop["gone"] = why
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            stop["why"] = why

    threading.Thread(target=watch, name="hsl-worker-watch", daemon=True).start()


def serve(site_dir: Path, idle_s: float | None = None, watch_pid: int | None = None, handler=handle) -> None:
    """The worker's loop: one request at a time, until the run's last request, a "stop" from the
    coordinator, ``idle_s`` seconds (default :func:`idle_limit`) with no request being handled, the end
    of process ``watch_pid`` (the site's SuperNode), or SIGTERM, SIGINT or SIGHUP (in the main thread).
    However it stops, it removes its socket and its pid file. ``handler``: what answers a request
    (:func:`handle`, whose signature it has)."""
    site_dir = Path(site_dir)
    idle_s = idle_limit() if idle_s is None else float(idle_s)
    address, pid_file = address_of(site_dir), site_dir / "worker.pid"
    stop: dict = {}  # "why" it stops; "gone": why, when its SuperNode is gone; "signalled", "cleaning"
    mine: dict = {}  # "inode": of the socket this worker bound
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        _trap_signals(stop, lambda: _remove_own(address, pid_file, mine))
    listener = None
    try:
        key = _key(site_dir)
        listener = _listen(address)
        mine["inode"] = os.stat(address).st_ino
        pid_file.write_text(str(os.getpid()))
        print(f"hsl worker: serving {site_dir} on {address} (pid {os.getpid()})", flush=True)
        if watch_pid is not None:
            _watch(watch_pid, stop, interrupt=in_main)
        _loop(listener, key, idle_s, handler, stop)
        print(f"hsl worker: {stop['why']}, stopping", flush=True)
    finally:
        stop["cleaning"] = True
        _remove_own(address, pid_file, mine)
        if listener is not None:
            listener.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m hsl_lightning.flower.worker SITE_DIR [--watch-pid PID]``: serve one site's requests."""
    parser = argparse.ArgumentParser(description="A site's worker process (started by the hsl ClientApp).")
    parser.add_argument("site_dir")
    parser.add_argument("--watch-pid", type=int, help="stop when this process (the site's SuperNode) is gone")
    parser.add_argument("--idle-s", type=float,
                        help=f"stop after this long with no request (default: ${IDLE_ENV}, else {IDLE_S:g})")
    args = parser.parse_args(argv)
    serve(Path(args.site_dir), idle_s=args.idle_s, watch_pid=args.watch_pid)


if __name__ == "__main__":
    main()

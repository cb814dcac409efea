"""A site's worker (``hsl_lightning.flower.worker``) stops when its run ends, whatever ends it, and
leaves no socket or pid file behind: the run's last request, a "stop" from the coordinator, its
SuperNode gone, a signal, ``hsl flower stop-workers``, or idle time (counted only between requests).

Every worker here is a real process (``python -m hsl_lightning.flower.worker``, or a short script that
calls ``serve`` with a handler of its own); a test waits for a line or a file the worker writes (a
bounded wait that fails with the worker's log) before it signals or stops anything."""

import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest

from hsl_lightning.flower import commands, protocol, worker

ROUND = protocol.Round(0, np.zeros(1, dtype=np.float32), validate=False, train=True)
FINISH = protocol.Finish(1, np.zeros(1, dtype=np.float32), write_weights=False)
STOP = protocol.Stop(0, "a test stops it")

WAIT_S = 60.0  # a bound on every wait: far above what any of them takes

#: a worker whose handler sleeps ``SLEEP`` seconds (and writes ``busy`` in the site directory while it
#: does); argv: SITE_DIR IDLE_S SLEEP
SLOW_WORKER = """
import sys, time
from pathlib import Path
from hsl_lightning.flower import protocol, worker

site_dir, idle_s, sleep_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])

def slow(site, setup, request):
    (site_dir / "busy").write_text(type(request).__name__)
    time.sleep(sleep_s)
    return site, protocol.Failure(f"slept {sleep_s} on {type(request).__name__}")

worker.serve(site_dir, idle_s=idle_s, handler=slow)
"""


@pytest.fixture
def processes():
    """The processes a test starts: any still running at its end is killed (a failed test's)."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)


def start(processes, site_dir: Path, *args: str, script: str | None = None, env: dict | None = None):
    """A worker for ``site_dir``, its output in ``site_dir/worker.log``."""
    site_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "hsl_lightning.flower.worker"]
    with open(site_dir / "worker.log", "a") as log:
        process = subprocess.Popen([*command, str(site_dir), *args], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    processes.append(process)
    return process


def log_of(site_dir: Path) -> str:
    path = site_dir / "worker.log"
    return path.read_text() if path.is_file() else ""


def wait_for(condition, what: str, site_dir: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:.0f} s; the worker's log:\n{log_of(site_dir)}"
        time.sleep(0.02)


def serving(process: subprocess.Popen, site_dir: Path) -> None:
    """Wait until the worker says it serves (its socket and pid file made)."""
    def up():
        assert process.poll() is None, f"the worker exited ({process.returncode}):\n{log_of(site_dir)}"
        return "hsl worker: serving" in log_of(site_dir)

    wait_for(up, "the worker did not start serving", site_dir)
    assert Path(worker.address_of(site_dir)).exists() and (site_dir / "worker.pid").is_file()
    assert (site_dir / "worker.pid").read_text().strip() == str(process.pid)


def exits(process: subprocess.Popen, site_dir: Path) -> int:
    try:
        return process.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {WAIT_S:.0f} s; its log:\n{log_of(site_dir)}")


def assert_nothing_left(site_dir: Path) -> None:
    assert not Path(worker.address_of(site_dir)).exists(), f"socket left behind:\n{log_of(site_dir)}"
    assert not (site_dir / "worker.pid").exists(), f"pid file left behind:\n{log_of(site_dir)}"


def send(site_dir: Path, request: dict, setup: dict | None = None) -> dict:
    """One request to the running worker of ``site_dir`` (never starts one)."""
    with Client(worker.address_of(site_dir), family="AF_UNIX", authkey=worker._key(site_dir)) as conn:
        conn.send({"setup": setup or {}, "request": protocol.encode(request)})
        return protocol.decode(*conn.recv())


# ---------------------------------------------------------------------- 1. idle time is time between requests
@pytest.mark.slow
def test_a_request_longer_than_the_idle_limit_keeps_its_worker_which_idles_out_after(tmp_path, processes):
    """Handling a request is not idle time: a request that takes three idle limits gets its reply; the
    worker stops once it has had nothing to do for the idle limit, and removes its socket and pid file."""
    site_dir = tmp_path / "site"
    process = start(processes, site_dir, "1.0", "3.0", script=SLOW_WORKER)
    serving(process, site_dir)
    try:
        reply = send(site_dir, ROUND)
    except (FileNotFoundError, ConnectionRefusedError) as exc:  # a stall of over 1 s before the first request
        pytest.fail(f"the worker idled out before the first request ({exc}); its log:\n{log_of(site_dir)}")
    except (EOFError, ConnectionError) as exc:
        pytest.fail(f"the worker died while handling the request ({exc!r}); its log:\n{log_of(site_dir)}")
    assert reply.error == "slept 3.0 on Round"
    assert exits(process, site_dir) == 0
    assert "hsl worker: no request for 1 s, stopping" in log_of(site_dir)
    assert_nothing_left(site_dir)


def test_the_worker_idle_limit_comes_from_the_environment(tmp_path, processes, monkeypatch):
    site_dir = tmp_path / "site"
    process = start(processes, site_dir, env={"HSL_WORKER_IDLE_S": "0.5"})
    assert exits(process, site_dir) == 0
    assert "hsl worker: no request for 0.5 s, stopping" in log_of(site_dir)
    assert_nothing_left(site_dir)
    monkeypatch.setenv("HSL_WORKER_IDLE_S", "12.5")
    assert worker.idle_limit() == 12.5
    monkeypatch.delenv("HSL_WORKER_IDLE_S")
    assert worker.idle_limit() == worker.IDLE_S


@pytest.mark.slow
def test_after_a_round_the_idle_limit_follows_the_coordinators_reply_limit(tmp_path, processes):
    """A run stopped with ``flwr stop`` (or whose coordinator died) sends no Stop: a worker then stops
    once no request came for twice the coordinator's own reply limit (and a margin), not after a fixed
    half hour, which would also cut off a worker that waits for slower sites in a run of long rounds."""
    assert worker.run_idle_limit(protocol.Hello(), 1800.0)[0] == 1800.0  # no limit given
    round_ = protocol.Round(0, np.zeros(1, dtype=np.float32), validate=False, train=True, timeout_s=3000.0)
    limit, why = worker.run_idle_limit(round_, 1800.0)
    assert limit == 6000.0 + worker.RUN_MARGIN_S and "twice the coordinator's reply limit of 3000 s" in why
    site_dir = tmp_path / "site"
    script = SLOW_WORKER.replace("worker.serve(", "worker.RUN_MARGIN_S = 0.5\nworker.serve(")
    process = start(processes, site_dir, "1800", "0", script=script)  # idle limit: half an hour
    serving(process, site_dir)
    send(site_dir, protocol.Round(0, np.zeros(1, dtype=np.float32), validate=False, train=True, timeout_s=0.25))
    assert exits(process, site_dir) == 0  # after 1 s, not 1800 s
    assert "no request for 1 s, twice the coordinator's reply limit of 0.25 s" in log_of(site_dir)
    assert_nothing_left(site_dir)


# ---------------------------------------------------------------------- 2. no socket left behind
@pytest.mark.parametrize("signum", [signal.SIGTERM, *(pytest.param(s, marks=pytest.mark.slow) for s in
                                                     (signal.SIGINT, signal.SIGHUP))], ids=lambda s: s.name)
def test_a_signalled_worker_removes_its_socket_and_pid_file_and_exits_0(tmp_path, processes, signum):
    site_dir = tmp_path / "site"
    process = start(processes, site_dir)
    serving(process, site_dir)
    process.send_signal(signum)
    assert exits(process, site_dir) == 0
    assert f"hsl worker: got {signum.name}, stopping" in log_of(site_dir)
    assert_nothing_left(site_dir)


@pytest.mark.slow
def test_sigterm_stops_a_worker_in_the_middle_of_a_request(tmp_path, processes):
    site_dir = tmp_path / "site"
    process = start(processes, site_dir, "1800", "600", script=SLOW_WORKER)
    serving(process, site_dir)
    outcome = {}

    def request():
        try:
            outcome["reply"] = send(site_dir, ROUND)
        except (EOFError, ConnectionError) as exc:
            outcome["error"] = exc

    client = threading.Thread(target=request, daemon=True)
    client.start()
    wait_for((site_dir / "busy").is_file, "the worker did not start handling the request", site_dir)
    process.terminate()
    assert exits(process, site_dir) == 0
    client.join(WAIT_S)
    assert "error" in outcome, outcome  # the request was cut short, not answered
    assert_nothing_left(site_dir)


@pytest.mark.parametrize("action", ["finish", "stop"])
def test_a_worker_that_the_run_stops_removes_its_socket_and_pid_file(tmp_path, processes, action):
    site_dir = tmp_path / "site"
    process = start(processes, site_dir, "1800", "0", script=SLOW_WORKER)
    serving(process, site_dir)
    reply = send(site_dir, FINISH if action == "finish" else STOP)
    if action == "finish":
        assert reply.error == "slept 0.0 on Finish"
    else:
        assert isinstance(reply, protocol.Stopped) and reply.stopped
    assert exits(process, site_dir) == 0
    assert_nothing_left(site_dir)


def test_a_second_worker_of_the_same_site_leaves_the_first_ones_socket_alone(tmp_path, processes):
    site_dir = tmp_path / "site"
    first = start(processes, site_dir)
    serving(first, site_dir)
    second = start(processes, site_dir)
    assert exits(second, site_dir) != 0
    assert "another worker already serves" in log_of(site_dir)
    assert Path(worker.address_of(site_dir)).exists() and (site_dir / "worker.pid").read_text() == str(first.pid)
    assert send(site_dir, STOP).stopped  # the first still answers
    assert exits(first, site_dir) == 0
    assert_nothing_left(site_dir)


# ---------------------------------------------------------------------- 3. the run ends, whatever ends it
def test_the_coordinators_stop_and_its_reason_go_to_the_workers_log(tmp_path, processes):
    site_dir = tmp_path / "site"
    process = start(processes, site_dir)
    serving(process, site_dir)
    reason = "Site hospital2 failed building its data: no such folder"
    reply = worker.call(site_dir, {}, protocol.encode(protocol.Stop(3, reason)))
    assert protocol.decode(*reply).stopped
    assert exits(process, site_dir) == 0
    assert f"hsl worker: the coordinator stopped the run: {reason} (rounds completed: 3)" in log_of(site_dir)
    assert_nothing_left(site_dir)


@pytest.mark.slow
def test_a_worker_whose_supernode_is_gone_stops_and_removes_its_socket(tmp_path, processes):
    site_dir = tmp_path / "site"
    supernode = subprocess.Popen(["sleep", "600"])
    processes.append(supernode)
    process = start(processes, site_dir, "--watch-pid", str(supernode.pid))
    serving(process, site_dir)
    supernode.kill()
    supernode.wait(WAIT_S)
    assert exits(process, site_dir) == 0
    assert f"hsl worker: its SuperNode (pid {supernode.pid}) is gone, stopping" in log_of(site_dir)
    assert_nothing_left(site_dir)


def test_the_supernode_is_the_nearest_flower_supernode_ancestor_else_the_parent(tmp_path):
    """flwr 1.42: flower-supernode starts flower-superexec, which starts flwr-clientapp (which calls
    the worker): two levels below the SuperNode. Without one, the parent is watched."""
    fake = tmp_path / "flower-supernode"
    leaf = "from hsl_lightning.flower.worker import supernode_pid; print(supernode_pid())"
    superexec = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {leaf!r}]))"
    fake.write_text(f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {superexec!r}]))\n")
    supernode = subprocess.Popen([sys.executable, str(fake), "--insecure"], stdout=subprocess.PIPE, text=True)
    out, _ = supernode.communicate(timeout=WAIT_S)
    assert supernode.returncode == 0 and out.strip() == str(supernode.pid)
    assert worker.supernode_pid() == os.getppid()  # pytest runs under no SuperNode


def test_call_starts_a_worker_that_watches_the_supernode(tmp_path, monkeypatch):
    started = []

    class Exited:
        returncode = 1

        def __init__(self, command, **kwargs):
            started.append(command)

        def poll(self):
            return 1

    monkeypatch.setattr(worker.subprocess, "Popen", Exited)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="exited"):
        worker.call("site", {}, protocol.encode(protocol.Hello()))
    (command,) = started
    assert command[1:3] == ["-m", "hsl_lightning.flower.worker"]
    assert command[3] == str((tmp_path / "site").resolve())  # absolute: stop_workers matches it
    assert command[4:] == ["--watch-pid", str(worker.supernode_pid())]


# ---------------------------------------------------------------------- 4. stop-workers, by pid file
@pytest.mark.slow
def test_stop_workers_stops_this_sites_workers_only_and_removes_stale_pid_files(tmp_path, processes):
    root, other = tmp_path / "site", tmp_path / "site2"  # a sibling whose path starts with root's
    ours = [start(processes, root / name) for name in ("run-a", "run-b")]
    theirs = start(processes, other / "run-a")
    for process, site_dir in zip([*ours, theirs], [root / "run-a", root / "run-b", other / "run-a"]):
        serving(process, site_dir)
    gone = subprocess.Popen(["sleep", "600"])
    gone.kill()
    gone.wait(WAIT_S)
    bystander = subprocess.Popen(["sleep", "600"])  # alive, but no worker: never signalled
    processes.append(bystander)
    for name, pid in (("run-c", gone.pid), ("run-d", bystander.pid), ("run-e", "not a pid")):
        (root / name).mkdir()
        (root / name / "worker.pid").write_text(str(pid))

    assert worker.stop_workers(root) == [ours[0].pid, ours[1].pid]
    for process, name in zip(ours, ("run-a", "run-b")):
        assert exits(process, root / name) == 0
        assert_nothing_left(root / name)
    assert not any((root / name / "worker.pid").exists() for name in ("run-c", "run-d", "run-e"))
    assert bystander.poll() is None
    assert theirs.poll() is None and Path(worker.address_of(other / "run-a")).exists()
    assert send(other / "run-a", STOP).stopped  # the other site's still answers
    assert exits(theirs, other / "run-a") == 0
    assert worker.stop_workers(root) == []


def test_hsl_flower_stop_workers_prints_a_line_per_worker_stopped(tmp_path, processes, capsys):
    root = tmp_path / "site"
    process = start(processes, root / "run-x")
    serving(process, root / "run-x")
    commands.main(["stop-workers", "--site-dir", str(root)])
    assert exits(process, root / "run-x") == 0
    assert_nothing_left(root / "run-x")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(process.pid) in lines[0] and "stopped" in lines[0], lines
    commands.main(["stop-workers", "--site-dir", str(root)])
    assert "no worker" in capsys.readouterr().out

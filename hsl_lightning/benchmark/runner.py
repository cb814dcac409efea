"""Runs a benchmark grid: every cell is one ``hsl fit``, in worker processes, resumable.

A cell is done when its ``summary.json`` (or compact ``record.json``) exists and it ran with the
same arguments (``cell.json``); a rerun of the same command skips done cells and runs the rest (a
killed cell starts over: cells are short and write no checkpoints). A failing cell is logged to
``failures.jsonl`` with its message and does not stop the grid.

Every finished cell also gets ``record.json``: its summary without the per-round rows, with the
validation curves a deployed-round pilot replays (:data:`CURVES`), a few kB. A study that keeps
``record.json`` and ``cell.json`` in git (see .gitignore) resumes in another session or clone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm.auto import tqdm

from hsl_lightning.benchmark.grid import Cell, Grid, run_dir
from hsl_lightning.benchmark.tuning import choose, choose_rule, rule_settings
from hsl_lightning.config import HSLCLI
from hsl_lightning.errors import HSLError, hsl_message


#: the per-round validation figures a record keeps, one list entry per round run
CURVES = ("mean_val_auc", "mean_val_auc_a", "mean_val_auc_b", "sum_val_loss", "sum_val_loss_a")


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``; the platform's processor name elsewhere): rounding,
    and so a cell's figures, differ between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_record(directory: Path, cpu: str | None = None) -> None:
    """``record.json`` from a finished cell's ``summary.json`` (see the module's docstring); ``cpu``:
    the CPU the cell ran on, given by the grid right after the cell, on the machine that ran it."""
    summary = json.loads((directory / "summary.json").read_text())
    if cpu:
        summary["cpu"] = cpu
    history = summary.pop("history", [])
    summary["curves"] = {k: [h.get(k) for h in history] for k in CURVES}
    tmp = directory / "record.json.tmp"
    tmp.write_text(json.dumps(summary))
    tmp.replace(directory / "record.json")


def cell_args(cell: Cell, directory: Path, threads: int, accelerator: str = "cpu") -> list[str]:
    """The ``hsl fit`` arguments of ``cell``: its configs in order, its dotted settings (a string as
    it is, anything else as JSON), the cell's seed for ``seed_everything`` and the data split, its run
    folder ``directory``, and no W&B, progress bar, checkpoint or saved weights. ``threads``: CPU
    threads of the run unless the cell sets its own (a rerun cell); ``accelerator``: cpu or cuda."""
    args = ["fit"]
    for config in cell.configs:
        args += ["--config", config]
    for key, value in cell.settings:
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    args += ["--seed_everything", str(cell.seed), "--data.seed", str(cell.seed),
             "--federation.run_dir", str(directory), "--federation.wandb", "disabled",
             "--federation.progress", "false", "--federation.checkpoint", "false",
             "--federation.save_weights", "false", "--federation.threads", str(cell.threads or threads),
             "--federation.accelerator", accelerator]
    return args


def float_sum(args: list[str]) -> list[str]:
    """A study measures methods, so its cells sum the round's message in float64, as every cell of the
    studies run before secure aggregation's fixed-point sum became the default did (a resumed grid
    stays of one kind); a grid asks for the fixed-point sum with a ``federation.secure_aggregation``
    setting, and a DP cell (which needs it) keeps the default. Not part of ``cell.json``."""
    if any(a.startswith(("--federation.secure_aggregation", "--federation.privacy")) for a in args):
        return []
    return ["--federation.secure_aggregation", "false"]


def _run_cell(args: list[str], directory: str) -> dict:
    """In a worker: one ``hsl fit``, its output into the cell's ``log.txt``."""
    start = time.perf_counter()
    Path(directory).mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    with open(Path(directory) / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            HSLCLI(args=args + float_sum(args))
            return {"ok": True, "wall_s": time.perf_counter() - start}
        except SystemExit as exc:  # the CLI's own argument errors
            return {"ok": False, "error": f"hsl fit exited with {exc.code}; see {directory}/log.txt"}
        except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the grid
            message = hsl_message(exc) or f"{type(exc).__name__}: {exc}"
            return {"ok": False, "error": message}


def done(out: Path, cell: Cell, args: list[str]) -> bool:
    """A cell is done when its summary exists and it ran with these arguments (``cell.json``): a
    reported cell whose tuned settings changed runs again."""
    directory = run_dir(out, cell)
    if not (directory / "summary.json").is_file() and not (directory / "record.json").is_file():
        return False
    recorded = directory / "cell.json"
    return not recorded.is_file() or json.loads(recorded.read_text()).get("args") == args


def run_grid(grid: Grid, workers: int = 1, threads: int | None = None, progress: bool = True,
             accelerator: str = "cpu") -> dict:
    """Run every cell not yet done: the tuning cells first, then the reported cells with the chosen
    settings (``accelerator``: where each cell trains, ``cpu`` or ``cuda``). Returns counts of
    cells, done, ran and failed ones, and the wall time."""
    if workers < 1:
        raise HSLError(f"hsl benchmark needs at least one worker, got --workers {workers}.")
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    tuning = grid.tuning_cells()
    reported = grid.cells()
    total = len(tuning) + len(grid.pilot_cells()) + len(reported) + len(grid.rerun_cells(reported))
    grid.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, desc="benchmark", unit="cell", disable=not progress, dynamic_ncols=True)
    start, counts = time.perf_counter(), {"ran": 0, "failed": 0, "already_done": 0}
    pool = _Pool(workers)  # one for every stage: each of its interpreters imports torch once
    try:
        _run_cells(grid, tuning, pool, threads, accelerator, bar, counts)
        chosen = choose(grid) if tuning else {}
        if grid.pilot:
            _run_cells(grid, grid.pilot_cells(chosen), pool, threads, accelerator, bar, counts)
            rule = choose_rule(grid, chosen)
            if rule == "last":  # the other scenarios' curves set their number of rounds
                others = grid.pilot_cells_elsewhere(chosen)
                total += len(others)  # known only now: they run only when the rule chosen is 'last'
                bar.total = total
                bar.refresh()
                _run_cells(grid, others, pool, threads, accelerator, bar, counts)
            chosen = rule_settings(grid, chosen, rule)
        _run_cells(grid, grid.ordered(grid.cells(chosen)), pool, threads, accelerator, bar, counts)
    finally:
        pool.close()
        bar.close()
    return {"cells": total, **counts, "wall_s": round(time.perf_counter() - start, 1)}


class _Pool:
    """A grid's worker processes: fresh interpreters (spawned, so no torch threads are inherited), one
    pool for all of a grid's stages, replaced when a worker dies."""

    def __init__(self, workers: int):
        self.workers, self.context = workers, multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=self.context)

    def renew(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.context)

    def submit(self, fn, *args):
        """``executor.submit``, on a new pool if a worker died while this one stood idle (between stages)."""
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:
            self.renew()
            return self.executor.submit(fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _run_cells(grid: Grid, cells: list[Cell], pool: _Pool, threads: int, accelerator: str, bar,
               counts: dict) -> None:
    """Run the cells of ``cells`` that are not done in ``pool``."""
    jobs = [(c, cell_args(c, run_dir(grid.out, c), threads, accelerator)) for c in cells]
    todo = [(c, a) for c, a in jobs if not done(grid.out, c, a)]
    waiting = {c.key for c, _ in todo}
    for c, _ in jobs:  # cells finished before records existed get theirs
        directory = run_dir(grid.out, c)
        if c.key not in waiting and (directory / "summary.json").is_file() and not (directory / "record.json").is_file():
            write_record(directory)
    counts["already_done"] += len(jobs) - len(todo)
    bar.update(len(jobs) - len(todo))
    failures, cpu = grid.out / "failures.jsonl", cpu_name()  # every cell of this pool runs on this machine
    pending = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < pool.workers:
                cell, args = queue.pop(0)
                directory = run_dir(grid.out, cell)
                directory.mkdir(parents=True, exist_ok=True)
                # a summary left by earlier arguments must not pass for this run's if it fails or is killed
                (directory / "summary.json").unlink(missing_ok=True)
                (directory / "record.json").unlink(missing_ok=True)
                (directory / "cell.json").write_text(json.dumps({"key": cell.key, "args": args}, indent=1))
                pending[pool.submit(_run_cell, args, str(directory))] = (cell, args)
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                cell, args = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:  # a worker died (out of memory, a crash)
                    result, broken = {"ok": False, "error": f"worker process died: {exc}"}, True
                except Exception as exc:  # noqa: BLE001
                    result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                counts["ran"] += 1
                summary = run_dir(grid.out, cell) / "summary.json"
                if result["ok"] and summary.is_file():
                    write_record(summary.parent, cpu)
                elif result["ok"]:
                    result = {"ok": False, "error": f"hsl fit ended without writing {summary}"}
                if not result["ok"]:
                    counts["failed"] += 1
                    with open(failures, "a") as f:
                        f.write(json.dumps({"cell": cell.key, "error": result["error"]}) + "\n")
                    bar.write(f"failed: {cell.key}: {result['error']}")
                bar.set_postfix_str(cell.key)
                bar.update(1)
            if broken:  # the pool is unusable: requeue what was in flight, start a new pool
                queue = list(pending.values()) + queue
                pending = {}
                pool.renew()
    except KeyboardInterrupt:
        for future in pending:
            future.cancel()
        raise


"""The ``hsl`` command.

``hsl fit --config configs/quickstart.yaml`` parses a LightningCLI-style configuration with three
sections, ``model`` (a LightningModule: HSLModule by default), ``data`` (FederatedDataModule)
and ``federation`` (the Federation: strategy, rounds, devices, logging), and runs the
federation. Several ``--config`` files compose left to right (dataset + scenario + method);
any key can be overridden on the command line, e.g. ``--model.init_args.backbone resnet34``.
``hsl strategies`` lists the strategies; ``hsl benchmark --config GRID`` runs a benchmark grid;
``hsl embed RUN_DIR ...`` draws and measures how homogeneous trained runs make the nodes.

The command sits on top of the package: nothing imports it. The configuration parser it runs is
:class:`hsl_lightning.config.HSLCLI`; the one-paragraph error messages come from
:func:`hsl_lightning.errors.hsl_message`.
"""

from __future__ import annotations

import os
import sys

from hsl_lightning.config import HSLCLI
from hsl_lightning.errors import HSLError, hsl_message
from hsl_lightning.federation import STRATEGIES

__all__ = ["HSLCLI", "main"]


def print_strategies() -> None:
    width = max(len(n) for n in STRATEGIES)
    for name, cls in STRATEGIES.items():
        print(f"{name:<{width}}  {cls.description}")


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), for the report's machine line."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def benchmark(argv: list[str]) -> None:
    """``hsl benchmark``: run a grid of methods x scenarios x seeds, then write its report."""
    import argparse
    import platform

    import torch

    from hsl_lightning.benchmark import Grid, run_grid, write_report

    parser = argparse.ArgumentParser(prog="hsl benchmark", description=(
        "Run every cell (method x scenario x sweep step x seed) of a grid that is not done yet, "
        "then write results.csv, report.md and plots/ into the grid's out folder."))
    parser.add_argument("--config", required=True, help="the grid YAML (e.g. configs/benchmarks/heterogeneity.yaml)")
    parser.add_argument("--out", help="results folder (default: the grid's 'out')")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once, one process each (default 1)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where cells train (auto: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--report-only", action="store_true", help="only summarise the cells already done")
    parser.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                        help="log the report and plots to W&B (auto: online when logged in, else offline)")
    args = parser.parse_args(argv)
    grid = Grid.load(args.config, args.out)
    if not args.report_only:
        accelerator = args.accelerator if args.accelerator != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        result = run_grid(grid, workers=args.workers, threads=args.threads, accelerator=accelerator)
        print(f"hsl benchmark: {result['ran']} cell(s) run ({result['failed']} failed), "
              f"{result['already_done']} already done, of {result['cells']}; {result['wall_s']} s.")
    machine = (f"{_cpu_model() or platform.machine() + ' CPU'}, {os.cpu_count()} cores, torch {torch.__version__}"
               f"{', GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ', no GPU'}")
    written = write_report(grid, command="hsl benchmark " + " ".join(argv), machine=machine, wandb_mode=args.wandb)
    print(f"hsl benchmark: {written['rows']} result rows -> {written['csv']}, {written['report']}, "
          f"{len(written['plots'])} plot(s) in {grid.out / 'plots'}")


def embed(argv: list[str]) -> None:
    """``hsl embed``: node homogeneity of finished runs (t-SNE panels + separability and MMD)."""
    import argparse
    import json
    from pathlib import Path

    from hsl_lightning.analysis import embed as run_embed

    parser = argparse.ArgumentParser(prog="hsl embed", description=(
        "Extract each node's test features from finished runs (with saved weights), draw one t-SNE map per run "
        "coloured by node, and measure how well the nodes can be told apart (linear-probe balanced accuracy; "
        "chance = 1/nodes) and their mean pairwise MMD."))
    parser.add_argument("runs", nargs="+", help="run directories of `hsl fit` (e.g. runs/local runs/fedavg runs/hsl)")
    parser.add_argument("--out", default="embedding.png", help="the figure (a .json with the numbers goes beside it)")
    parser.add_argument("--labels", nargs="+", help="panel titles, one per run (default: each run's strategy)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise HSLError(f"--labels gives {len(args.labels)} label(s) for {len(args.runs)} run(s).")
    rows = run_embed(args.runs, args.out, args.labels, args.split)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"{'run':<16}{'nodes':>6}{'images':>8}{'separability':>14}{'chance':>8}{'MMD':>9}")
    for r in rows:
        print(f"{r['run']:<16}{r['nodes']:>6}{r['images']:>8}{r['node_separability']:>14.3f}{r['chance']:>8.3f}"
              f"{r['mmd']:>9.4f}")
    print(f"hsl embed: figure {args.out}, numbers {Path(args.out).with_suffix('.json')}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["strategies"]:
        print_strategies()
        return
    try:
        if args[:1] == ["benchmark"]:
            benchmark(args[1:])
            return
        if args[:1] == ["embed"]:
            embed(args[1:])
            return
        HSLCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only our own errors are turned into one-paragraph messages
        message = hsl_message(exc)
        if message is None:
            raise
        print(f"hsl: error: {message}", file=sys.stderr)
        sys.exit(2)

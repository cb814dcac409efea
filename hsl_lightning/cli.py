"""The ``hsl`` command.

``hsl fit --config configs/quickstart.yaml`` parses a LightningCLI-style configuration with three
sections, ``model`` (a LightningModule: HSLModule by default), ``data`` (FederatedDataModule)
and ``federation`` (the Federation: strategy, rounds, devices, logging), and runs the
federation. Several ``--config`` files compose left to right (dataset + scenario + method);
any key can be overridden on the command line, e.g. ``--model.init_args.backbone resnet34``.
``hsl strategies`` lists the strategies; ``hsl benchmark --config GRID`` runs a benchmark grid;
``hsl embed RUN_DIR ...`` draws and measures how homogeneous trained runs make the nodes.
"""

from __future__ import annotations

import os
import re
import sys

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from hsl_lightning.data import FederatedDataModule
from hsl_lightning.errors import HSLError
from hsl_lightning.federation import STRATEGIES, Federation
from hsl_lightning.modules import BinaryTaskModule


class HSLCLI(LightningCLI):
    """LightningCLI whose "trainer" is the :class:`Federation`, in a section named ``federation``."""

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=BinaryTaskModule,
            subclass_mode_model=True,
            datamodule_class=FederatedDataModule,
            trainer_class=Federation,
            save_config_callback=None,  # the Federation saves the resolved config into its run directory
            auto_configure_optimizers=False,  # modules configure AdamW from their own lr/weight_decay
            seed_everything_default=0,
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Federation, "federation", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip={"seed"})
        parser.add_lightning_class_args(BinaryTaskModule, "model", subclass_mode=True)
        parser.set_defaults({"model": {"class_path": "hsl_lightning.modules.HSLModule"}})
        parser.add_lightning_class_args(FederatedDataModule, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the channel count; the model follows.
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> Federation:
        config = dict(self._get(self.config_init, "federation", default={}))
        seed = self._get(self.config, "seed_everything")
        config["seed"] = 0 if isinstance(seed, bool) else int(seed)
        federation = Federation(**config, **kwargs)
        # the resolved config, saved into the run directory (also when built with run=False, from Python)
        parser = self._parser(self.subcommand)
        config = self.config[self.subcommand] if self.subcommand is not None else self.config
        dumped = parser.dump(config, skip_none=False, skip_link_targets=False)
        federation.run_config = yaml.safe_load(dumped)
        # how to start, not what was run: a rerun of the saved config starts afresh
        federation.run_config.pop("ckpt_path", None)
        return federation


def print_strategies() -> None:
    width = max(len(n) for n in STRATEGIES)
    for name, cls in STRATEGIES.items():
        print(f"{name:<{width}}  {cls.description}")


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
    parser.add_argument("--report-only", action="store_true", help="only summarise the cells already done")
    parser.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                        help="log the report and plots to W&B (auto: online when logged in, else offline)")
    args = parser.parse_args(argv)
    grid = Grid.load(args.config, args.out)
    if not args.report_only:
        result = run_grid(grid, workers=args.workers, threads=args.threads)
        print(f"hsl benchmark: {result['ran']} cell(s) run ({result['failed']} failed), "
              f"{result['already_done']} already done, of {result['cells']}; {result['wall_s']} s.")
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
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


def _hsl_message(exc: BaseException) -> str | None:
    """The HSLError behind an exception: raised directly, wrapped by jsonargparse while it
    instantiated the config (found through the exception chain), or raised in a spawned rank
    (found in the child's traceback text)."""
    seen = exc
    for _ in range(20):
        if seen is None:
            break
        if isinstance(seen, HSLError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"HSLError: (.+?)\s*$", str(exc), flags=re.S)
    return match.group(1) if match else None


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
        message = _hsl_message(exc)
        if message is None:
            raise
        print(f"hsl: error: {message}", file=sys.stderr)
        sys.exit(2)

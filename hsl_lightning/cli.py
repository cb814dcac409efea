"""The ``hsl`` command.

``hsl fit --config configs/quickstart.yaml`` parses a LightningCLI-style configuration with three
sections, ``model`` (a LightningModule: HSLModule by default), ``data`` (FederatedDataModule)
and ``federation`` (the Federation: strategy, rounds, devices, logging), and runs the
federation. Several ``--config`` files compose left to right (dataset + scenario + method);
any key can be overridden on the command line, e.g. ``--model.init_args.backbone resnet34``.
``hsl check --config ...`` reads and transforms every image of a data config before any round and reports every
problem; ``hsl test --run RUN_DIR`` scores a finished run's deployed model(s) on any data configuration;
``hsl predict --run RUN_DIR --images PATH...`` writes a probability per image; ``hsl strategies``
lists the strategies; ``hsl benchmark --config GRID`` runs a benchmark grid; ``hsl embed RUN_DIR
...`` draws and measures how homogeneous trained runs make the nodes; ``hsl compare RUN_A RUN_B`` checks two runs
(a deployment against its simulation) for equal weights and AUCs. ``hsl --help`` lists them.

The command sits on top of the package: nothing imports it. The configuration parser it runs is
:class:`hsl_lightning.config.HSLCLI`; the one-paragraph error messages come from
:func:`hsl_lightning.errors.hsl_message`.
"""

from __future__ import annotations

import os
import sys

from hsl_lightning.errors import HSLError, hsl_message, suggest

__all__ = ["HSLCLI", "main"]


def __getattr__(name: str):
    # torch and Lightning load only for the subcommands that train or score: ``hsl flower keys`` and
    # ``hsl flower supernode`` (run by a hospital's IT staff) start in a second, not ten
    if name == "HSLCLI":
        from hsl_lightning.config import HSLCLI

        return HSLCLI
    raise AttributeError(f"module 'hsl_lightning.cli' has no attribute {name!r}")


SUBCOMMANDS = {
    "fit": "train a federation from a config (hsl fit --config configs/quickstart.yaml)",
    "check": "check a site's data before any round: every file read and transformed (hsl check --config F)",
    "test": "score a finished run's deployed model(s) on any data config, e.g. a new site (hsl test --run DIR)",
    "predict": "write a probability and label per image file (hsl predict --run DIR --images PATH... --out F.csv)",
    "strategies": "list the federated strategies and what each does",
    "benchmark": "run a grid of methods x scenarios x seeds and write its report (hsl benchmark --config GRID)",
    "embed": "measure and draw how alike trained runs make the nodes (hsl embed RUN_DIR ...)",
    "compare": "check two runs (a deployment against its simulation) for equal weights and AUCs (hsl compare A B)",
    "flower": "train across real sites on Flower: keys, app, supernode, stop-workers, proxy (hsl flower --help)",
}


def print_help() -> None:
    """Print the ``hsl`` subcommands, one line each."""
    width = max(map(len, SUBCOMMANDS))
    print("usage: hsl SUBCOMMAND [options]    (hsl SUBCOMMAND --help for its options)\n\n"
          "HeteroSync Learning on simulated or real hospitals.\n\nsubcommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<{width}}  {text}")


def strategies(argv: list[str]) -> None:
    """``hsl strategies``: every registered strategy, one line each."""
    import argparse

    from hsl_lightning.federation import STRATEGIES

    argparse.ArgumentParser(prog="hsl strategies", description=SUBCOMMANDS["strategies"]).parse_args(argv)
    width = max(len(n) for n in STRATEGIES)
    for name, cls in STRATEGIES.items():
        print(f"{name:<{width}}  {cls.description}")


def _run_data(run: str, argv: list[str]):
    """The data module of a run's ``config.yaml``, with further ``--config`` files and ``--data.*``
    overrides applied on top (the model and federation sections stay the run's)."""
    from pathlib import Path

    from hsl_lightning.config import data_module_of

    config = Path(run) / "config.yaml"
    if not config.is_file():
        raise HSLError(f"{config} not found: --run takes the run directory of an hsl fit (it holds config.yaml).")
    return data_module_of(["--config", str(config), *argv])


def check(argv: list[str]) -> None:
    """``hsl check``: read and transform every image of a data config, report every problem, exit 1 on one."""
    import argparse
    import json

    from hsl_lightning.config import data_module_of
    from hsl_lightning.data.check import check as run_check
    from hsl_lightning.data.check import exit_code, format_report

    parser = argparse.ArgumentParser(prog="hsl check", description=(
        "Check a site's data before any round: every file is read (unreadable files named, duplicates within and "
        "across splits found by content at full depth, empty and one-class splits, sizes, bit depths, channels) and "
        "every image goes through the training transform. Exits 1 when it finds a problem, 2 on a config error."),
        epilog="Any other option (--config FILE, --data.KEY VALUE) is read as by hsl fit; a site's data config alone "
               "is enough.")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    report = run_check(data_module_of(rest), progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report, indent=2))
    code = exit_code(report)
    if code:
        sys.exit(code)


def test(argv: list[str]) -> None:
    """``hsl test``: score a finished run's deployed model(s) on the sites of a data config."""
    import argparse
    import json

    from hsl_lightning.inference.scoring import format_scores, score

    parser = argparse.ArgumentParser(prog="hsl test", description=(
        "Score a finished run's deployed model(s) on every site of a data configuration: by default the run's own "
        "(which gives back summary.json's test AUCs); --config files and --data.* overrides change it, e.g. to the "
        "images of a hospital that never trained. Per site: AUC with a 95 %% bootstrap interval, and accuracy, "
        "sensitivity and specificity at the threshold chosen on the run's validation data."),
        epilog="Any other option (--config FILE, --data.KEY VALUE) applies to the data, as in hsl fit.")
    parser.add_argument("--run", required=True, help="the run directory of an hsl fit")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--out", help="the JSON to write (default: RUN/test.json)")
    parser.add_argument("--bootstraps", type=int, default=1000, help="bootstrap resamples for the interval (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    parser.add_argument("--wandb", default="disabled", choices=["disabled", "auto", "online", "offline"],
                        help="also log the scores to W&B (default: disabled)")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--") and not a.startswith(("--config", "--data."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config and --data.* go to the data)")
    result = score(args.run, _run_data(args.run, rest), args.split, args.bootstraps, args.seed)
    from pathlib import Path

    out = Path(args.out or Path(args.run) / "test.json")
    out.write_text(json.dumps(result, indent=2))
    print(format_scores(result))
    print(f"hsl test: scores written to {out}")
    if args.wandb != "disabled":
        _log_scores(result, args.run, args.wandb)


def _log_scores(result: dict, run: str, mode: str) -> None:
    from pathlib import Path

    from hsl_lightning.federation.loggers import resolve_wandb_mode

    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return
    import wandb

    logged = wandb.init(project="hsl_lightning", name=f"test-{Path(run).name}", job_type="test", mode=resolved,
                        dir=run, reinit="finish_previous")
    for site in result["sites"]:
        logged.summary.update({f"{site['site']}/{k}": site[k] for k in ("auc", "auc_low", "auc_high", "acc",
                                                                       "sensitivity", "specificity") if k in site})
    logged.summary["mean_auc"] = result["mean_auc"]
    logged.finish()


def predict(argv: list[str]) -> None:
    """``hsl predict``: a probability and label per image file."""
    import argparse

    from hsl_lightning.inference.predict import predict as run_predict

    parser = argparse.ArgumentParser(prog="hsl predict", description=(
        "Write a probability per image (PNG, JPEG, BMP, TIFF files, or folders of them, searched recursively), "
        "prepared as training prepared its images, and the label at the threshold chosen on the run's validation "
        "data. Unreadable files are named and skipped; the exit status is then 1."))
    parser.add_argument("--run", required=True, help="the run directory of an hsl fit")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write (default predictions.csv)")
    parser.add_argument("--node", help="the node whose model to use, when the run deployed one per node")
    args = parser.parse_args(argv)
    result = run_predict(args.run, args.images, args.out, node=args.node)
    for error in result["errors"]:
        print(f"hsl predict: {error['error']}", file=sys.stderr)
    print(f"hsl predict: {result['predicted']} of {result['images']} image(s) -> {result['out']}")
    if result["errors"]:
        sys.exit(1)


def benchmark(argv: list[str]) -> None:
    """``hsl benchmark``: run a grid of methods x scenarios x seeds, then write its report."""
    import argparse

    import torch

    from hsl_lightning.benchmark import Grid, run_grid, write_report
    from hsl_lightning.benchmark.runner import cpu_name

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
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
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


def compare(argv: list[str]) -> None:
    """``hsl compare``: two runs' deployed weights and AUCs side by side; exit status 1 when they differ."""
    import argparse
    import json

    from hsl_lightning.inference.compare import compare_runs, format_comparison, parse_weights

    parser = argparse.ArgumentParser(prog="hsl compare", description=(
        "Compare two finished runs (hsl fit or a deployment): per model, the largest absolute weight difference "
        "per tensor group and over all; per node, both runs' val and test AUCs and their difference; then one "
        "verdict line. Exit status 0 when identical (every tensor equal bit for bit, every AUC and the best round "
        "equal), 1 when they differ, 2 for an error (a missing run, summary.json or checkpoint, other tensors)."))
    parser.add_argument("run_a", metavar="RUN_A", help="a run directory, e.g. the simulation's (runs/sim)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to check against it, e.g. the deployment's")
    parser.add_argument("--weights", action="append", metavar="NAME=PATH",
                        help="node NAME's checkpoint of RUN_B is PATH (a site-held one copied elsewhere); repeatable")
    parser.add_argument("--weights-a", action="append", metavar="NAME=PATH", help="the same for RUN_A")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead (for scripts)")
    args = parser.parse_args(argv)
    result = compare_runs(args.run_a, args.run_b, parse_weights(args.weights_a), parse_weights(args.weights))
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    if not result["identical"]:
        sys.exit(1)


def _next_steps(cli) -> None:
    """After ``hsl fit``: where the run went and what to try next."""
    run = getattr(cli.trainer, "last_run_dir", None)
    if run is None or cli.trainer.summary is None:
        return
    print(f"\nRun written to {run}/ (summary.json, config.yaml, "
          f"{'model.ckpt' if (run / 'model.ckpt').is_file() else 'nodes/*.ckpt'}). Next:\n"
          f"  hsl test --run {run}                                  # score it again, with bootstrap intervals\n"
          f"  hsl test --run {run} --data.scenario.feature_skew 0.9 # on sites under other scanners\n"
          f"  hsl predict --run {run} --images IMAGES... --out predictions.csv\n"
          f"  hsl embed {run}                                       # how alike it makes the nodes")


def flower(argv: list[str]) -> None:
    """``hsl flower``: certificates and keys, the Flower app, a checked SuperNode (the flower extra)."""
    try:
        from hsl_lightning.flower.commands import main as flower_main
    except ImportError as exc:
        raise HSLError(f"hsl flower needs the flower extra: pip install 'hsl_lightning[flower]' ({exc}).") from exc
    flower_main(argv)


def main(argv: list[str] | None = None) -> None:
    """The ``hsl`` command: dispatch to a subcommand (``fit``, ``test``, ``predict``, ...); the package's own errors
    become a one-paragraph message and exit status 2."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print_help()
        return
    commands = {"check": check, "strategies": strategies, "benchmark": benchmark, "embed": embed, "test": test, "predict": predict,
                "flower": flower, "compare": compare}
    try:
        if args[0] in commands:
            commands[args[0]](args[1:])
            return
        if args[0] != "fit" and not args[0].startswith("-"):
            raise HSLError(f"Unknown subcommand '{args[0]}'.{suggest(args[0], SUBCOMMANDS)} Subcommands: "
                           f"{', '.join(SUBCOMMANDS)} (hsl --help).")
        from hsl_lightning.config import HSLCLI

        cli = HSLCLI(args=argv)  # None: LightningCLI reads sys.argv itself
        _next_steps(cli)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only our own errors are turned into one-paragraph messages
        message = hsl_message(exc)
        if message is None:
            raise
        print(f"hsl: error: {message}", file=sys.stderr)
        sys.exit(2)

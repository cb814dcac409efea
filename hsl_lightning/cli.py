"""The ``hsl`` command.

``hsl fit --config configs/quickstart.yaml`` parses a LightningCLI-style configuration with three
sections, ``model`` (a LightningModule: HSLModule by default), ``data`` (FederatedDataModule)
and ``federation`` (the Federation: strategy, rounds, devices, logging), and runs the
federation. Several ``--config`` files compose left to right (dataset + scenario + method);
any key can be overridden on the command line, e.g. ``--model.init_args.backbone resnet34``.
``hsl strategies`` lists the strategies.
"""

from __future__ import annotations

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
        if self.subcommand is not None:
            parser = self._parser(self.subcommand)
            dumped = parser.dump(self.config[self.subcommand], skip_none=False, skip_link_targets=False)
            federation.run_config = yaml.safe_load(dumped)
        return federation


def print_strategies() -> None:
    width = max(len(n) for n in STRATEGIES)
    for name, cls in STRATEGIES.items():
        print(f"{name:<{width}}  {cls.description}")


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
    if (sys.argv[1:] if argv is None else argv)[:1] == ["strategies"]:
        print_strategies()
        return
    try:
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

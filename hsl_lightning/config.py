"""Building a run from its configuration: the ``model`` / ``data`` / ``federation`` sections.

:class:`HSLCLI` parses LightningCLI-style YAML (several ``--config`` files compose left to right;
any key can be overridden on the command line) and instantiates the module, the data module and
the :class:`~hsl_lightning.federation.Federation`. ``hsl fit`` runs it; ``hsl benchmark`` cells and
``hsl embed`` build runs with it too, so it lives below the command (``cli.py``), which nothing imports.
"""

from __future__ import annotations

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from hsl_lightning.data import FederatedDataModule
from hsl_lightning.federation import Federation
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
        section = federation.run_config.get("federation") or {}
        section.pop("num_nodes", None)  # the deprecated name of machines: saved under the new name
        section["machines"] = federation.machines
        # how to start, not what was run: a rerun of the saved config starts afresh
        federation.run_config.pop("ckpt_path", None)
        return federation


def data_module_of(args: list[str]) -> FederatedDataModule:
    """The data module of a configuration (``--config`` files and ``--data.*`` overrides, as ``hsl fit`` reads
    them), instantiated without running anything: ``hsl test``, ``hsl check`` and a site's ``--check-only``."""
    import warnings

    with warnings.catch_warnings():  # LightningCLI warns that `args` was given while sys.argv holds hsl's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        return HSLCLI(args=args, run=False).datamodule

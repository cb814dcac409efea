"""The names follow the glossary (docs/concepts.md): ``federation.machines`` counts the computers a
run's ranks span, where the old ``federation.num_nodes`` (Lightning Fabric's word) read as the
hospitals of ``data.scenario.num_nodes``; the old name still works, with a warning."""

import warnings

import pytest

from hsl_lightning import Federation, HSLError
from hsl_lightning.cli import main
from hsl_lightning.config import HSLCLI

from conftest import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
DEPRECATED = "federation.num_nodes is deprecated: it counts machines, not hospitals; use federation.machines"


def test_machines_is_the_argument_and_describe_reports_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        fed = Federation(machines=2, wandb="disabled")
    assert fed.machines == 2
    described = fed.describe()
    assert described["machines"] == 2 and "num_nodes" not in described


def test_the_old_name_sets_machines_and_warns():
    with pytest.warns(FutureWarning, match=DEPRECATED):
        fed = Federation(num_nodes=2, wandb="disabled")
    assert fed.machines == 2 and fed.describe()["machines"] == 2
    with pytest.warns(FutureWarning, match=DEPRECATED):
        assert Federation(machines=2, num_nodes=2, wandb="disabled").machines == 2  # the same value: no conflict


def test_the_two_names_with_different_values_are_refused():
    with pytest.raises(HSLError, match="federation.machines is 3 but federation.num_nodes"):
        Federation(machines=3, num_nodes=2, wandb="disabled")


def test_the_command_line_takes_both_names_and_saves_the_new_one(tmp_path):
    common = ["--config", QUICKSTART, "--federation.run_dir", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fed = HSLCLI(args=[*common, "--federation.machines", "2"], run=False).trainer
    assert fed.machines == 2 and fed.run_config["federation"]["machines"] == 2
    with pytest.warns(FutureWarning, match=DEPRECATED):
        fed = HSLCLI(args=[*common, "--federation.num_nodes", "2"], run=False).trainer
    assert fed.machines == 2
    assert fed.run_config["federation"]["machines"] == 2 and "num_nodes" not in fed.run_config["federation"]


def test_the_command_line_refuses_different_values_in_one_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--federation.machines", "3", "--federation.num_nodes", "2"])
    assert exit_.value.code == 2
    assert "federation.machines is 3 but federation.num_nodes" in capsys.readouterr().err

import subprocess
import sys

import pytest
import yaml

from hsl_lightning.cli import main

from conftest import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def run_hsl(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hsl_lightning", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("override, message", [
    (["--federation.roundz", "2"], "roundz"),  # a config typo
    (["--federation.rounds", "two"], "rounds"),  # a wrong type
    (["--federation.strategy", "fedavgg"], "Did you mean: fedavg"),  # an unknown strategy
    (["--data.scenario.feature_skw", "0.5"], "feature_skw"),  # a scenario key typo
    (["--data.scenario.prevalence", "[0.2, 1.4, 0.5]"], "prevalence values must lie in [0, 1]"),
    (["--federation.min_nodes", "0"], "min_nodes must be at least 1"),
    (["--federation.strategy", "fedprox", "--federation.fuse_institutions", "true"], "cannot run strategy 'fedprox'"),
    (["--federation.cuda_graphs", "true"], "set federation.fuse_institutions to true"),
], ids=["typo", "wrong-type", "unknown-strategy", "scenario-typo", "bad-prevalence", "bad-min-nodes", "unfusable",
        "graphs-unfused"])
def test_bad_settings_are_one_message_with_exit_code_2(capsys, override, message):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, *override])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_configs_compose_and_print(tmp_path, capsys):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("data:\n  scenario:\n    num_nodes: 5\n    feature_skew: 0.9\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--config", str(scenario), "--model.backbone", "resnet34",
              "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["scenario"]["num_nodes"] == 5 and printed["data"]["scenario"]["feature_skew"] == 0.9
    assert printed["data"]["scenario"]["sizes"] == [3.0, 2.0, 1.0]  # kept from the first file
    assert printed["model"]["init_args"]["backbone"] == "resnet34"
    assert set(printed) >= {"model", "data", "federation", "seed_everything"}


def test_strategies_are_listed_with_a_description(capsys):
    from hsl_lightning.federation import STRATEGIES

    main(["strategies"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(STRATEGIES)
    assert all(len(line.split()) > 3 for line in lines)


def test_method_configs_compose_with_strategy_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(REPO / "configs" / "methods" / "fedprox.yaml"),
              "--federation.strategy_options", "{mu: 0.1}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["federation"]["strategy"] == "fedprox" and printed["federation"]["strategy_options"] == {"mu": 0.1}
    assert printed["model"]["class_path"] == "hsl_lightning.ClassifierModule"
    assert printed["model"]["init_args"]["backbone"] == "test_resnet" and printed["data"]["use_sat"] is False


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "methods").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_method_config_names_its_strategy(path):
    from hsl_lightning.federation import STRATEGIES

    config = yaml.safe_load(path.read_text())
    assert config["federation"]["strategy"] == path.stem in STRATEGIES


# In process: an error that escaped as a traceback would raise here instead of SystemExit(2). The
# installed command's own exit statuses are checked out of process in test_compare.py and
# test_end_to_end.py (the quickstart as a real `hsl fit`).
def test_unknown_backbone_is_one_message_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--model.backbone", "resnet-18", "--federation.wandb", "disabled"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown backbone 'resnet-18'" in err and "resnet18" in err
    assert "Traceback" not in err


def test_missing_data_root_is_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "medmnist_combined.yaml"), "--data.root", str(tmp_path),
              "--federation.wandb", "disabled", "--federation.run_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"MedMNIST file not found: {tmp_path}/breastmnist.npz" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()

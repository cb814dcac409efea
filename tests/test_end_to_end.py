"""The shipped configs, run through the command line as a user would (shortened to one round)."""

import json
import os

from test_cli import run_hsl

from conftest import REPO


def test_quickstart_runs_and_logs_to_wandb_offline(tmp_path):
    run_dir = tmp_path / "quickstart"
    env = {**os.environ, "WANDB_MODE": "offline"}
    res = run_hsl("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--federation.rounds", "1",
                  "--federation.local_epochs", "1", "--data.primary.init_args.num_samples", "600",
                  "--federation.run_dir", str(run_dir), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [n["name"] for n in summary["nodes"]] == ["node0", "node1", "node2"]
    assert "mean test AUC" in res.stdout and "node2" in res.stdout  # the printed per-node table
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data.json").is_file()
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    logged = records[0].read_bytes()
    for key in (b"node0/val_auc", b"node2/test_auc", b"test/mean_auc", b"bytes_sent_per_node", b"sat_inference"):
        assert key in logged, key  # per-node keys, summary keys and the resolved config reached W&B

    # the same command with --ckpt_path last and one more round continues the run
    res = run_hsl("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--federation.rounds", "2",
                  "--federation.local_epochs", "1", "--data.primary.init_args.num_samples", "600",
                  "--federation.run_dir", str(run_dir), "--federation.wandb", "disabled", "--ckpt_path", "last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["rounds"] == 2 and len(resumed["history"]) == 2
    assert resumed["history"][0] == summary["history"][0]  # round 1 restored, not retrained


def test_medmnist_config_runs_one_round_on_the_real_files(tmp_path, medmnist_root):
    run_dir = tmp_path / "medmnist"
    env = {**os.environ, "HSL_DATA_ROOT": str(medmnist_root)}
    res = run_hsl("fit", "--config", str(REPO / "configs" / "medmnist_combined.yaml"), "--federation.rounds", "1",
                  "--federation.local_epochs", "1", "--federation.wandb", "disabled",
                  "--federation.run_dir", str(run_dir), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["nodes"]) == 4
    assert sum(n["n_train"] + n["n_val"] + n["n_test"] for n in summary["nodes"]) <= 780
    assert all(0 <= n["test_auc"] <= 1 for n in summary["nodes"])
    drawn = json.loads((run_dir / "data.json").read_text())
    prevalence = [d["pos_train"] / d["n_train"] for d in drawn]
    assert prevalence == sorted(prevalence)  # the configured 15/25/35/45 % malignancy gradient


import pytest  # noqa: E402


@pytest.mark.parametrize("data_config, scenario", [
    ("breast_pneumonia", "combined"), ("pneumonia_breast", "feature"), ("breast_synthetic", "quantity"),
], ids=["breast+pneumonia-sat", "pneumonia+breast-sat", "breast+synthetic-sat"])
def test_study_data_configs_run_one_round_with_a_scenario(tmp_path, medmnist_root, data_config, scenario):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HSL_DATA_ROOT": str(medmnist_root)}
    res = run_hsl("fit", "--config", str(REPO / "configs" / "data" / f"{data_config}.yaml"),
                  "--config", str(REPO / "configs" / "scenarios" / f"{scenario}.yaml"),
                  "--model.init_args.backbone", "test_resnet", "--federation.rounds", "1",
                  "--data.samples_per_epoch", "64", "--federation.wandb", "disabled",
                  "--federation.run_dir", str(run_dir), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    drawn = json.loads((run_dir / "data.json").read_text())
    expected_nodes = {"combined": 5, "feature": 7, "quantity": 2}[scenario]
    assert len(drawn) == expected_nodes and all(d["n_train"] > 0 and d["n_sat"] > 0 for d in drawn)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "hsl" and len(summary["nodes"]) == expected_nodes

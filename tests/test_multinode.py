"""Two "machines" on localhost: two separate torchrun launches rendezvous over TCP and finish one
federated run together, with the result of a single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from hsl_lightning.cli import main

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.init_args.backbone", "test_resnet",
            "--federation.rounds", "2", "--federation.local_epochs", "1", "--data.primary.init_args.num_samples",
            "300", "--data.sat.init_args.num_samples", "200", "--federation.wandb", "disabled",
            "--federation.progress", "false", "--federation.threads", "1"]


def test_the_launch_settings_make_two_machines_that_join_torchruns_ranks(tmp_path, monkeypatch):
    """The fast check of what the slow test below launches: its settings with two machines parse into a
    run of 2 ranks, which joins the ranks a launcher started (ddp) and spawns them only without one."""
    from hsl_lightning.config import HSLCLI
    from hsl_lightning.federation.launch import fabric_strategy

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    fed = HSLCLI(args=[*SETTINGS, "--federation.machines", "2", "--federation.devices", "1",
                       "--federation.run_dir", str(tmp_path)], run=False).trainer
    assert fed.machines * int(fed.devices) == 2
    assert fabric_strategy(1) == "auto" and fabric_strategy(2) == "ddp_spawn"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fabric_strategy(2) == "ddp"  # one rank of a torchrun launch: joins, never spawns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_launches_finish_one_run_together(tmp_path):
    port = str(free_port())
    run_dir = tmp_path / "two_machines"
    machines = []
    for node_rank in (1, 0):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "hsl_lightning", "fit", *SETTINGS,
               "--federation.machines", "2", "--federation.devices", "1", "--federation.run_dir", str(run_dir)]
        machines.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [m.communicate(timeout=400)[0] for m in machines]
    assert all(m.returncode == 0 for m in machines), outputs[1][-3000:] + outputs[0][-3000:]
    ranks = sorted(p.name for p in (run_dir / "checkpoints" / "round-0002").glob("rank-*.pt"))
    assert ranks == ["rank-0.pt", "rank-1.pt"]  # both machines hosted nodes
    one = tmp_path / "one_process"
    main(["fit", *SETTINGS, "--federation.run_dir", str(one)])  # the reference, in process
    two_summary = json.loads((run_dir / "summary.json").read_text())
    one_summary = json.loads((one / "summary.json").read_text())
    for a, b in zip(one_summary["nodes"], two_summary["nodes"]):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=1e-4), (a, b)
    # and the deployed weights: max |dw| (float32 contributions summed in float64: exact here)
    w1, w2 = (torch.load(d / "model.ckpt", weights_only=True)["state_dict"] for d in (one, run_dir))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1) == 0

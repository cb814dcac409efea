"""Two "machines" on localhost: two separate torchrun launches rendezvous over TCP and finish one
federated run together, with the result of a single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.init_args.backbone", "test_resnet",
            "--federation.rounds", "2", "--federation.local_epochs", "1", "--data.primary.init_args.num_samples",
            "300", "--data.sat.init_args.num_samples", "200", "--federation.wandb", "disabled",
            "--federation.progress", "false", "--federation.threads", "1"]


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
    res = subprocess.run([sys.executable, "-m", "hsl_lightning", "fit", *SETTINGS, "--federation.run_dir", str(one)],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    two_summary = json.loads((run_dir / "summary.json").read_text())
    one_summary = json.loads((one / "summary.json").read_text())
    for a, b in zip(one_summary["nodes"], two_summary["nodes"]):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=1e-4), (a, b)

"""Round checkpoints: a killed federation continues exactly where its last complete round ended."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hsl_lightning import ClassifierModule, Federation, HSLError
from hsl_lightning.federation import checkpoint

from conftest import tiny_classifier, tiny_data, tiny_hsl

TESTS = Path(__file__).resolve().parent

# The run the test kills: once round {stop_in} has taken its first training step, it writes {marker}
# and waits there, so the kill always lands in the middle of that round (never after the run ended).
JOB = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import tiny_data, tiny_hsl
from hsl_lightning import Federation, HSLModule
from hsl_lightning.federation import checkpoint

saved, save_round, training_loss = [0], checkpoint.save_round, HSLModule.training_loss
steps = []

def save_and_note(fabric, run_dir, completed, payload):
    save_round(fabric, run_dir, completed, payload)
    saved.append(completed)

def loss_then_wait(self, batch):
    if saved[-1] == {stop_in} - 1:
        steps.append(1)
        if len(steps) == 2:  # round {stop_in} took a step: wait here to be killed
            Path({marker!r}).write_text("round {stop_in} in progress")
            time.sleep(600)
    return training_loss(self, batch)

checkpoint.save_round, HSLModule.training_loss = save_and_note, loss_then_wait
torch.manual_seed(0)
Federation(rounds={rounds}, run_dir={run_dir!r}, wandb="disabled", progress=False, threads=1).fit(
    tiny_hsl(), tiny_data(samples_per_epoch=384))
"""


def job(run_dir, rounds, stop_in, marker):
    code = JOB.format(tests=str(TESTS), rounds=rounds, run_dir=str(run_dir), stop_in=stop_in, marker=str(marker))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def fit(run_dir, rounds, strategy="hsl", ckpt=None, val_every_n_rounds=1, fuse_institutions=False, **kwargs):
    torch.manual_seed(0)
    if strategy == "hsl":
        model, data = tiny_hsl(), tiny_data(**kwargs)
    else:
        model, data = tiny_classifier(strategy), tiny_data(use_sat=False, **kwargs)
    return Federation(strategy=strategy, rounds=rounds, run_dir=str(run_dir), wandb="disabled", progress=False,
                      threads=1, val_every_n_rounds=val_every_n_rounds,
                      fuse_institutions=fuse_institutions).fit(model, data, ckpt_path=ckpt)


def same_result(a, b, dir_a, dir_b):
    assert [n["test_auc"] for n in a["nodes"]] == [n["test_auc"] for n in b["nodes"]]
    assert [n["val_auc"] for n in a["nodes"]] == [n["val_auc"] for n in b["nodes"]]
    assert a["best_round"] == b["best_round"]
    assert [h["mean_val_auc"] for h in a["history"]] == [h["mean_val_auc"] for h in b["history"]]
    files = sorted(Path(dir_a).glob("model.ckpt")) + sorted(Path(dir_a).glob("nodes/*.ckpt"))
    assert files  # the deployed models, as Lightning checkpoints
    for file in files:
        wa = torch.load(file, weights_only=True)["state_dict"]
        wb = torch.load(Path(dir_b) / file.relative_to(dir_a), weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), file.name


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    rounds, marker = 3, tmp_path / "in-round-2"
    proc = job(tmp_path / "killed", rounds, stop_in=2, marker=marker)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():  # written by the run once round 2 has taken a step
            assert proc.poll() is None, "the run ended before round 2:\n" + proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach round 2 within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # in the middle of round 2
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    done = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert done == ["round-0001"] and not (tmp_path / "killed" / "summary.json").exists()

    after = fit(tmp_path / "killed", rounds, ckpt="last", samples_per_epoch=384)  # in process: hsl fit's resume
    assert "resuming from" in capsys.readouterr().out
    straight = fit(tmp_path / "straight", rounds, samples_per_epoch=384)
    same_result(straight, after, tmp_path / "straight", tmp_path / "killed")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["scaffold", "moon", "ditto", "personalized", "fedcome"])
def test_strategy_state_survives_a_resume(tmp_path, strategy):
    straight = fit(tmp_path / "a", 3, strategy)
    fit(tmp_path / "b", 2, strategy)  # stops after round 2 ...
    resumed = fit(tmp_path / "b", 3, strategy, ckpt="last")  # ... and goes on to 3
    same_result(straight, resumed, tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_a_fused_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Fused training (with dropout, drawn per round and group) continues exactly after a resume."""
    straight = fit(tmp_path / "a", 3, fuse_institutions=True)
    fit(tmp_path / "b", 2, fuse_institutions=True)
    resumed = fit(tmp_path / "b", 3, ckpt="last", fuse_institutions=True)
    same_result(straight, resumed, tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_resume_before_any_round_was_validated(tmp_path, monkeypatch):
    straight = fit(tmp_path / "a", 3, "fedavg", val_every_n_rounds=3)
    save = checkpoint.save_round

    def save_then_stop(fabric, run_dir, completed, payload):
        save(fabric, run_dir, completed, payload)
        if completed == 1:
            raise KeyboardInterrupt  # killed after round 1, which was not validated

    monkeypatch.setattr(checkpoint, "save_round", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", 3, "fedavg", val_every_n_rounds=3)
    monkeypatch.setattr(checkpoint, "save_round", save)
    resumed = fit(tmp_path / "b", 3, "fedavg", ckpt="last", val_every_n_rounds=3)
    assert [n["test_auc"] for n in straight["nodes"]] == [n["test_auc"] for n in resumed["nodes"]]
    assert straight["best_round"] == resumed["best_round"] == 3


def test_only_the_newest_complete_round_is_kept_and_loads_without_unpickling(tmp_path):
    fit(tmp_path, 3, "scaffold")
    rounds = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert rounds == ["round-0003"]
    state = torch.load(tmp_path / "checkpoints" / "round-0003" / "rank-0.pt", weights_only=True)
    assert state["round"] == 3 and set(state["strategy"]) == {"c", "ci"}


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    fit(tmp_path, 1, "fedavg")
    with pytest.raises(HSLError, match="different run .*strategy"):
        fit(tmp_path, 2, "fedprox", ckpt="last")
    with pytest.raises(HSLError, match="different run .*state"):
        torch.manual_seed(0)
        Federation(strategy="fedavg", rounds=2, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
            ClassifierModule(backbone="resnet18"), tiny_data(use_sat=False), ckpt_path="last")
    with pytest.raises(HSLError, match="more than federation.rounds"):
        fit(tmp_path, 2, "fedavg")  # writes round 2
        fit(tmp_path, 1, "fedavg", ckpt="last")


def test_resume_errors_are_clear(tmp_path, capsys):
    with pytest.raises(HSLError, match="set federation.run_dir"):
        Federation(wandb="disabled").fit(tiny_hsl(), tiny_data(), ckpt_path="last")
    with pytest.raises(HSLError, match="No complete federation checkpoint"):
        fit(tmp_path / "x", 1, ckpt=str(tmp_path / "nowhere"))
    fit(tmp_path / "fresh", 1, "fedavg", ckpt="last")  # nothing to resume yet: starts from round 1
    assert "starting from round 1" in capsys.readouterr().out
    file = tmp_path / "fresh" / "checkpoints" / "round-0001" / "rank-0.pt"
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.raises(HSLError, match="Could not read checkpoint file"):
        fit(tmp_path / "fresh", 2, "fedavg", ckpt="last")

"""``hsl compare RUN_A RUN_B``: run directories built by hand (a summary.json and Lightning-style
checkpoints written with torch.save), no training."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hsl_lightning.cli import main
from hsl_lightning.errors import HSLError
from hsl_lightning.inference.compare import compare_runs, format_comparison, group_of, parse_weights, tensor_diff

from conftest import REPO

NODES = ("hospital1", "hospital2")
AUCS = {"hospital1": (0.81, 0.79), "hospital2": (0.73, 0.75)}


def weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"primary_encoder.conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
            "primary_encoder.layer1.0.conv1.weight": torch.randn(4, 4, 3, 3, generator=g),
            "primary_encoder.layer1.0.bn1.running_mean": torch.randn(4, generator=g),
            "primary_encoder.layer1.0.bn1.num_batches_tracked": torch.tensor(7),
            "head.weight": torch.randn(1, 4, generator=g), "head.bias": torch.zeros(1)}


def save(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.clone() for k, v in state.items()}, "hsl": {}}, path)
    return path


def make_run(path: Path, states=None, aucs=None, best_round=3, deployment=None) -> Path:
    """A run directory: ``states`` is one state dict (model.ckpt) or {node: state dict} (nodes/<name>.ckpt)."""
    states = weights() if states is None else states
    aucs = {**AUCS, **(aucs or {})}
    path.mkdir(parents=True)
    if isinstance(next(iter(states.values())), torch.Tensor):
        save(path / "model.ckpt", states)
    else:
        for name, state in states.items():
            save(path / "nodes" / f"{name}.ckpt", state)
    summary = {"nodes": [{"name": n, "val_auc": aucs[n][0], "test_auc": aucs[n][1], "n_train": 10} for n in NODES],
               "best_round": best_round}
    if deployment is not None:
        summary["deployment"] = deployment
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["compare", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_runs_exit_0_and_say_identical(tmp_path, capsys):
    code, out, err = run_main(capsys, make_run(tmp_path / "a"), make_run(tmp_path / "b"))
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("verdict: identical: 6 tensors in 1 model(s) equal bit for bit")
    assert "primary_encoder.layer1" in out and "head" in out and "0 of 6 tensors differ" in out
    assert "hospital2" in out and "0.7300" in out  # the AUCs, side by side


def test_a_tensor_changed_by_1e_7_exits_1_naming_its_group_and_the_difference(tmp_path, capsys):
    changed = weights()
    changed["primary_encoder.layer1.0.bn1.running_mean"][2] += 1e-7
    code, out, _ = run_main(capsys, make_run(tmp_path / "a"), make_run(tmp_path / "b", changed))
    assert code == 1
    diff = float((changed["primary_encoder.layer1.0.bn1.running_mean"][2].double()
                  - weights()["primary_encoder.layer1.0.bn1.running_mean"][2].double()).abs())
    assert 0 < diff < 2e-7
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("    ")}
    assert rows["primary_encoder.layer1"] == f"{diff:.3g}" and rows["primary_encoder.conv1"] == "0"
    assert rows["head"] == "0" and rows["overall"] == f"{diff:.3g}" and "1 of 6 tensors differ" in out
    assert out.splitlines()[-1] == (f"verdict: differ: largest |dw| {diff:.3g} (one model, all nodes, "
                                    "primary_encoder.layer1)")


def test_a_different_auc_is_shown_with_its_difference(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", aucs={"hospital2": (0.73, 0.7512)})
    code, out, _ = run_main(capsys, a, b)
    assert code == 1
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("hospital2"))
    assert row == ["hospital2", "0.7300", "0.7300", "0", "0.7500", "0.7512", "0.0012"]
    assert out.splitlines()[-1] == "verdict: differ: largest |dAUC| 0.0012 (hospital2 test)"


def test_a_different_best_round_is_a_difference(tmp_path):
    result = compare_runs(make_run(tmp_path / "a"), make_run(tmp_path / "b", best_round=4))
    assert not result["identical"] and result["verdict"] == "differ: best round 3 vs 4"


def test_json_prints_one_object(tmp_path, capsys):
    changed = weights()
    changed["head.bias"] += 0.5
    code, out, _ = run_main(capsys, make_run(tmp_path / "a"), make_run(tmp_path / "b", changed), "--json")
    assert code == 1
    result = json.loads(out)
    assert result["identical"] is False and result["max_abs_diff"] == 0.5
    assert result["models"][0]["groups"] == {"primary_encoder.conv1": 0.0, "primary_encoder.layer1": 0.0,
                                             "head": 0.5}
    assert result["aucs"][0]["test_auc"] == {"a": 0.79, "b": 0.79, "diff": 0.0, "equal": True}


def test_per_node_checkpoints_against_site_held_ones(tmp_path, capsys):
    per_node = {"hospital1": weights(1), "hospital2": weights(2)}
    sim = make_run(tmp_path / "sim", per_node)
    held = {n: str(save(tmp_path / f"site-{n}" / "run-1" / "nodes" / f"{n}.ckpt", s)) for n, s in per_node.items()}
    dep = make_run(tmp_path / "dep", {"hospital1": weights(1)}, deployment={"site_checkpoints": held})
    (dep / "nodes" / "hospital1.ckpt").unlink()  # the server keeps none: only the sites do
    code, out, _ = run_main(capsys, sim, dep)
    assert code == 0, out
    assert f"hospital2: {sim / 'nodes' / 'hospital2.ckpt'}  vs  {held['hospital2']}" in out
    assert "12 tensors in 2 model(s)" in out
    changed = weights(2)
    changed["head.weight"][0, 1] -= 0.25
    save(Path(held["hospital2"]), changed)
    code, out, _ = run_main(capsys, sim, dep)
    assert code == 1 and out.splitlines()[-1] == "verdict: differ: largest |dw| 0.25 (hospital2, head)"


def test_a_site_held_checkpoint_copied_elsewhere_is_named_with_weights(tmp_path, capsys):
    per_node = {"hospital1": weights(1), "hospital2": weights(2)}
    sim = make_run(tmp_path / "sim", per_node)
    dep = make_run(tmp_path / "dep", {"hospital1": weights(1)},
                   deployment={"site_checkpoints": {"hospital2": "/srv/hospital2/run-1/nodes/hospital2.ckpt"}})
    code, _, err = run_main(capsys, sim, dep)
    assert code == 2 and "/srv/hospital2/run-1/nodes/hospital2.ckpt" in err and "--weights hospital2=PATH" in err
    copy = save(tmp_path / "copied" / "h2.ckpt", weights(2))
    code, out, _ = run_main(capsys, sim, dep, "--weights", f"hospital2={copy}")
    assert code == 0 and f"vs  {copy}" in out
    with pytest.raises(HSLError, match="node .hospital3.*Did you mean: hospital2, hospital1"):
        compare_runs(sim, dep, weights_b={"hospital3": copy})


def test_one_model_against_per_node_models_compares_each_node(tmp_path):
    one = make_run(tmp_path / "a")
    per_node = make_run(tmp_path / "b", {"hospital1": weights(), "hospital2": weights(5)})
    result = compare_runs(one, per_node)
    assert [m["nodes"] for m in result["models"]] == [["hospital1"], ["hospital2"]]
    assert result["models"][0]["max_abs_diff"] == 0.0 and result["models"][1]["max_abs_diff"] > 0
    assert result["verdict"].startswith("differ: largest |dw|") and "(hospital2, " in result["verdict"]


def test_a_missing_checkpoint_is_an_error_naming_the_file(tmp_path, capsys):
    a = make_run(tmp_path / "a", {"hospital1": weights(), "hospital2": weights()})
    b = make_run(tmp_path / "b", {"hospital1": weights(), "hospital2": weights()})
    (b / "nodes" / "hospital2.ckpt").unlink()
    code, out, err = run_main(capsys, a, b)
    assert code == 2 and out == ""
    assert err.startswith("hsl: error: Checkpoint of node 'hospital2'") and str(b / "nodes" / "hospital2.ckpt") in err


def test_different_tensor_names_or_shapes_are_errors_naming_the_key(tmp_path):
    renamed = weights()
    renamed["head.scale"] = renamed.pop("head.bias")
    with pytest.raises(HSLError, match=r"only in the first: head\.bias; only in the second: head\.scale"):
        compare_runs(make_run(tmp_path / "a"), make_run(tmp_path / "b", renamed))
    reshaped = weights()
    reshaped["head.weight"] = torch.zeros(2, 4)
    with pytest.raises(HSLError, match=r"'head\.weight' differs in shape.*\(1, 4\).*\(2, 4\)"):
        compare_runs(make_run(tmp_path / "c"), make_run(tmp_path / "d", reshaped))


def test_a_missing_directory_or_summary_is_an_error(tmp_path):
    a = make_run(tmp_path / "a")
    with pytest.raises(HSLError, match="Run directory not found: .*nowhere"):
        compare_runs(a, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HSLError, match=r"empty/summary\.json not found"):
        compare_runs(tmp_path / "empty", a)
    with pytest.raises(HSLError, match="NAME=PATH"):
        parse_weights(["hospital1"])


def test_groups_and_differences():
    assert group_of("primary_encoder.layer1.0.conv1.weight") == "primary_encoder.layer1"
    assert group_of("primary_encoder.conv1.weight") == "primary_encoder.conv1"
    assert group_of("head.weight") == "head" and group_of("scale") == "scale"
    nan = torch.tensor([math.nan, 1.0])
    assert tensor_diff(nan, nan.clone()) == 0.0  # NaN where the other has NaN: equal
    assert tensor_diff(nan, torch.tensor([0.0, 1.0])) == math.inf
    assert tensor_diff(torch.tensor([math.inf]), torch.tensor([math.inf])) == 0.0
    assert tensor_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == 0.5


@pytest.mark.slow
def test_the_command_exits_0_1_and_2(tmp_path):
    """The installed entry point, out of process: the exit status a script sees."""
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", aucs={"hospital1": (0.8, 0.79)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    codes = [subprocess.run([sys.executable, "-m", "hsl_lightning", "compare", str(a), str(x)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300) for x in (a, b, tmp_path / "c")]
    assert [c.returncode for c in codes] == [0, 1, 2], [c.stderr[-2000:] for c in codes]
    assert "verdict: identical" in codes[0].stdout and "hsl: error: Run directory not found" in codes[2].stderr


def test_the_report_ends_with_the_verdict(tmp_path):
    result = compare_runs(make_run(tmp_path / "a"), make_run(tmp_path / "b"))
    assert format_comparison(result).splitlines()[-1] == f"verdict: {result['verdict']}"

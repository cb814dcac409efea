"""The benchmark tool: grid files, the resumable runner, and the report's statistics."""

import csv
import math

import pytest
import yaml

from hsl_lightning import HSLError
from hsl_lightning.benchmark import Grid
from hsl_lightning.benchmark.report import Stats, verdict
from hsl_lightning.cli import main

from conftest import REPO

SMOKE = REPO / "configs" / "benchmarks" / "smoke.yaml"


def test_smoke_grid_runs_resumes_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "smoke"
    main(["benchmark", "--config", str(SMOKE), "--out", str(out), "--wandb", "disabled"])
    assert "4 cell(s) run (0 failed), 0 already done" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    # one row per method, scenario, sweep step, seed and node: 2 x 1 x 2 x 1 x 2 nodes
    assert len(rows) == 8
    assert {(r["method"], r["step"]) for r in rows} == {(m, s) for m in ("hsl", "fedavg") for s in ("1", "4")}
    assert all(0 <= float(r["test_auc"]) <= 1 for r in rows)
    sizes = {r["step"]: sorted(int(x["n_train"]) for x in rows if x["step"] == r["step"] and x["method"] == "hsl")
             for r in rows}
    assert sizes["1"][0] == sizes["1"][1] and sizes["4"][1] > 3 * sizes["4"][0]  # the sweep reached the data
    report = (out / "report.md").read_text()
    assert "| hsl |" in report and "| quantity | fedavg |" in report and "## Mean node validation AUC" in report
    assert "| reference | quantity |" in report and "| fedavg | " in report.split("In short")[1]  # the verdict matrix
    assert {p.name for p in (out / "plots").iterdir()} == {"quantity_nodes.png", "quantity_gradient.png"}
    main(["benchmark", "--config", str(SMOKE), "--out", str(out), "--wandb", "disabled"])
    assert "0 cell(s) run (0 failed), 4 already done" in capsys.readouterr().out


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = yaml.safe_load(SMOKE.read_text())
    grid["methods"]["broken"] = {"config": "configs/methods/fedavg.yaml", "settings": {"model.init_args.lr": -1.0}}
    grid["scenarios"]["quantity"]["sweep"]["steps"] = {"1": [1, 1]}
    grid.pop("compare")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    # the broken cell once finished with other arguments: its old summary must not pass for the new run
    stale = tmp_path / "out" / "runs" / "broken" / "quantity" / "1" / "seed0"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text('{"mean_val_auc": 0.9}')
    (stale / "cell.json").write_text('{"args": ["fit", "--model.init_args.lr", "0.1"]}')
    main(["benchmark", "--config", str(path), "--out", str(tmp_path / "out"), "--wandb", "disabled"])
    printed = capsys.readouterr().out
    assert "3 cell(s) run (1 failed)" in printed
    failures = (tmp_path / "out" / "failures.jsonl").read_text()
    assert "broken/quantity/1/seed0" in failures
    assert not (stale / "summary.json").exists()
    main(["benchmark", "--config", str(path), "--out", str(tmp_path / "out"), "--wandb", "disabled", "--report-only"])
    assert "broken/quantity/1/seed0: " in (tmp_path / "out" / "report.md").read_text()  # listed as failed


@pytest.mark.parametrize("change, message", [
    ({"methodz": {}}, "unknown key 'methodz'.*Did you mean: methods"),
    ({"methods": {"x": "configs/methods/nope.yaml"}}, "not a file: configs/methods/nope.yaml"),
    ({"seeds": "0"}, "seeds must be a list"),
    ({"compare": {"method": "hsl", "against": ["fedavgg"]}}, "compare names 'fedavgg'"),
], ids=["unknown-key", "missing-config", "bad-seeds", "bad-compare"])
def test_bad_grid_files_are_clear_errors(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(REPO)
    grid = yaml.safe_load(SMOKE.read_text())
    grid.update(change)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(HSLError, match=message):
        Grid.load(path)


def test_cells_are_ordered_seed_by_seed_with_settings_in_order(monkeypatch):
    monkeypatch.chdir(REPO)
    grid = Grid.load(REPO / "configs" / "benchmarks" / "heterogeneity_v1.yaml")
    cells = grid.cells()
    assert len(cells) == 17 * (1 + 5 + 10 + 1) * 5
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)
    fedrep = next(c for c in cells if c.method == "fedrep")
    assert dict(fedrep.settings)["federation.local_epochs"] == 2  # the method's setting wins over the grid's
    synthetic = next(c for c in cells if c.method == "hsl_synthetic_sat")  # its data config comes after the grid's
    assert synthetic.configs.index("configs/data/breast_synthetic.yaml") > synthetic.configs.index(
        "configs/data/breast_pneumonia.yaml")
    assert dict(synthetic.settings)["data.sat_fraction"] == 0.07
    step = next(c for c in cells if c.scenario == "quantity" and c.step == "80")
    assert dict(step.settings)["data.scenario.sizes"] == [1, 80]


def test_verdict_uses_a_t_interval_over_seeds():
    assert verdict([0.05, 0.06, 0.04, 0.05, 0.05])[0] == "wins"
    assert verdict([-0.05, -0.06, -0.04, -0.05, -0.05])[0] == "loses"
    assert verdict([0.05, -0.04, 0.06, -0.05, 0.01])[0] == "ties"
    assert verdict([0.05])[0] == "n/a"
    word, mean, std, half = verdict([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_statistics_by_hand():
    rows = []
    for seed, aucs in ((0, [0.6, 0.8]), (1, [0.7, 0.9])):
        for step, shift in (("a", 0.0), ("b", 0.1)):
            for i, auc in enumerate(aucs):
                rows.append({"method": "m", "strategy": "fedavg", "scenario": "s", "step": step,
                             "step_index": 0 if step == "a" else 1, "seed": seed, "node": f"n{i}",
                             "test_auc": auc - shift, "val_auc": auc + 0.05})
    rows.append({**rows[0], "node": "n2", "test_auc": float("nan"), "val_auc": float("nan")})  # undefined: left out
    assert Stats(rows, "val_auc").summary("m", "s", "a")["mean"] == pytest.approx(0.80)  # validation table
    stats = Stats(rows)
    a = stats.summary("m", "s", "a")
    assert a["mean"] == pytest.approx(0.75) and a["mean_std"] == pytest.approx(math.sqrt(0.005))
    assert a["worst"] == pytest.approx(0.65) and a["spread"] == pytest.approx(0.1)
    whole = stats.summary("m", "s")  # steps averaged within each seed
    assert whole["mean"] == pytest.approx(0.70)
    assert stats.undefined[("m", "s")] == 1


def test_grid_sections_of_the_wrong_shape_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for text, message in (("- a\n- b\n", "must be a mapping of keys"),
                          ("methods: [hsl, fedavg]\nscenarios: {q: configs/scenarios/quantity.yaml}\n",
                           "methods must be a mapping"),
                          ("methods: {hsl: configs/methods/hsl.yaml}\nscenarios:\n  q:\n    config: "
                           "configs/scenarios/quantity.yaml\n    sweep: {key: data.scenario.sizes, steps: [[1, 1]]}\n",
                           "a sweep is a mapping")):
        path = tmp_path / "grid.yaml"
        path.write_text(text)
        with pytest.raises(HSLError, match=message):
            Grid.load(path)

"""The benchmark tool: grid files, the resumable runner, and the report's statistics."""

import csv
import json
import math
import shutil
import subprocess

import pytest
import yaml

from hsl_lightning import HSLError
from hsl_lightning.benchmark import Grid
from hsl_lightning.benchmark.grid import run_dir
from hsl_lightning.benchmark.report import (Stats, collect, detectable, interval, markdown, outcomes, seeds_needed,
                                           tost_p)
from hsl_lightning.benchmark.results import _val_best_round
from hsl_lightning.benchmark.runner import done
from hsl_lightning.cli import main

from conftest import REPO

SMOKE = REPO / "configs" / "benchmarks" / "smoke.yaml"


@pytest.mark.slow
def test_smoke_grid_runs_resumes_and_reports(smoke_grid, capsys, monkeypatch, tmp_path, subtests):
    monkeypatch.chdir(REPO)
    out, printed = smoke_grid  # the smoke grid run once (conftest.py); one test, so one xdist worker runs it
    with subtests.test(msg="a cell kept as its record"):
        a_cell_kept_as_its_record_is_done_reported_and_committable(out, tmp_path)
    assert "4 cell(s) run (0 failed), 0 already done" in printed
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


def a_cell_kept_as_its_record_is_done_reported_and_committable(grid_out, tmp_path):
    """(A part of the smoke grid's test: it reads the same grid.)"""
    out = tmp_path / "smoke"
    shutil.copytree(grid_out, out)  # the session's smoke grid (conftest.py): this deletes summaries
    grid = Grid.load(SMOKE, out=str(out))
    cell = grid.cells()[0]
    directory = run_dir(out, cell)
    record = json.loads((directory / "record.json").read_text())
    summary = json.loads((directory / "summary.json").read_text())
    assert "history" not in record and record["nodes"] == summary["nodes"]
    assert record["cpu"] and collect(grid)[0]["cpu"] == record["cpu"]  # the CPU the cell ran on, kept
    assert record["curves"]["mean_val_auc"] == [h["mean_val_auc"] for h in summary["history"]]
    assert all(n["pool_test_auc"] >= 0 for n in record["nodes"])
    before = collect(grid)
    for c in grid.cells():  # what a fresh clone of the repository holds: records and arguments only
        (run_dir(out, c) / "summary.json").unlink()
    args = json.loads((directory / "cell.json").read_text())["args"]
    assert done(out, cell, args) and collect(grid) == before
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows and all(0 <= float(r["pool_test_auc"]) <= 1 for r in rows)
    ignored = subprocess.run(
        ["git", "check-ignore", "benchmarks/results/heterogeneity_powered/runs/a/b/record.json",
         "benchmarks/results/heterogeneity_powered/runs/a/b/cell.json",
         "benchmarks/results/heterogeneity_powered/runs/a/b/summary.json",
         "benchmarks/results/heterogeneity_powered/runs/a/b/log.txt"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["benchmarks/results/heterogeneity_powered/runs/a/b/summary.json",
                                      "benchmarks/results/heterogeneity_powered/runs/a/b/log.txt"]


@pytest.mark.slow
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


def test_verdicts_have_four_outcomes_and_tell_equivalent_from_undetermined():
    better, worse = [0.05, 0.06, 0.04, 0.05, 0.05], [-0.05, -0.06, -0.04, -0.05, -0.05]
    close = [0.002, -0.001, 0.001, 0.0, -0.002, 0.001]  # tightly within the 0.02 margin
    noisy = [0.05, -0.04, 0.06, -0.05, 0.01]  # could be anything: neither test rejects
    assert outcomes([better, worse, close, noisy, [0.05]]) == ["better", "worse", "equivalent", "undetermined", "n/a"]
    # a mean inside the margin is not enough: the interval must lie inside it too
    assert outcomes([[0.015, -0.01, 0.03, 0.0, 0.02]]) == ["undetermined"]
    # a small difference shown to exist and shown to lie within the margin: the difference, marked
    assert outcomes([[0.008, 0.009, 0.008, 0.009, 0.008, 0.009]]) == ["better (within ±0.02)"]
    assert tost_p(close) < 0.001 and tost_p(noisy) == pytest.approx(0.284, abs=0.001)  # t = -0.62, df 4
    mean, std, half = interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_the_minimum_detectable_difference_by_hand():
    # issue 24's figure: sd 0.011 over 5 seeds -> (t_0.975,4 + t_0.8,4) * 0.011 / sqrt(5) = (2.776 + 0.941) * ...
    assert detectable(0.011, 5) == pytest.approx((2.7764 + 0.9410) * 0.011 / math.sqrt(5), rel=1e-3)
    assert math.isnan(detectable(0.011, 1))
    n = seeds_needed(0.048, 0.03)
    assert detectable(0.048, n) <= 0.03 < detectable(0.048, n - 1)


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


def partial_grid(tmp_path):
    """hsl and fedavg in quantity (2 steps) and feature, 5 seeds, a tuning search and a rerun sample."""
    grid = {"out": str(tmp_path / "out"), "data": ["configs/quickstart.yaml"], "seeds": [0, 1, 2, 3, 4],
            "tune": {"seeds": [100]}, "rerun": {"threads": 2, "every": 2},
            "methods": {"hsl": "configs/methods/hsl.yaml",
                        "fedavg": {"config": "configs/methods/fedavg.yaml",
                                   "search": {"model.init_args.lr": [0.01, 0.1]}}},
            "scenarios": {"quantity": {"config": "configs/scenarios/quantity.yaml",
                                       "sweep": {"key": "data.scenario.sizes", "steps": {"1": [1, 1], "4": [1, 4]}}},
                          "feature": "configs/scenarios/feature.yaml"},
            "compare": {"method": "hsl", "against": ["fedavg"]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return Grid.load(path)


def cell_rows(cell, auc, val_best_round=10):
    return [{"method": cell.method, "strategy": cell.method, "scenario": cell.scenario, "step": cell.step,
             "step_index": cell.step_index, "seed": cell.seed, "node": f"node{i}", "test_auc": auc + d,
             "pool_test_auc": auc + d, "val_auc": 0.8, "best_round": 40, "rounds": 40, "rounds_run": 40,
             "val_best_round": val_best_round, "deploy_round": "last", "external_auc": math.nan, "wall_s": 5.0,
             "bytes_per_round": 1e6} for i, d in enumerate((-0.01, 0.01))]


def test_the_report_says_how_far_the_grid_got_and_draws_verdicts_from_complete_seeds_only(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = partial_grid(tmp_path)
    # hsl beats fedavg by about 0.05 in quantity and ties it tightly in feature on seeds 0 to 3; seed 4 is part
    # done (its feature cells are missing) and would turn quantity around (-0.5) if a verdict used it
    gap = {("quantity", s): g for s, g in enumerate((0.05, 0.06, 0.04, 0.05, -0.5))}
    gap.update({("feature", s): g for s, g in enumerate((0.001, -0.001, 0.0, 0.002))})
    rows = []
    for cell in grid.cells():
        if (cell.scenario, cell.seed) in gap:
            rows += cell_rows(cell, 0.7 + (gap[(cell.scenario, cell.seed)] if cell.method == "hsl" else 0.0),
                              40 if cell.seed == 0 else 10)
    (tune,) = [c for c in grid.tuning_cells() if c.scenario == "feature" and c.candidate == "c0"]
    directory = run_dir(grid.out, tune)
    directory.mkdir(parents=True)
    (directory / "record.json").write_text(json.dumps({"mean_val_auc": 0.8, "nodes": [], "wall_s": 3600.0}))
    sample = [c for c in grid.rerun_cells(grid.cells()) if c.seed in (0, 1)]
    reruns = [dict(r, test_auc=r["test_auc"] + 0.001, pool_test_auc=r["pool_test_auc"] + 0.001)
              for c in sample for r in cell_rows(c, 0.7 + (gap[(c.scenario, c.seed)] if c.method == "hsl" else 0.0))]
    report = markdown(grid, rows, reruns=reruns)
    assert "- Tuning (seeds [100], not reported): 1 of 4 cells (quickstart 1 of 4); settings not chosen yet" in report
    assert ("Reported cells: 28 of 30. Seeds complete (every reported cell finished): 4 of 5 (0, 1, 2, 3); part "
            "done: seed 4 (4 of 6 cells).") in report
    assert "Figures and verdicts use the complete seeds only (0, 1, 2, 3)" in report
    assert "- Thread-count reruns: 6 of 15 cells." in report
    # the hours the cells ran: each cell once (its nodes' rows carry the same wall time), stage by stage
    assert ("- Compute: the finished cells' own wall times add up to 1.05 h (tuning 1.00 h, reported 0.04 h, "
            "thread-count reruns 0.01 h).") in report
    headline = report.split("## hsl against the references: pool test AUC (headline)")[1].split("\n## ")[0]
    # the MDD for one test and at Holm's strictest level (0.05 / 2 rows): (t quantiles) * std / sqrt(4 seeds)
    assert "| quantity | fedavg | 4 | 0.050 ± 0.008 | 0.013 | 0.017 | 0.021 |" in headline
    assert headline.count("| better |") == 1
    assert "| feature | fedavg | 4 |" in headline and "| equivalent |" in headline
    assert "Verdicts per dataset: quickstart: 1 better, 1 equivalent." in headline
    # the rerun moved every figure by +0.001 and changed no verdict; seed 0's cells peaked in their last round
    assert "| pool_test_auc | 6 | +0.0010 | 0.0010 | 0.0010 | 0 of 6 |" in report
    assert "(pool_test_auc, complete seeds, 6 cells swapped) that change with the rerun cells in place: none" in report
    # the figures use the complete seeds, as the verdicts: seed 4's finished cells enter no table
    assert "| hsl | 12 | 12 | 100 % | 12 (100 %) | 0 | 40.0 | 40 | 3 of 12 (25 %) |" in report
    assert "(24 of 24 cells deploy the last round by the rule 'last')" in report
    assert ("Above the study's rule of at most 10 % (best validation AUC in the last round): fedavg (25 %), hsl "
            "(25 %)") in report
    # cost per scenario: every cell ran 5 s and sent 1 MB a round
    assert "| method | feature | quantity | MB sent per node per round |" in report
    assert "| hsl | 5 | 5 | 1.00 |" in report
    quantity = report.split("\n## quantity\n")[1].split("\n## ")[0]
    assert quantity.count("| 4 |\n") == 4 and "| 5 |" not in quantity  # 2 methods x 2 steps, 4 seeds each
    # with no complete seed there is no verdict at all, and the report says so
    early = markdown(grid, [r for r in rows if r["seed"] == 4])
    assert "No seed is complete, so this report draws no verdict" in early and "## hsl against" not in early
    assert "Seeds complete (every reported cell finished): none of 5; part done: seed 4 (4 of 6 cells)" in early
    assert "No reported cell has finished yet" in markdown(grid, [])


def test_the_round_of_best_validation_auc_comes_from_the_record_or_the_history():
    assert _val_best_round({"curves": {"mean_val_auc": [0.5, 0.7, 0.6]}}) == 2
    assert _val_best_round({"history": [{"mean_val_auc": v} for v in (0.5, 0.6, 0.7)]}) == 3
    assert math.isnan(_val_best_round({}))


def test_the_report_of_a_study_whose_results_predate_the_rounds_columns_says_so_instead_of_failing():
    """Older studies' results.csv has no 'rounds'/'rounds_run': --report-only must still write a report."""
    from hsl_lightning.benchmark.sections import convergence

    old = [{"method": "hsl", "scenario": "feature", "step": "-", "seed": 0, "best_round": "3", "rounds": ""}]
    text = "\n".join(convergence(None, old))
    assert text.startswith("## Convergence") and "predates the columns 'rounds'" in text


def test_study_cells_sum_in_float64_unless_the_grid_asks_otherwise():
    """The studies' committed cells summed in float64; a resumed grid must not mix in fixed-point
    cells (secure aggregation's default), and the arguments recorded in cell.json stay as they were."""
    from hsl_lightning.benchmark.runner import float_sum

    assert float_sum(["fit", "--config", "a.yaml"]) == ["--federation.secure_aggregation", "false"]
    assert float_sum(["fit", "--federation.secure_aggregation", "true"]) == []
    assert float_sum(["fit", "--federation.privacy", "{}"]) == []  # DP needs the secure sum

"""The powered study's grid machinery (issue 24): the pilot of deployed-round rules, the thread-count
rerun sample, scenarios that run some methods only, and compact records a later session resumes from."""

import json

import pytest
import yaml

from hsl_lightning import HSLError
from hsl_lightning.benchmark import Grid
from hsl_lightning.benchmark.grid import run_dir
from hsl_lightning.benchmark.report import pilot_section
from hsl_lightning.benchmark.sections import progress
from hsl_lightning.benchmark.runner import CURVES, cell_args, run_grid
from hsl_lightning.benchmark.tuning import choose_rule, replay, rule_settings
from hsl_lightning.cli import main

from conftest import REPO

SMOKE = REPO / "configs" / "benchmarks" / "smoke.yaml"
POWERED = REPO / "configs" / "benchmarks" / "heterogeneity_powered.yaml"


def pilot_grid(tmp_path, **pilot):
    grid = yaml.safe_load(SMOKE.read_text())
    grid.update(out=str(tmp_path / "out"), pilot={"seeds": [101, 102], "rules": ["best_auc", "best_loss", "last"],
                                                  **pilot})
    grid["settings"]["federation.patience"] = 2
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return Grid.load(path)


def write_curves(grid, cell, **curves):
    directory = run_dir(grid.out, cell)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(curves["mean_val_auc_a"])
    full = {k: curves.get(k, [0.5] * n) for k in CURVES}
    (directory / "record.json").write_text(json.dumps({"curves": full, "mean_val_auc": 0.0, "nodes": []}))


def test_replay_is_the_federations_early_stopping():
    values = [0.5, 0.7, 0.6, 0.65, 0.8]
    assert replay(values, 2) == 1  # rounds 3 and 4 spend the patience: round 5's 0.8 is never reached
    assert replay(values, 3) == 4 and replay(values, None) == 4
    assert replay([float("nan"), 0.2, 0.2], None) == 1  # a defined value beats NaN; a tie keeps the first


def test_the_pilot_scores_each_rule_on_the_other_half_and_picks_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = pilot_grid(tmp_path)
    cells = grid.pilot_cells()
    assert len(cells) == 2 * 2 * 2 and all(c.key.startswith("pilot/") for c in cells)
    assert all(dict(c.settings)["federation.deploy_round"] == "last" for c in cells)
    assert all(dict(c.settings)["federation.patience"] is None for c in cells)
    for cell in cells:
        # half A's AUC peaks by chance (seed 101: round 1, where half B is poor; seed 102: round 6);
        # the loss is least in round 4, where half B is best. 'last' takes its number of rounds from
        # the other seed: 6 for seed 101 (half B 0.7), 1 for seed 102 (0.5)
        peak = [0.9, 0.6, 0.6, 0.7, 0.6, 0.8, 0.6] if cell.seed == 101 else [0.6, 0.6, 0.6, 0.7, 0.6, 0.95, 0.6]
        write_curves(grid, cell, mean_val_auc_a=peak, mean_val_auc_b=[0.5, 0.6, 0.6, 0.8, 0.7, 0.7, 0.6],
                     sum_val_loss_a=[9.0, 8.0, 7.0, 5.0, 6.0, 6.0, 7.0],
                     mean_val_auc=[0.7, 0.6, 0.6, 0.75, 0.65, 0.75, 0.6])
    assert choose_rule(grid, {}) == "best_loss"
    record = json.loads((grid.out / "pilot.json").read_text())
    assert record["mean_val_auc_b"] == pytest.approx({"best_auc": 0.5, "best_loss": 0.8, "last": 0.6})
    first = record["cells"][0]
    assert (first["best_auc"]["round"], first["best_loss"]["round"], first["last"]["round"]) == (1, 4, 6)
    # the report's pilot table: best_auc's tiny half A stops at round 1 in every cell; 'last' at 6 or 1 by seed
    table = "\n".join(pilot_section(grid))
    assert "| best_auc | 0.500 | 8 | 1.0 | 8 |" in table and "| last | 0.600 | 8 | 3.5 | 4 |" in table
    assert "| best_loss | 0.800 | 8 | 4.0 | 0 |" in table and "Chosen, and applied to every method alike: **best_loss**" in table
    # the chosen rule against each other one, cell by cell: half B 0.8 against 0.5 everywhere; against 'last'
    # 0.8 - 0.7 (seed 101) and 0.8 - 0.5 (seed 102)
    assert "best_loss minus best_auc, paired by cell: +0.3000 ± 0.000 (std over 8 cells;" in table
    assert "best_loss minus last, paired by cell: +0.2000 ± 0.107 (std over 8 cells;" in table
    settings = rule_settings(grid, {}, "best_loss")
    assert settings[("hsl", "quantity")] == {"federation.deploy_round": "best_loss"}
    # under 'last' each (method, scenario) runs the round of best mean whole-set validation AUC
    last = rule_settings(grid, {}, "last")
    assert last[("fedavg", "quantity")] == {"federation.deploy_round": "last", "federation.rounds": 4,
                                            "federation.patience": None}
    assert json.loads((grid.out / "pilot.json").read_text())["rounds_under_last"]["fedavg/quantity"] == 4


def test_a_tie_in_the_pilot_keeps_the_rule_listed_first(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = pilot_grid(tmp_path)
    for cell in grid.pilot_cells():
        write_curves(grid, cell, mean_val_auc_a=[0.6, 0.7], mean_val_auc_b=[0.7, 0.7], sum_val_loss_a=[2.0, 1.0])
    assert choose_rule(grid, {}) == "best_auc"


def test_pilot_seeds_must_not_be_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(HSLError, match="both pilot and reported"):
        pilot_grid(tmp_path, seeds=[0])
    with pytest.raises(HSLError, match="neither deploy_round rules"):
        pilot_grid(tmp_path, rules=["best"])


def test_the_powered_study_reruns_a_spread_sample_and_runs_pneumonia_with_four_methods(monkeypatch):
    monkeypatch.chdir(REPO)
    grid = Grid.load(POWERED)
    cells = grid.cells()
    per_seed = [c for c in cells if c.seed == 0]
    assert len(per_seed) == 7 * 4 + 4 * 2
    assert {c.method for c in per_seed if c.scenario.startswith("pneumonia")} == {"hsl", "fedavg", "fedprox", "moon"}
    assert all(not c.candidate for c in cells) and grid.tuning_cells()[0].seed == 100
    reruns = grid.rerun_cells(cells)
    assert len(reruns) >= 0.1 * len(cells)
    assert {c.method for c in reruns} == set(grid.methods) and {c.scenario for c in reruns} == set(grid.scenarios)
    assert len({(c.method, c.scenario, c.seed) for c in reruns}) == len(reruns)
    args = cell_args(reruns[0], run_dir(grid.out, reruns[0]), threads=1)
    assert args[args.index("--federation.threads") + 1] == "2" and reruns[0].key.startswith("rerun/threads2/")
    ordered = grid.ordered(cells)
    assert [c.seed for c in ordered] == sorted(c.seed for c in ordered)  # whole seeds first, reruns inside them
    assert ordered[len(per_seed)].stage == "rerun"


@pytest.mark.slow
def test_a_grid_with_a_pilot_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = yaml.safe_load(SMOKE.read_text())
    grid["scenarios"]["quantity"]["sweep"]["steps"] = {"4": [1, 4]}
    grid["methods"] = {"fedavg": "configs/methods/fedavg.yaml"}
    grid["compare"] = {}
    grid.pop("compare")
    grid["settings"].update({"federation.rounds": 2, "federation.patience": 1})
    grid.update(pilot={"seeds": [101, 102], "rules": ["best_auc", "last"]}, rerun={"threads": 2, "every": 1})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    main(["benchmark", "--config", str(path), "--out", str(out), "--wandb", "disabled"])
    assert "(0 failed)" in capsys.readouterr().out
    pilot = json.loads((out / "pilot.json").read_text())
    loaded = Grid.load(path, out=str(out))
    (cell,) = loaded.cells()
    summary = json.loads((run_dir(out, cell) / "summary.json").read_text())
    assert summary["deploy_round"] == pilot["chosen"]
    rerun = json.loads((run_dir(out, loaded.rerun_cells([cell])[0]) / "summary.json").read_text())
    assert rerun["threads_per_institution"] * rerun["institutions_at_once"] == 2
    for c in loaded.pilot_cells():
        s = json.loads((run_dir(out, c) / "summary.json").read_text())
        assert s["deploy_round"] == "last" and s["rounds_run"] == 2 and s["patience"] is None


def test_a_resumed_grid_counts_every_cell_once(tmp_path, monkeypatch):
    """Under 'last' the scenarios outside pilot.scenarios get pilot cells too, after the rule is chosen:
    they enter the total then, and the piloted scenarios' cells are not counted a second time."""
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(SMOKE.read_text())
    raw["scenarios"]["feature"] = {"config": "configs/scenarios/feature.yaml"}
    raw.update(out=str(tmp_path / "out"), rerun={"threads": 2, "every": 2},
               pilot={"seeds": [101, 102], "rules": ["last", "best_auc"], "scenarios": ["quantity"]})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    grid = Grid.load(path)
    extra = grid.pilot_cells(every_scenario=True)
    assert len(extra) > len(grid.pilot_cells()) > 0
    for cell in extra:  # the rules tie here, and a tie keeps the rule listed first: last
        write_curves(grid, cell, mean_val_auc_a=[0.9, 0.6, 0.6], mean_val_auc_b=[0.5, 0.6, 0.8],
                     mean_val_auc=[0.6, 0.6, 0.7])
    assert choose_rule(grid, {}) == "last"
    chosen = rule_settings(grid, {}, "last")
    reported = grid.ordered(grid.cells(chosen))
    for cell in reported:
        run_dir(grid.out, cell).mkdir(parents=True, exist_ok=True)
        (run_dir(grid.out, cell) / "record.json").write_text(json.dumps({"nodes": []}))
    counts = run_grid(grid, progress=False)
    assert counts["ran"] == counts["failed"] == 0
    assert counts["already_done"] == counts["cells"] == len(extra) + len(reported)
    # and the report's progress says what the pilot ran: its own cells and the other scenarios'
    more = len(extra) - len(grid.pilot_cells())
    line = next(x for x in progress(grid, [], []) if x.startswith("- Pilot"))
    assert f"{len(grid.pilot_cells())} of {len(grid.pilot_cells())} cells; rule chosen: last" in line
    assert f"under 'last', {more} of {more} more cells set the other scenarios' numbers of rounds." in line

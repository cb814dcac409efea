"""What makes the heterogeneity study fair: each confound the first study had, pinned by a test
that fails on the old behaviour; early stopping; the external site; tuning on validation data."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hsl_lightning import ClassifierModule, Federation, HSLError
from hsl_lightning.benchmark import Grid
from hsl_lightning.benchmark.grid import run_dir
from hsl_lightning.benchmark.report import Stats, coinciding, edges, holm, markdown, p_value, tuning_section
from hsl_lightning.benchmark.tuning import choose
from hsl_lightning.data.heterogeneity import ExternalSite
from hsl_lightning.federation import phases
from hsl_lightning.federation.strategies import _last_activation, get_strategy

from conftest import REPO, tiny_data, tiny_hsl

STUDY = REPO / "configs" / "benchmarks" / "heterogeneity.yaml"


def batchnorm_steps(module: nn.Module) -> set[int]:
    return {int(m.num_batches_tracked) for m in module.modules() if isinstance(m, nn.BatchNorm2d)}


# ---------------------------------------------------------------- the confounds
def test_moon_moves_batchnorm_statistics_once_per_step():
    """MOON's representation comes from the training forward: a second train-mode encoder pass
    would count every step twice (the first study's MOON did)."""
    torch.manual_seed(0)
    model = ClassifierModule(backbone="test_resnet")
    strategy = get_strategy("moon", {"mu": 1.0})
    loader = tiny_data(use_sat=False, batch_size=8).train_loader([0], seed=0, with_sat=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    strategy.begin_local(model, trainee=0)
    model.train()
    steps = 0
    for i, batch in enumerate(loader):
        loss = model.training_step(batch, i) + strategy.local_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    strategy.end_local(model, 0, steps, optimizer)
    assert steps >= 2 and batchnorm_steps(model) == {steps}
    assert batchnorm_steps(strategy._frozen_copy(model)) == {steps}  # the frozen copies count nothing


def test_moon_contrasts_the_representation_of_the_training_forward():
    torch.manual_seed(0)
    model = ClassifierModule(backbone="test_resnet")
    strategy = get_strategy("moon", {"mu": 1.0})
    batch = next(iter(tiny_data(use_sat=False).train_loader([0], seed=0, with_sat=False)))
    strategy.begin_local(model, trainee=0)
    model.train()
    with pytest.raises(HSLError, match="did not run its representation_layer"):
        strategy.local_loss(model, batch)  # no training forward yet: nothing to contrast
    model.training_step(batch, 0)
    z = strategy._z
    term = strategy.local_loss(model, batch)
    term.backward()
    assert z.grad_fn is not None and next(model.encoder.parameters()).grad is not None
    strategy.end_local(model, 0, 1, None)
    model.training_step(batch, 0)
    assert strategy._z is None  # the hook left with the round


def test_scaffold_refuses_adaptive_optimizers(tmp_path):
    with pytest.raises(HSLError, match="plain SGD.*adamw"):
        Federation(strategy="scaffold", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False).fit(
            ClassifierModule(backbone="test_resnet"), tiny_data(use_sat=False))
    with pytest.raises(HSLError, match="momentum 0.9"):
        get_strategy("scaffold").setup(ClassifierModule(backbone="test_resnet", optimizer="sgd", momentum=0.9), 3)
    model = nn.Linear(3, 1)  # a module of the user's own: its optimizer is checked when the round ends
    strategy = get_strategy("scaffold")
    strategy.begin_local(model, trainee=0)
    with pytest.raises(HSLError, match="Adam"):
        strategy.end_local(model, 0, 1, torch.optim.Adam(model.parameters()))


def test_fedrcl_taps_its_levels_before_the_activation_by_default():
    torch.manual_seed(0)
    batch = next(iter(tiny_data(use_sat=False).train_loader([0], seed=0, with_sat=False)))
    pooled, expected = {}, []
    for tap in ("pre_activation", "post_activation"):
        torch.manual_seed(0)
        model = ClassifierModule(backbone="test_resnet")
        strategy = get_strategy("fedrcl", {"tap": tap})
        strategy.begin_local(model, 0)
        if tap == "pre_activation":  # what enters each level's last ReLU: the stem's BN output, each stage's sum
            spies = [_last_activation(level).register_forward_pre_hook(
                lambda _, inputs: expected.append(F.normalize(inputs[0].mean(dim=(2, 3)), dim=1).detach()))
                for level in model.feature_levels()]
        model.train()
        model.training_step(batch, 0)
        pooled[tap] = [z.detach() for z in strategy._levels]
        strategy.end_local(model, 0, 1, None)
        assert len(pooled[tap]) == 5  # stem and four stages either way
    for spy in spies:
        spy.remove()
    assert all(torch.allclose(a, b) for a, b in zip(pooled["pre_activation"], expected))
    assert all((z >= 0).all() for z in pooled["post_activation"])  # after a ReLU
    assert (pooled["pre_activation"][0] < 0).any()  # before it: the stem's BatchNorm output has both signs
    assert get_strategy("fedrcl").tap == "pre_activation"


def test_splitavg_draws_the_same_number_of_images_from_every_site():
    data = tiny_data(use_sat=False, scenario=__import__("hsl_lightning").Scenario(num_nodes=3, sizes=[6, 2, 1]))
    data.setup()
    pooled = data.train_loader([0, 1, 2], seed=0, with_sat=False)
    fixed = data.train_loader([0, 1, 2], seed=0, with_sat=False, **get_strategy("splitavg").loader_options())
    assert len(fixed) == len(pooled)  # as many steps per epoch as the pooled draw
    for batch in fixed:
        assert torch.bincount(batch["node"], minlength=3).tolist() == [10, 10, 10]  # batch 32 over 3 sites
    shares = torch.bincount(torch.cat([b["node"] for b in pooled]), minlength=3)
    assert shares[0] > 3 * shares[2]  # the old, size-proportional draw
    assert get_strategy("splitavg", {"site_batch": "proportional"}).loader_options() == {"per_node_batch": False}


def test_hsl_epochs_can_take_the_steps_of_a_single_task_model_on_the_same_node():
    """The reference's epoch covers the longer of a node's primary set and SAT shard; with a large
    shard that is several passes over the primary images per epoch. ``samples_per_epoch: primary``
    gives HSL a single-task model's steps, for comparisons at an equal budget."""
    big_sat = dict(sat=__import__("hsl_lightning").SyntheticAnchor(num_samples=900, size=28), sat_fraction=0.3)
    reference, equal = tiny_data(**big_sat), tiny_data(samples_per_epoch="primary", **big_sat)
    single = tiny_data(use_sat=False)
    for data in (reference, equal, single):
        data.setup()
    for node in range(3):
        steps = len(single.train_loader([node], seed=0, with_sat=False))
        assert len(equal.train_loader([node], seed=0)) == steps
        assert len(reference.train_loader([node], seed=0)) >= 3 * steps  # 270 SAT images against about 48
        batch = next(iter(equal.train_loader([node], seed=0)))
        assert batch["sat_image"].shape[0] == batch["image"].shape[0] == 32  # still paired
    assert tiny_data(samples_per_epoch="longer").samples_per_epoch is None
    with pytest.raises(HSLError, match="samples_per_epoch must be a positive number of pairs, 'longer' or 'primary'"):
        tiny_data(samples_per_epoch="half")


def test_hsl_experts_gates_and_towers_start_xavier_uniform():
    torch.manual_seed(0)
    xavier, default = tiny_hsl(), tiny_hsl(init="torch")
    for name, layer in xavier.net.named_modules():
        if isinstance(layer, nn.Linear) and name.startswith(("mmoe.", "primary_tower", "sat_tower")):
            fan_out, fan_in = layer.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
            assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(default.net.primary_tower[0].bias) > 0  # torch's default draws the biases
    with pytest.raises(HSLError, match="init must be"):
        tiny_hsl(init="he")


def test_strategy_options_given_as_cli_strings_are_read_as_yaml_scalars():
    assert get_strategy("fedprox", {"mu": "0.5"}).mu == 0.5
    assert get_strategy("fedrcl", {"tap": "post_activation", "negatives": "3"}).negatives == 3


def test_the_study_gives_every_method_the_same_budget_and_a_search(monkeypatch):
    """Equal rounds, local epochs and stopping rule for every cell (the first study gave FedRep 2
    epochs to the others' 1), a tuned learning rate for every method, FedAvg with SCAFFOLD's
    optimizer as its control, and tuning seeds apart from the reported ones."""
    monkeypatch.chdir(REPO)
    grid = Grid.load(STUDY)
    budgets = {(dict(c.settings)["federation.rounds"], dict(c.settings)["federation.local_epochs"],
                dict(c.settings)["federation.patience"]) for c in grid.cells() + grid.tuning_cells()}
    assert len(budgets) == 1 and next(iter(budgets))[2] is not None
    for method, entry in grid.methods.items():
        assert "model.init_args.lr" in entry["search"], method
        assert "federation.local_epochs" not in entry["settings"], method
    assert {"federation.strategy_options.mu"} <= set(grid.methods["fedprox"]["search"])
    assert {"federation.strategy_options.mu"} <= set(grid.methods["moon"]["search"])
    assert {"federation.strategy_options.lam"} <= set(grid.methods["ditto"]["search"])
    assert {"model.init_args.sat_weight", "data.sat_fraction"} <= set(grid.methods["hsl"]["search"])
    control, scaffold = grid.methods["swarm_sgd"], grid.methods["scaffold"]
    assert control["settings"]["model.init_args.optimizer"] == "sgd"
    assert control["settings"]["federation.strategy"] == "swarm"  # SCAFFOLD's unweighted mean
    assert not get_strategy("swarm").size_weighted and not get_strategy("scaffold").size_weighted
    for method in ("hsl", "hsl_synthetic_sat"):  # HSL at the others' steps per round, sending its last epoch
        assert grid.methods[method]["settings"]["data.samples_per_epoch"] == "primary"
        assert grid.methods[method]["settings"]["federation.contribute"] == "last"
    assert all(dict(c.settings).get("federation.contribute", "last") == "last" for c in grid.cells())
    assert control["search"]["model.init_args.lr"] == scaffold["search"]["model.init_args.lr"]
    assert not set(grid.tune["seeds"]) & set(grid.seeds)
    assert {"feature", "combined", "label", "quantity"} <= set(grid.scenarios)
    assert len(grid.seeds) == 5


# ---------------------------------------------------------------- early stopping
def test_early_stopping_ends_the_run_once_patience_has_passed(tmp_path, monkeypatch):
    flat = [{"auc": 0.7, "acc": 0.5, "sensitivity": 0.5, "specificity": 0.5, "loss": 1.0, "n": 4.0, "auc_a": 0.7,
             "auc_b": 0.7, "loss_a": 0.5}] * 3
    monkeypatch.setattr(phases, "validate_trainees", lambda run, trainees, merged: flat)  # the simulator's rounds
    summary = Federation(strategy="fedavg", rounds=8, patience=2, run_dir=str(tmp_path), wandb="disabled",
                         progress=False, checkpoint=False).fit(ClassifierModule(backbone="test_resnet"),
                                                               tiny_data(use_sat=False))
    # round 1 is best (later rounds only tie), so rounds 2 and 3 spend the patience
    assert summary["best_round"] == 1 and summary["rounds_run"] == 3 and summary["stopped_early"]
    assert summary["patience"] == 2 and len(summary["history"]) == 3 and summary["rounds"] == 8
    with pytest.raises(HSLError, match="at least val_every_n_rounds"):
        Federation(patience=1, val_every_n_rounds=2)


# ---------------------------------------------------------------- the unseen site
def test_the_external_site_is_carved_out_before_the_nodes_and_has_its_own_rate():
    plain, carved = tiny_data(use_sat=False), tiny_data(use_sat=False, external=ExternalSite(fraction=0.2,
                                                                                            prevalence=0.5))
    plain.setup(), carved.setup()
    site = carved.external_data
    held = sum(len(n.split(s)) for n in carved.nodes for s in ("train", "val", "test"))
    total = sum(len(n.split(s)) for n in plain.nodes for s in ("train", "val", "test"))
    assert len(site) == pytest.approx(0.2 * 240, abs=2) and held + len(site) <= total
    assert site.positives == pytest.approx(len(site) / 2, abs=1)
    assert carved.report()[-1]["external"] and carved.report()[-1]["n_test"] == len(site)
    with pytest.raises(HSLError, match="fraction must lie in"):
        ExternalSite(fraction=1.0)


def test_every_deployed_model_is_scored_on_the_external_site(tmp_path):
    torch.manual_seed(0)
    data = tiny_data(use_sat=False, external=ExternalSite(name="unseen", fraction=0.2))
    summary = Federation(strategy="local", rounds=1, run_dir=str(tmp_path), wandb="disabled", progress=False,
                         checkpoint=False).fit(ClassifierModule(backbone="test_resnet"), data)
    (site,) = summary["external"]
    assert site["name"] == "unseen" and site["n"] == len(data.external_data)
    aucs = list(site["node_aucs"].values())
    assert len(aucs) == 3 and len(set(aucs)) > 1  # three local models, three different scores
    assert site["auc"] == pytest.approx(sum(aucs) / 3)


# ---------------------------------------------------------------- tuning on validation data
def tuning_grid(tmp_path, seeds=(0,), tune_seeds=(100, 101)):
    grid = {
        "out": str(tmp_path / "out"), "data": [], "seeds": list(seeds), "tune": {"seeds": list(tune_seeds)},
        "methods": {"fedavg": {"config": "configs/methods/fedavg.yaml",
                               "search": {"model.init_args.lr": [0.1, 0.2, 0.3]}},
                    "local": "configs/methods/local.yaml"},
        "scenarios": {"quantity": {"config": "configs/scenarios/quantity.yaml",
                                   "sweep": {"key": "data.scenario.sizes", "steps": {"1": [1, 1], "4": [1, 4],
                                                                                    "8": [1, 8]}}}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    return Grid.load(path)


def test_tuning_picks_the_best_mean_validation_auc_and_never_reads_test_auc(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = tuning_grid(tmp_path)
    cells = grid.tuning_cells()
    assert len(cells) == 3 * 2 and {c.step for c in cells} == {"4"}  # the middle step; local has no search
    val = {("c0", 100): 0.7, ("c0", 101): 0.7, ("c1", 100): 0.9, ("c1", 101): 0.6, ("c2", 100): 0.76,
           ("c2", 101): 0.76}
    for cell in cells:  # c2 has the best mean (0.76 against 0.75 and 0.70) but the worst test AUC
        directory = run_dir(grid.out, cell)
        directory.mkdir(parents=True)
        test = 0.1 if cell.candidate == "c2" else 0.99
        (directory / "summary.json").write_text(json.dumps({"mean_val_auc": val[(cell.candidate, cell.seed)],
                                                            "mean_test_auc": test}))
    chosen = choose(grid)
    assert chosen == {("fedavg", "quantity"): {"model.init_args.lr": 0.3}}
    record = json.loads((grid.out / "tuning.json").read_text())
    assert record["tuning_seeds"] == [100, 101] and record["choices"][0]["chosen"] == "c2"
    reported = [c for c in grid.cells(chosen) if c.method == "fedavg"]
    assert reported and all(dict(c.settings)["model.init_args.lr"] == 0.3 for c in reported)
    assert all(c.seed == 0 for c in grid.cells(chosen))
    section = "\n".join(tuning_section(grid))  # 0.3 is the top of the searched range: flagged
    assert "| fedavg | quantity (4) | lr=0.3 | 0.760 | lr highest |" in section and "1 of 1 choices" in section
    assert edges(grid, "fedavg", {"model.init_args.lr": 0.2}) == []
    assert edges(grid, "fedavg", {"model.init_args.lr": 0.1}) == ["lr lowest"]


def test_tuning_seeds_must_not_be_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(HSLError, match="both tuning and reported"):
        tuning_grid(tmp_path, seeds=(0, 100))
    with pytest.raises(HSLError, match="needs tune"):
        tuning_grid(tmp_path, tune_seeds=())


def test_the_report_names_methods_that_coincide_instead_of_ranking_them_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = tuning_grid(tmp_path)
    grid.methods["personalized"] = grid.methods["local"]
    rows = []
    for method, aucs in (("fedavg", [0.7, 0.8]), ("local", [0.6, 0.9]), ("personalized", [0.6, 0.9])):
        for node, auc in enumerate(aucs):
            rows.append({"method": method, "strategy": method, "scenario": "quantity", "step": "1", "step_index": 0,
                         "seed": 0, "node": f"node{node}", "test_auc": auc, "val_auc": auc, "best_round": 3,
                         "rounds": 10, "rounds_run": 9, "external_auc": 0.5})
    assert coinciding(grid, Stats(rows)) == {("personalized", "quantity"): "local"}
    report = markdown(grid, rows)
    assert "| personalized | = local |" in report and "## Convergence" in report
    assert "| local | 1 | 0 | 0 % | 0 (0 %) | 0 | 9.0 | 10 |" in report


def test_the_report_corrects_its_verdicts_for_the_number_of_comparisons():
    # Holm at 5 % over 4 tests: 0.01 <= 0.05/4 is rejected, then 0.02 > 0.05/3 stops the step-down
    assert [r for _, r in holm([0.02, 0.01, 0.04, math.nan, 0.3])] == [False, True, False, False, False]
    assert [r for _, r in holm([0.001, 0.01, 0.02])] == [True, True, True]  # 0.02 <= 0.05/1
    assert p_value([0.1, 0.1, 0.1]) < 1e-12 and p_value([0.0, 0.0]) == 1.0 and math.isnan(p_value([0.2]))
    assert p_value([0.01, 0.03, 0.02, -0.01, 0.04]) == pytest.approx(0.1045, abs=1e-4)  # t = 2.09, df 4


def test_the_report_counts_cells_that_ran_their_whole_budget_and_lists_unfinished_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = tuning_grid(tmp_path)
    rows = [{"method": "fedavg", "strategy": "fedavg", "scenario": "quantity", "step": step, "step_index": i, "seed": 0,
             "node": "node0", "test_auc": 0.8, "val_auc": 0.8, "best_round": best, "rounds": 10, "rounds_run": run,
             "external_auc": 0.5, "wall_s": 12.0, "bytes_per_round": 2.0e6}
            for i, (step, best, run) in enumerate((("1", 4, 10), ("4", 10, 10), ("8", 3, 9)))]
    report = markdown(grid, rows)
    assert "| fedavg | 3 | 1 | 33 % | 2 (67 %) | 0 | 9.7 | 10 |" in report  # best round 4 of 10: not early-stopped
    assert "| fedavg | 12 | 2.00 |" in report  # the cost table
    assert "6 reported cells have no result; 0 of them failed" in report  # no summary.json was written
    cell = grid.cells()[0]
    grid.out.mkdir(parents=True, exist_ok=True)
    (grid.out / "failures.jsonl").write_text(json.dumps({"cell": cell.key, "error": "out of memory"}) + "\n")
    assert f"- {cell.key}: out of memory" in markdown(grid, rows)


# ---------------------------------------------------------------- misuses refused (issue 16)
@pytest.mark.parametrize("strategy", ["scaffold", "moon"])
def test_contributing_the_best_epoch_is_refused_where_the_strategy_reads_the_last(strategy):
    with pytest.raises(HSLError, match=f"contribute 'best' .* {strategy} builds its state .*contribute: last"):
        Federation(strategy=strategy, contribute="best", local_epochs=2)
    Federation(strategy=strategy, contribute="best", local_epochs=1)  # one epoch: best is last
    Federation(strategy="fedavg", contribute="best", local_epochs=2)  # reads nothing of the last epoch


def test_gradient_editing_strategies_are_refused_under_the_16_bit_grad_scaler():
    with pytest.raises(HSLError, match="scaffold edits the gradients .* '16-mixed' .* bf16-mixed or 32-true"):
        Federation(strategy="scaffold", precision="16-mixed")
    Federation(strategy="scaffold", precision="bf16-mixed")  # no scaler there
    Federation(strategy="fedavg", precision="16-mixed")  # nothing edits its gradients

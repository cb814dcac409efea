import json
import math

import pytest
import torch

from hsl_lightning import Federation, HSLError, Scenario
from hsl_lightning.metrics import NodeMetrics
from hsl_lightning.modules import HSLModule

from conftest import tiny_classifier, tiny_data, tiny_hsl


def max_dw(a: dict, b: dict) -> float:
    """max |dw|: the largest difference between two state dicts' entries (they must hold the same keys)."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def saved_state(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def fit(tmp_path, model=None, data=None, **kwargs):
    kwargs = {"rounds": 2, "run_dir": str(tmp_path / "run"), "wandb": "disabled", "progress": False, **kwargs}
    torch.manual_seed(0)
    return Federation(**kwargs).fit(model if model is not None else tiny_hsl(), data if data is not None else tiny_data())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One 3-round run of the default federation (HSL, 3 nodes): its run directory, summary and data, read
    by the tests of what a run writes (trained once for them all)."""
    tmp, dm = tmp_path_factory.mktemp("default_run"), tiny_data()
    return tmp / "run", fit(tmp, data=dm, rounds=3), dm


def test_summary_has_the_documented_fields(default_run):
    run, summary, _ = default_run
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["mean_test_auc"] == summary["mean_test_auc"]
    for key in ("method", "seed", "rounds", "wall_s", "nodes", "mean_test_auc", "std_test_auc", "min_test_auc"):
        assert key in on_disk, key
    for node in on_disk["nodes"]:
        assert set(node) >= {"name", "n_train", "n_val", "n_test", "test_auc", "val_auc"}
    assert on_disk["method"] == "hsl" and on_disk["rounds"] == 3
    aucs = [n["test_auc"] for n in on_disk["nodes"]]
    assert on_disk["mean_test_auc"] == pytest.approx(sum(aucs) / len(aucs))
    assert on_disk["min_test_auc"] == min(aucs)


def test_reported_test_auc_is_that_of_the_saved_model(default_run):
    run, summary, dm = default_run
    # the Lightning checkpoint alone rebuilds the module: hyper-parameters included, no config needed
    model = HSLModule.load_from_checkpoint(run / "model.ckpt", weights_only=True)
    saved = torch.load(run / "model.ckpt", weights_only=True)
    model.set_sat_reference(dm.sat_reference())
    model.eval()
    for i, node in enumerate(summary["nodes"]):
        m = NodeMetrics()
        with torch.no_grad():
            for batch in dm.eval_loader(i, "test"):
                m.update(model.primary_logits(batch), batch["label"])
        assert m.compute()["auc"] == pytest.approx(node["test_auc"], abs=1e-6)
    assert saved["hsl"]["round"] == summary["best_round"] and saved["hsl"]["threshold"] == summary["threshold"]


def test_final_round_is_the_one_with_best_mean_validation_auc(default_run):
    _, summary, _ = default_run
    history = [h["mean_val_auc"] for h in summary["history"]]
    assert summary["best_round"] == 1 + max(range(3), key=lambda r: (history[r], -r))
    assert summary["mean_val_auc"] == max(history)


@pytest.mark.slow
def test_validation_every_n_rounds_skips_the_others_and_deploys_a_validated_round(tmp_path):
    every = fit(tmp_path / "every", strategy="fedavg", rounds=3)
    summary = fit(tmp_path / "sparse", strategy="fedavg", rounds=3, val_every_n_rounds=2)
    validated = [h["round"] for h in summary["history"] if "mean_val_auc" in h]
    assert validated == [2, 3]  # every 2nd round, and always the last
    assert "node0/val_auc" not in summary["history"][0] and "node0/train_loss" in summary["history"][0]
    assert summary["best_round"] in validated
    # validation only reads: the rounds it does validate equal those of a run validating every round,
    # and the federation's weights after the last round are those of a run validating every round
    for a, b in zip(every["history"][1:], summary["history"][1:]):
        assert a["mean_val_auc"] == b["mean_val_auc"]
    last = [torch.load(tmp_path / run / "run" / "checkpoints" / "round-0003" / "rank-0.pt",
                       weights_only=True)["global"] for run in ("every", "sparse")]
    assert max_dw(*last) == 0
    with pytest.raises(HSLError, match="val_every_n_rounds"):
        Federation(val_every_n_rounds=0)


def test_bytes_exchanged_are_the_shared_state(default_run):
    _, summary, _ = default_run
    expected = sum(v.numel() * v.element_size() for v in tiny_hsl().state_dict().values())  # the run's model
    assert summary["bytes_sent_per_node_per_round"] == expected
    row = summary["history"][0]
    assert row["bytes_round"] == 2 * expected * 3


def test_single_class_test_set_is_reported_and_the_run_continues(tmp_path):
    dm = tiny_data(scenario=Scenario(num_nodes=2, prevalence=[0.5, 0.0]))
    summary = fit(tmp_path, data=dm, rounds=1)
    node1 = summary["nodes"][1]
    assert math.isnan(node1["test_auc"]) and "one class" in node1["test_auc_undefined"]
    assert summary["mean_test_auc"] == pytest.approx(summary["nodes"][0]["test_auc"])


def test_diverging_node_stops_the_run_naming_node_and_round(tmp_path, monkeypatch):
    def nan_loss(self, batch):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(HSLModule, "training_loss", nan_loss)
    with pytest.raises(HSLError, match=r"node0, round 1"):
        fit(tmp_path, rounds=1)


def failing_node(monkeypatch, node_index, error=RuntimeError("disk read failed"), module=HSLModule):
    """Local training of the node that owns training images of ``node_index`` raises ``error``."""
    original = module.training_loss

    def training_loss(self, batch):
        if int(batch["node"][0]) == node_index:
            raise error
        return original(self, batch)

    monkeypatch.setattr(module, "training_loss", training_loss)


def test_a_failing_node_stops_the_run_naming_node_round_and_cause(tmp_path, monkeypatch):
    failing_node(monkeypatch, 1)
    with pytest.raises(HSLError, match=r"node node1 failed in round 1: RuntimeError: disk read failed.*min_nodes"):
        fit(tmp_path, rounds=1)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_min_nodes_drops_a_failing_node_from_the_round_and_logs_it(tmp_path, monkeypatch, capsys):
    failing_node(monkeypatch, 1)
    summary = fit(tmp_path, rounds=2, min_nodes=2)
    assert "node node1 dropped from round 1" in capsys.readouterr().out
    assert [h["dropped"] for h in summary["history"]] == [["node1"], ["node1"]]
    assert [h["nodes_dropped"] for h in summary["history"]] == [1, 1]
    assert len(summary["nodes"]) == 3  # the dropped node is still evaluated with the merged model
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "nodes_dropped" in header


@pytest.mark.parametrize("strategy", ["hsl", "fedavg"])
def test_the_merge_of_a_round_with_a_dropped_node_is_the_mean_of_the_others(tmp_path, monkeypatch, strategy):
    """HSL: the plain mean of the nodes that finished; FedAvg: their mean weighted by training-set size
    (nodes of 1, 1 and 2 shares: node0 weighs half as much as node2)."""
    from hsl_lightning import ClassifierModule
    from hsl_lightning.federation.sync import StatePacker
    from hsl_lightning.federation.training import OneByOne

    unequal = Scenario(num_nodes=3, sizes=[1, 1, 2], feature_skew=0.3)
    if strategy == "hsl":
        model, data = tiny_hsl(), tiny_data(scenario=unequal)
    else:
        model, data = tiny_classifier(), tiny_data(use_sat=False, scenario=unequal)
    failing_node(monkeypatch, 1, module=HSLModule if strategy == "hsl" else ClassifierModule)
    trained, merged = [], []
    train_local, representable = OneByOne.train_local, StatePacker.representable

    def spy_train(self, *args, **kwargs):
        out = train_local(self, *args, **kwargs)
        trained.append({k: v.detach().clone() for k, v in out[0].items()})
        return out

    def spy_merge(self, flat):
        out = representable(self, flat)
        merged.append(self.unpack(out))
        return out

    monkeypatch.setattr(OneByOne, "train_local", spy_train)
    monkeypatch.setattr(StatePacker, "representable", spy_merge)
    summary = fit(tmp_path, model=model, data=data, strategy=strategy, rounds=1, min_nodes=2)
    assert len(trained) == 2 and len(merged) == 1  # node0 and node2 finished
    n0, n2 = summary["nodes"][0]["n_train"], summary["nodes"][2]["n_train"]
    assert n2 > 1.5 * n0  # sizes that a wrong weighting would show
    w0, w2 = (0.5, 0.5) if strategy == "hsl" else (n0 / (n0 + n2), n2 / (n0 + n2))
    for key, value in merged[0].items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, w0 * trained[0][key] + w2 * trained[1][key], atol=1e-6), key


def test_too_few_finished_nodes_stop_the_run(tmp_path, monkeypatch):
    failing_node(monkeypatch, 1)
    with pytest.raises(HSLError, match="Only 2 of 3 node.*min_nodes=3"):
        fit(tmp_path, rounds=1, min_nodes=3)


def test_channel_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(HSLError, match="3-channel"):
        fit(tmp_path, model=tiny_hsl(in_chans=3))


def test_hsl_module_without_sat_data_is_a_clear_error(tmp_path):
    with pytest.raises(HSLError, match="no SAT"):
        fit(tmp_path, data=tiny_data(use_sat=False))


def test_csv_metrics_hold_per_node_keys(default_run):
    run, _, _ = default_run
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("node0/val_auc", "node2/val_auc", "node0/test_auc", "test/mean_auc", "mean_val_auc"):
        assert key in header, key


@pytest.mark.slow
def test_the_default_gives_one_and_two_ranks_the_same_result(tmp_path):
    """As a user runs it: float32, no thread settings. With 4 hospitals every hospital trains on the
    same number of threads on 1 rank and on 2 whatever the core count (on 2 cores, 1 thread each:
    2 at once on one rank, 1 at a time on each of two), so the float operations per hospital agree;
    before hospitals trained at the same time, one rank gave each 2 threads and two ranks 1."""
    one = fit(tmp_path / "w1", data=tiny_data(scenario=Scenario(num_nodes=4, feature_skew=0.3)))
    two = fit(tmp_path / "w2", data=tiny_data(scenario=Scenario(num_nodes=4, feature_skew=0.3)), devices=2)
    assert one["threads_per_institution"] == two["threads_per_institution"]
    assert [n["test_auc"] for n in one["nodes"]] == pytest.approx([n["test_auc"] for n in two["nodes"]], abs=1e-6)
    assert [h["mean_val_auc"] for h in one["history"]] == pytest.approx([h["mean_val_auc"] for h in two["history"]],
                                                                         abs=1e-6)
    # and the deployed weights bit for bit: the merge sums float32 contributions in float64, exactly here
    assert max_dw(*(saved_state(tmp_path / run / "run" / "model.ckpt") for run in ("w1", "w2"))) == 0

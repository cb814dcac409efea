import json
import math

import pytest
import torch

from hsl_lightning import Federation, HSLError, Scenario
from hsl_lightning.metrics import NodeMetrics
from hsl_lightning.modules import HSLModule

from conftest import HSL64, TOLERANCE, tiny_data, tiny_hsl


def fit(tmp_path, model=None, data=None, **kwargs):
    kwargs = {"rounds": 2, "run_dir": str(tmp_path / "run"), "wandb": "disabled", "progress": False, **kwargs}
    torch.manual_seed(0)
    return Federation(**kwargs).fit(model if model is not None else tiny_hsl(), data if data is not None else tiny_data())


def test_summary_has_the_documented_fields(tmp_path):
    summary = fit(tmp_path)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["mean_test_auc"] == summary["mean_test_auc"]
    for key in ("method", "seed", "rounds", "wall_s", "nodes", "mean_test_auc", "std_test_auc", "min_test_auc"):
        assert key in on_disk, key
    for node in on_disk["nodes"]:
        assert set(node) >= {"name", "n_train", "n_val", "n_test", "test_auc", "val_auc"}
    assert on_disk["method"] == "hsl" and on_disk["rounds"] == 2
    aucs = [n["test_auc"] for n in on_disk["nodes"]]
    assert on_disk["mean_test_auc"] == pytest.approx(sum(aucs) / len(aucs))
    assert on_disk["min_test_auc"] == min(aucs)


def test_reported_test_auc_is_that_of_the_saved_model(tmp_path):
    dm = tiny_data()
    summary = fit(tmp_path, data=dm)
    from hsl_lightning import HSLModule

    # the Lightning checkpoint alone rebuilds the module: hyper-parameters included, no config needed
    model = HSLModule.load_from_checkpoint(tmp_path / "run" / "model.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    model.set_sat_reference(dm.sat_reference())
    model.eval()
    for i, node in enumerate(summary["nodes"]):
        m = NodeMetrics()
        with torch.no_grad():
            for batch in dm.eval_loader(i, "test"):
                m.update(model.primary_logits(batch), batch["label"])
        assert m.compute()["auc"] == pytest.approx(node["test_auc"], abs=1e-6)
    assert saved["hsl"]["round"] == summary["best_round"] and saved["hsl"]["threshold"] == summary["threshold"]


def test_final_round_is_the_one_with_best_mean_validation_auc(tmp_path):
    summary = fit(tmp_path, rounds=3)
    history = [h["mean_val_auc"] for h in summary["history"]]
    assert summary["best_round"] == 1 + max(range(3), key=lambda r: (history[r], -r))
    assert summary["mean_val_auc"] == max(history)


def test_validation_every_n_rounds_skips_the_others_and_deploys_a_validated_round(tmp_path):
    every = fit(tmp_path / "every", strategy="fedavg", rounds=3)
    summary = fit(tmp_path / "sparse", strategy="fedavg", rounds=3, val_every_n_rounds=2)
    validated = [h["round"] for h in summary["history"] if "mean_val_auc" in h]
    assert validated == [2, 3]  # every 2nd round, and always the last
    assert "node0/val_auc" not in summary["history"][0] and "node0/train_loss" in summary["history"][0]
    assert summary["best_round"] in validated
    # validation only reads: the rounds it does validate equal those of a run validating every round
    for a, b in zip(every["history"][1:], summary["history"][1:]):
        assert a["mean_val_auc"] == b["mean_val_auc"]
    with pytest.raises(HSLError, match="val_every_n_rounds"):
        Federation(val_every_n_rounds=0)


def test_bytes_exchanged_are_the_shared_state(tmp_path):
    model = tiny_hsl()
    expected = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    summary = fit(tmp_path, model=model, rounds=1)
    assert summary["bytes_sent_per_node_per_round"] == expected
    row = summary["history"][0]
    assert row["bytes_round"] == 2 * expected * 3


def test_same_seed_same_result(tmp_path):
    a = fit(tmp_path / "a", rounds=1)
    b = fit(tmp_path / "b", rounds=1)
    assert [n["test_auc"] for n in a["nodes"]] == [n["test_auc"] for n in b["nodes"]]


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


def failing_node(monkeypatch, node_index, error=RuntimeError("disk read failed")):
    """Local training of the node that owns training images of ``node_index`` raises ``error``."""
    original = HSLModule.training_loss

    def training_loss(self, batch):
        if int(batch["node"][0]) == node_index:
            raise error
        return original(self, batch)

    monkeypatch.setattr(HSLModule, "training_loss", training_loss)


def test_a_failing_node_stops_the_run_naming_node_round_and_cause(tmp_path, monkeypatch):
    failing_node(monkeypatch, 1)
    with pytest.raises(HSLError, match=r"node node1 failed in round 1: RuntimeError: disk read failed.*min_nodes"):
        fit(tmp_path, rounds=1)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_min_nodes_drops_a_failing_node_from_the_round_and_logs_it(tmp_path, monkeypatch, capsys):
    failing_node(monkeypatch, 1)
    summary = fit(tmp_path, rounds=2, min_nodes=2)
    assert "node node1 dropped from round 1" in capsys.readouterr().out
    assert [h["dropped"] for h in summary["history"]] == [["node1"], ["node1"]]
    assert [h["nodes_dropped"] for h in summary["history"]] == [1, 1]
    assert len(summary["nodes"]) == 3  # the dropped node is still evaluated with the merged model
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "nodes_dropped" in header


def test_the_merge_of_a_round_with_a_dropped_node_is_the_mean_of_the_others(tmp_path, monkeypatch):
    from hsl_lightning.federation.sync import StatePacker
    from hsl_lightning.federation.training import OneByOne

    failing_node(monkeypatch, 1)
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
    fit(tmp_path, rounds=1, min_nodes=2)
    assert len(trained) == 2 and len(merged) == 1  # node0 and node2 finished
    for key, value in merged[0].items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, (trained[0][key] + trained[1][key]) / 2, atol=1e-6), key


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


def test_csv_metrics_hold_per_node_keys(tmp_path):
    fit(tmp_path, rounds=1)
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("node0/val_auc", "node2/val_auc", "node0/test_auc", "test/mean_auc", "mean_val_auc"):
        assert key in header, key


@pytest.mark.slow
def test_two_ranks_give_the_same_result_as_one(tmp_path):
    """In float64 (conftest.py says why): the two-rank merge adds the contributions in another order."""
    def hsl64():
        torch.manual_seed(0)
        return HSL64(backbone="test_resnet", num_experts=4, proj_dim=64).double()

    one = fit(tmp_path / "w1", model=hsl64(), rounds=2, local_epochs=2, threads=1)
    two = fit(tmp_path / "w2", model=hsl64(), rounds=2, local_epochs=2, threads=1, devices=2)
    for a, b in zip(one["nodes"], two["nodes"]):
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=TOLERANCE)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=TOLERANCE)
    w1 = torch.load(tmp_path / "w1" / "run" / "model.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "w2" / "run" / "model.ckpt", weights_only=True)["state_dict"]
    for key in w1:
        assert torch.allclose(w1[key].double(), w2[key].double(), atol=TOLERANCE, rtol=0), key
    assert w1["net.primary_encoder.trunk.conv1.0.weight"].dtype == torch.float64


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
    w1 = torch.load(tmp_path / "w1" / "run" / "model.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "w2" / "run" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

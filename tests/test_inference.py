"""Using what a run trained: Lightning checkpoints, ``hsl test``, ``hsl predict``, ``hsl --help``."""

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hsl_lightning import ClassifierModule, HSLModule
from hsl_lightning.cli import SUBCOMMANDS, main
from hsl_lightning.inference import checkpoints

TINY = {
    "seed_everything": 0,
    "model": {"class_path": "hsl_lightning.HSLModule",
              "init_args": {"backbone": "test_resnet", "num_experts": 4, "proj_dim": 64}},
    "data": {"primary": {"class_path": "hsl_lightning.SyntheticLesions", "init_args": {"num_samples": 240, "size": 28}},
             "sat": {"class_path": "hsl_lightning.SyntheticAnchor", "init_args": {"num_samples": 160, "size": 28}},
             "scenario": {"num_nodes": 3, "feature_skew": 0.3}, "splits": "pooled", "batch_size": 32},
    "federation": {"rounds": 2, "wandb": "disabled", "progress": False, "checkpoint": False},
}


def fit_run(tmp_path, name="run", **changes):
    config = json.loads(json.dumps(TINY))
    for section, values in changes.items():
        config[section].update(values)
    config["federation"]["run_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return tmp_path / name, json.loads((tmp_path / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def hsl_run(tmp_path_factory):
    return fit_run(tmp_path_factory.mktemp("hsl"))


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory):
    return fit_run(tmp_path_factory.mktemp("fedbn"), model={"class_path": "hsl_lightning.ClassifierModule",
                                                             "init_args": {"backbone": "test_resnet"}},
                   data={"use_sat": False}, federation={"strategy": "fedbn"})


def test_the_checkpoint_alone_gives_back_the_runs_test_aucs_under_a_lightning_trainer(hsl_run):
    run, summary = hsl_run
    model = HSLModule.load_from_checkpoint(run / "model.ckpt", weights_only=True)  # no config needed
    assert model.hparams.backbone == "test_resnet" and model.hparams.num_experts == 4
    from hsl_lightning.config import HSLCLI

    dm = HSLCLI(args=["--config", str(run / "config.yaml")], run=False).datamodule
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    logged = trainer.test(model, datamodule=dm, verbose=False)
    for i, node in enumerate(summary["nodes"]):
        assert logged[i][f"node{i}/test_auc"] == pytest.approx(node["test_auc"], abs=1e-6)
    meta = checkpoints.info(run / "model.ckpt")
    assert meta["threshold"] == summary["threshold"] and 0 <= meta["threshold"] <= 1
    assert meta["image_size"] == 28 and meta["in_chans"] == 1 and meta["round"] == summary["best_round"]


@pytest.mark.slow
def test_a_run_with_a_model_per_node_writes_a_checkpoint_per_node(fedbn_run):
    run, summary = fedbn_run
    assert not (run / "model.ckpt").exists()
    assert sorted(p.name for p in (run / "nodes").iterdir()) == ["node0.ckpt", "node1.ckpt", "node2.ckpt"]
    first = ClassifierModule.load_from_checkpoint(run / "nodes" / "node0.ckpt", weights_only=True)
    second = ClassifierModule.load_from_checkpoint(run / "nodes" / "node1.ckpt", weights_only=True)
    bn = next(k for k in first.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(first.state_dict()[bn], second.state_dict()[bn])  # FedBN keeps BatchNorm local
    assert [checkpoints.info(run / "nodes" / f"node{i}.ckpt")["threshold"] for i in range(3)] == \
        [n["threshold"] for n in summary["nodes"]]


@pytest.mark.parametrize("which", ["hsl", pytest.param("fedbn", marks=pytest.mark.slow)])
def test_hsl_test_on_the_training_config_equals_the_summary(request, capsys, which):
    run, summary = request.getfixturevalue(f"{which}_run")  # the fedbn run is trained for the slow tier only
    main(["test", "--run", str(run), "--bootstraps", "200"])
    result = json.loads((run / "test.json").read_text())
    assert [s["site"] for s in result["sites"]] == [n["name"] for n in summary["nodes"]]
    for site, node in zip(result["sites"], summary["nodes"]):
        assert site["auc"] == node["test_auc"]  # the same model on the same images: exactly
        assert site["model"] == ("model" if which == "hsl" else node["name"])
        assert site["auc_low"] <= site["auc"] <= site["auc_high"]
        assert site["threshold"] == (summary["threshold"] if which == "hsl" else node["threshold"])
    assert "mean site AUC" in capsys.readouterr().out


@pytest.mark.slow
def test_hsl_test_on_an_unseen_site_reports_an_interval(hsl_run, fedbn_run, tmp_path):
    site = {"data": {"scenario": {"num_nodes": 1, "names": ["newsite"], "feature_skew": 0.9}, "seed": 11}}
    config = tmp_path / "newsite.yaml"
    config.write_text(yaml.safe_dump(site))
    for run, _ in (hsl_run, fedbn_run):
        out = tmp_path / f"{run.name}.json"
        main(["test", "--run", str(run), "--config", str(config), "--out", str(out), "--bootstraps", "300"])
        (result,) = json.loads(out.read_text())["sites"]
        assert result["site"] == "newsite" and result["n"] > 20
        if (run / "model.ckpt").exists():
            assert result["auc_low"] < result["auc"] < result["auc_high"]
        else:  # never trained: every node's model scores it, and the mean is reported
            assert [m["model"] for m in result["models"]] == ["node0", "node1", "node2"]
            assert result["auc"] == pytest.approx(np.mean([m["auc"] for m in result["models"]]))
            assert all(m["auc_low"] < m["auc"] < m["auc_high"] for m in result["models"])


def test_hsl_test_errors_are_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["test", "--run", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "config.yaml not found" in capsys.readouterr().err


def test_predict_writes_every_readable_image_and_names_the_broken_one(hsl_run, tmp_path, capsys):
    run, _ = hsl_run
    from hsl_lightning.config import HSLCLI

    dm = HSLCLI(args=["--config", str(run / "config.yaml")], run=False).datamodule
    dm.setup()
    images = dm.nodes[0].test.images[:5]  # uint8 (5, 1, 28, 28), as training held them
    folder = tmp_path / "site" / "sub"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"img{i}.png")
    big = np.repeat(np.kron(images[0, 0].numpy(), np.ones((4, 4), dtype=np.uint8))[..., None], 3, axis=2)
    Image.fromarray(big).save(tmp_path / "site" / "rgb_112px.jpg")  # another size and channel count
    (tmp_path / "site" / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--run", str(run), "--images", str(tmp_path / "site"), "--out", str(out)])
    assert exc.value.code == 1
    printed = capsys.readouterr()
    assert "broken.png" in printed.err and "6 of 7 image(s)" in printed.out
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(out))}
    assert len(rows) == 7 and rows["broken.png"]["probability"] == "" and "cannot read" in rows["broken.png"]["error"]
    model, meta = checkpoints.load(run / "model.ckpt")
    expected = model.predict_proba(images.float() / 255)
    loader = torch.utils.data.DataLoader([{"image": images[i].float() / 255} for i in range(5)], batch_size=5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert torch.allclose(trainer.predict(model, loader)[0], expected)  # Lightning's predict gives the same
    for i in range(5):  # prepared exactly as training prepared its images
        row = rows[f"img{i}.png"]
        assert float(row["probability"]) == pytest.approx(float(expected[i]), abs=1e-5)
        assert int(row["label"]) == int(float(row["probability"]) >= meta["threshold"])
    assert 0 <= float(rows["rgb_112px.jpg"]["probability"]) <= 1


@pytest.mark.slow
def test_predict_needs_a_node_when_each_node_has_its_own_model(fedbn_run, tmp_path, capsys):
    run, _ = fedbn_run
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(run), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv")])
    assert "--node (node0, node1, node2)" in capsys.readouterr().err
    main(["predict", "--run", str(run), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv"),
          "--node", "node1"])
    assert next(csv.DictReader(open(tmp_path / "p.csv")))["model"] == "node1"


def test_help_lists_every_subcommand_and_each_has_its_own_help(capsys):
    main(["--help"])
    listed = capsys.readouterr().out
    for name in ("fit", "check", "test", "predict", "strategies", "benchmark", "embed", "compare"):
        assert f"  {name} " in listed
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0, name
        assert "usage" in capsys.readouterr().out.lower()
    # hsl flower (the flower extra) has subcommands of its own (hsl flower keys --help), not checked here
    assert set(SUBCOMMANDS) == {"fit", "check", "test", "predict", "strategies", "benchmark", "embed", "flower", "compare"}
    with pytest.raises(SystemExit) as exc:
        main(["tset"])
    assert exc.value.code == 2 and "Did you mean: test" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_says_where_the_run_went_and_what_to_try_next(tmp_path, capsys):
    fit_run(tmp_path, name="again", federation={"rounds": 1})
    printed = capsys.readouterr().out
    assert f"Run written to {tmp_path / 'again'}/" in printed and "hsl predict --run" in printed


@pytest.mark.slow
def test_predict_with_a_split_network_routes_through_the_chosen_hospitals_site_part(tmp_path, capsys):
    run, _ = fit_run(tmp_path, model={"class_path": "hsl_lightning.SplitClassifier",
                                      "init_args": {"backbone": "test_resnet"}},
                     data={"use_sat": False}, federation={"strategy": "splitavg", "rounds": 1})
    Image.fromarray(np.full((28, 28), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(run), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv")])
    assert "split network" in capsys.readouterr().err
    probs = []
    for node in ("node0", "node2"):
        main(["predict", "--run", str(run), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv"),
              "--node", node])
        probs.append(float(next(csv.DictReader(open(tmp_path / "p.csv")))["probability"]))
    model, _ = checkpoints.load(run / "model.ckpt")
    image = torch.full((1, 1, 28, 28), 90 / 255)
    with torch.no_grad():
        expected = [torch.sigmoid(model.primary_logits({"image": image, "node": torch.tensor([i])})).item() for i in (0, 2)]
    assert probs == pytest.approx(expected, abs=1e-6) and probs[0] != probs[1]  # each site part is its own

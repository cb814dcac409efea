import hashlib

import numpy as np
import pytest
import torch

from hsl_lightning import HSLError, MedMNIST
from hsl_lightning.cli import main
from hsl_lightning.data import medmnist as mm

from conftest import REPO


def test_reads_official_breastmnist_with_malignant_as_positive(medmnist_root):
    splits = MedMNIST("breastmnist", root=str(medmnist_root)).load()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    raw = np.load(medmnist_root / "breastmnist.npz")["test_labels"].ravel()
    assert torch.equal(splits["test"].labels, torch.from_numpy((raw == 0).astype(np.int64)))
    assert splits["train"].images.shape[1:] == (1, 28, 28) and splits["train"].images.dtype == torch.uint8


def test_retinamnist_positive_is_referable_grade(medmnist_root):
    splits = MedMNIST("retinamnist", root=str(medmnist_root)).load()
    raw = np.load(medmnist_root / "retinamnist.npz")["train_labels"].ravel()
    assert torch.equal(splits["train"].labels, torch.from_numpy((raw >= 2).astype(np.int64)))
    assert splits["train"].images.shape[1] == 3


def test_root_comes_from_the_environment_variable(medmnist_root, monkeypatch):
    monkeypatch.setenv(mm.ENV_ROOT, str(medmnist_root))
    assert len(MedMNIST("pneumoniamnist").load()["test"]) == 624


def test_missing_file_says_where_to_put_which_file(tmp_path):
    with pytest.raises(HSLError) as err:
        MedMNIST("breastmnist", root=str(tmp_path)).load()
    text = str(err.value)
    assert str(tmp_path / "breastmnist.npz") in text and "HSL_DATA_ROOT" in text and "zenodo" in text


def test_corrupt_file_is_a_clear_error(tmp_path, medmnist_root):
    good = (medmnist_root / "breastmnist.npz").read_bytes()
    (tmp_path / "breastmnist.npz").write_bytes(good[: len(good) // 3])
    with pytest.raises(HSLError, match="corrupt or truncated"):
        MedMNIST("breastmnist", root=str(tmp_path)).load()


def test_file_with_missing_keys_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(HSLError, match="keys .* missing"):
        MedMNIST("breastmnist", root=str(tmp_path)).load()


def test_labels_outside_the_task_are_a_clear_error(tmp_path):
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((3, 28, 28), np.uint8)
        arrays[f"{s}_labels"] = np.array([[0], [1], [5]], np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(HSLError, match="outside breastmnist's classes"):
        MedMNIST("breastmnist", root=str(tmp_path)).load()


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(HSLError, match="breastmnist"):
        MedMNIST("breastmnis")


def test_download_keeps_only_a_file_with_the_official_md5(tmp_path, monkeypatch, medmnist_root):
    payload = {"bytes": b"not the real file"}

    def fake_urlretrieve(url, dest):
        assert url.startswith("https://zenodo.org/records/10519652/files/breastmnist.npz")
        open(dest, "wb").write(payload["bytes"])

    monkeypatch.setattr(mm.urllib.request, "urlretrieve", fake_urlretrieve)
    with pytest.raises(HSLError, match="wrong MD5"):
        MedMNIST("breastmnist", root=str(tmp_path), download=True).load()
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind

    payload["bytes"] = (medmnist_root / "breastmnist.npz").read_bytes()
    assert hashlib.md5(payload["bytes"]).hexdigest() == mm.MD5["breastmnist"][0]
    splits = MedMNIST("breastmnist", root=str(tmp_path), download=True).load()
    assert len(splits["train"]) == 546 and (tmp_path / "breastmnist.npz").is_file()


def test_float_images_with_nan_pixels_are_a_clear_error(tmp_path):
    arrays = {}
    for s in ("train", "val", "test"):
        images = np.zeros((3, 28, 28), np.float32)
        images[0, 0, 0] = np.nan
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = images, np.array([[0], [1], [0]], np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(HSLError, match=r"train_images must be uint8 .* got float32"):
        MedMNIST("breastmnist", root=str(tmp_path)).load()


def write_npz(path, change=None, size=28, n=4):
    """A well-formed breastmnist-like file, then ``change(arrays)`` breaks it."""
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.full((n, size, size), 128, np.uint8)
        arrays[f"{s}_labels"] = np.array([[0], [1]] * (n // 2), np.uint8)
    if change:
        change(arrays)
    np.savez(path / "breastmnist.npz", **arrays)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(val_images=np.full((4, 32, 32), 128, np.uint8)),
     r"key val_images must be shaped \(N, 28, 28\) for breastmnist at 28 px; got \(4, 32, 32\)"),
    (lambda a: a.update(test_images=np.full((4, 28, 28, 3), 128, np.uint8)),
     r"key test_images must be shaped .* got \(4, 28, 28, 3\) \(28x28 px, 3 channel"),
    (lambda a: a.update(train_images=np.full((4, 28), 1, np.uint8)), r"key train_images must be shaped .* 2 dimension"),
    (lambda a: a.update(train_images=np.full((4, 28, 28), 300, np.int32)),
     r"key train_images must be uint8 pixels 0\.\.255 .* got int32, values 300\.\.300"),
    (lambda a: a.update(train_labels=np.array([[0], [1], [0]], np.uint8)),
     r"key train_labels has 3 labels for 4 images"),
    (lambda a: a.update(val_labels=np.zeros((4, 3), np.uint8)), r"key val_labels must hold one label per image"),
    (lambda a: a.update(test_labels=np.array([0.5, 1, 0, 1])), r"key test_labels must hold integer class labels"),
    (lambda a: a.update(val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1), np.uint8)),
     r"key val_images holds no images"),
], ids=["split-size", "split-channels", "dims", "dtype-range", "lengths", "label-shape", "label-values",
        "empty-split"])
def test_each_inconsistency_of_a_well_formed_file_names_the_file_split_and_key(tmp_path, change, message):
    write_npz(tmp_path, change)
    with pytest.raises(HSLError, match=message):
        MedMNIST("breastmnist", root=str(tmp_path)).load()


def test_integral_float_labels_are_accepted(tmp_path):
    write_npz(tmp_path, lambda a: a.update(train_labels=np.array([[0.0], [1.0], [0.0], [1.0]])))
    data = MedMNIST("breastmnist", root=str(tmp_path)).load()
    assert data["train"].labels.tolist() == [1, 0, 1, 0]  # stored 0 (malignant) is the positive class


def test_hsl_fit_on_a_file_whose_splits_disagree_exits_with_one_message(tmp_path, capsys):
    """The case that once ended in a raw torch.cat traceback deep inside the data module (in process:
    a traceback would raise here instead of SystemExit(2))."""
    write_npz(tmp_path, lambda a: a.update(val_images=np.full((4, 32, 32), 128, np.uint8)), n=40)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "data" / "breast_pneumonia.yaml"), "--data.root",
              str(tmp_path), "--data.use_sat", "false", "--model.class_path", "hsl_lightning.ClassifierModule",
              "--federation.wandb", "disabled", "--federation.run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "breastmnist.npz key val_images must be shaped" in err


def test_synthetic_sources_check_their_arguments():
    from hsl_lightning import SyntheticAnchor, SyntheticLesions

    with pytest.raises(HSLError, match="num_samples must be an integer of at least 4"):
        SyntheticLesions(num_samples=2)
    with pytest.raises(HSLError, match="size must be an integer number of pixels"):
        SyntheticAnchor(size=8)

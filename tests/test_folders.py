import numpy as np
import torch
import pytest
from PIL import Image

from hsl_lightning import HSLError, ImageFolders

from conftest import tiny_hsl


def write_images(root, node, split, label, n, size=20, mode="L"):
    folder = root / node / split / label
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")


def make_tree(root):
    for node in ("hospital_a", "hospital_b"):
        for label in ("0", "1"):
            write_images(root, node, "train", label, 10)
            write_images(root, node, "test", label, 3)
    return root


def test_reads_per_institution_folders_and_holds_out_validation(tmp_path):
    data = ImageFolders(str(make_tree(tmp_path))).load()
    assert list(data) == ["hospital_a", "hospital_b"]
    a = data["hospital_a"]
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (16, 4, 6)
    assert a["val"].positives == 2 and a["train"].images.shape[1:] == (1, 20, 20)


@pytest.mark.slow
def test_folder_data_trains_in_a_federation(tmp_path):
    from hsl_lightning import FederatedDataModule, Federation, SyntheticAnchor

    dm = FederatedDataModule(primary=ImageFolders(str(make_tree(tmp_path / "data")), size=28),
                             sat=SyntheticAnchor(num_samples=64, size=28), batch_size=16)
    summary = Federation(rounds=1, run_dir=str(tmp_path / "run"), wandb="disabled", progress=False).fit(tiny_hsl(), dm)
    assert [n["name"] for n in summary["nodes"]] == ["hospital_a", "hospital_b"]
    assert [n["n_test"] for n in summary["nodes"]] == [6, 6]


def test_label_folders_must_be_0_and_1_or_named(tmp_path):
    write_images(tmp_path, "a", "train", "benign", 2)
    write_images(tmp_path, "a", "test", "benign", 2)
    with pytest.raises(HSLError, match="neither '0' nor '1'"):
        ImageFolders(str(tmp_path)).load()
    data = ImageFolders(str(tmp_path), positive="malignant", val_fraction=0.5).load()
    assert data["a"]["test"].positives == 0


def test_mixed_image_sizes_need_a_size(tmp_path):
    make_tree(tmp_path)
    write_images(tmp_path, "hospital_a", "train", "1", 1, size=24)  # replaces one 20 px image
    with pytest.raises(HSLError, match="Set size"):
        ImageFolders(str(tmp_path)).load()
    assert ImageFolders(str(tmp_path), size=16).load()["hospital_a"]["train"].images.shape[-1] == 16


def test_missing_root_and_missing_split_are_clear_errors(tmp_path):
    with pytest.raises(HSLError, match="not found"):
        ImageFolders(str(tmp_path / "nowhere")).load()
    write_images(tmp_path, "a", "train", "0", 2)
    with pytest.raises(HSLError, match="no 'test' folder"):
        ImageFolders(str(tmp_path)).load()


def test_unreadable_image_names_the_file(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "hospital_b" / "test" / "1" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(HSLError, match="broken.png"):
        ImageFolders(str(tmp_path)).load()


def test_simulated_scanners_apply_to_folder_institutions(tmp_path):
    from hsl_lightning import FederatedDataModule, Scenario
    from hsl_lightning.data import Acquisition

    dm = FederatedDataModule(primary=ImageFolders(str(make_tree(tmp_path))), use_sat=False,
                             scenario=Scenario(feature_skew=1.0))  # num_nodes follows the folders
    dm.setup()
    assert len(dm.nodes) == 2 and all(n.acquisition != Acquisition() for n in dm.nodes)
    raw = ImageFolders(str(tmp_path)).load()["hospital_a"]["test"].images
    assert not torch.equal(dm.nodes[0].test.images, raw)


def test_mixed_grey_and_colour_images_become_the_configured_channels(tmp_path):
    make_tree(tmp_path)
    write_images(tmp_path, "hospital_b", "train", "0", 2, mode="RGB")  # two colour images among grey ones
    grey = ImageFolders(str(tmp_path)).load()["hospital_b"]["train"].images
    colour = ImageFolders(str(tmp_path), channels=3).load()["hospital_b"]["train"].images
    assert grey.shape[1] == 1 and colour.shape[1] == 3 and len(grey) == len(colour) > 0


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    make_tree(tmp_path)
    wide = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160)  # up to 63,840 of 65,535
    Image.fromarray(wide).save(tmp_path / "hospital_a" / "test" / "1" / "0.png")  # saved as mode I;16
    data = ImageFolders(str(tmp_path)).load()
    image = data["hospital_a"]["test"].images[3]  # label 0's three files, then label 1's 0.png
    assert image.max() == round(63840 / 257) and image.float().std() > 50  # scaled, not a white square


def test_float_images_are_refused_with_the_file_named(tmp_path):
    make_tree(tmp_path)
    Image.fromarray(np.zeros((20, 20), np.float32)).save(tmp_path / "hospital_b" / "train" / "0" / "x.tif")
    with pytest.raises(HSLError, match=r"x\.tif holds float pixels"):
        ImageFolders(str(tmp_path)).load()


def test_an_image_in_two_splits_of_one_institution_is_a_leak(tmp_path):
    make_tree(tmp_path)
    copy = tmp_path / "hospital_b" / "test" / "1" / "copied.png"
    copy.write_bytes((tmp_path / "hospital_b" / "train" / "0" / "4.png").read_bytes())
    with pytest.raises(HSLError, match=r"hospital_b holds 1 image\(s\) in more than one split .*4\.png = .*copied\.png"):
        ImageFolders(str(tmp_path)).load()
    assert len(ImageFolders(str(tmp_path), allow_duplicates=True).load()["hospital_b"]["test"]) == 7

"""``hsl check``: each problem a site's data can have is found before any training, with one clear message naming the
file or split, no traceback, and a non-zero exit; clean data passes and goes through the training transform."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from hsl_lightning import cli

from test_dicom import write_dicom


def png_tree(root, n=4, size=12):
    rng = np.random.default_rng(0)
    for hospital in ("a", "b"):
        for split in ("train", "test"):
            for label in ("0", "1"):
                folder = root / hospital / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 4096, (size, size), dtype=np.uint16)).save(folder / f"{i}.png")
    return root


def config(tmp_path, source="ImageFolders", **init):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"data": {"primary": {"class_path": f"hsl_lightning.{source}",
                                                         "init_args": {"root": str(tmp_path / "data"), **init}},
                                             "use_sat": False}}))
    return path


def run_check(tmp_path, capsys, **init):
    source = init.pop("source", "ImageFolders")
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as done:
        cli.main(["check", "--no-progress", "--json", str(out), "--config", str(config(tmp_path, source, **init))])
        raise SystemExit(0)
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    return done.value.code, printed.out, json.loads(out.read_text()) if out.is_file() else None


def test_clean_data_passes_with_its_counts_and_depth(tmp_path, capsys):
    png_tree(tmp_path / "data")
    code, out, report = run_check(tmp_path, capsys)
    assert code == 0 and "no problems found" in out
    assert report["nodes"]["a"]["test"]["images"] == 8 and report["nodes"]["a"]["test"]["positives"] == 4
    assert report["nodes"]["a"]["test"]["bits"] == {"12": 8} and report["nodes"]["a"]["train"]["stored_as"] == "uint16"


def _break(root, how):
    if how == "unreadable":
        (root / "a" / "train" / "1" / "scan.png").write_bytes(b"\x89PNG but cut short")
        return r"a/train: 1 unreadable image\(s\) \(\S*scan\.png: cannot read it"
    if how == "empty split":
        for f in (root / "b" / "test").rglob("*.png"):
            f.unlink()
        return r"b/test: empty: no images"
    if how == "one class":
        for f in (root / "a" / "test" / "1").glob("*.png"):
            f.unlink()
        return r"a/test: one class only: all 4 images have label 0"
    if how == "duplicate across splits":
        (root / "b" / "test" / "0" / "copy.png").write_bytes((root / "b" / "train" / "1" / "2.png").read_bytes())
        return r"b: holds 1 image\(s\) in more than one split.*train/1/2\.png = \S*test/0/copy\.png"
    if how == "wrong channels":
        colour = np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(colour, mode="RGB").save(root / "a" / "train" / "0" / "photo.png")
        return r"a/train: 1 image\(s\) are not grey as channels: 1 says .*photo\.png"
    if how == "one image under both labels":
        (root / "a" / "train" / "1" / "again.png").write_bytes((root / "a" / "train" / "0" / "1.png").read_bytes())
        return r"a/train: 1 image\(s\) filed under both labels \(\S*train/0/1\.png = \S*train/1/again\.png"
    if how == "a duplicate that validation would split":
        (root / "b" / "train" / "0" / "again.png").write_bytes((root / "b" / "train" / "0" / "1.png").read_bytes())
        return r"b/train: 1 duplicate image\(s\) within the split .*validation is held out of train"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["unreadable", "empty split", "one class", "duplicate across splits", "wrong channels",
                                 "one image under both labels", "a duplicate that validation would split"])
def test_each_problem_is_one_clear_message_and_a_non_zero_exit(tmp_path, capsys, how):
    png_tree(tmp_path / "data")
    pattern = _break(tmp_path / "data", how)
    code, out, report = run_check(tmp_path, capsys)
    assert code == 1
    assert len(report["problems"]) == 1, report["problems"]
    import re

    assert re.search(pattern, report["problems"][0]["message"]), report["problems"][0]["message"]
    assert re.search(pattern, out)


def test_a_dicom_it_cannot_decode_is_named(tmp_path, capsys):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    for hospital in ("a", "b"):
        for split in ("train", "test"):
            for label in (0, 1):
                for i in range(3):
                    write_dicom(tmp_path / "data" / hospital / split / str(label) / f"{i}.dcm",
                                np.full((12, 12), 100 * i + 7 * label + (split == "test") + 50 * (hospital == "b")))
    bad = write_dicom(tmp_path / "data" / "b" / "train" / "0" / "x.dcm", np.full((64, 64), 3))
    bad.compress(JPEG2000Lossless)
    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])
    bad.save_as(tmp_path / "data" / "b" / "train" / "0" / "x.dcm", enforce_file_format=True)
    code, out, report = run_check(tmp_path, capsys, source="DicomFolders")
    assert code == 1 and len(report["problems"]) == 1
    assert "b/train: 1 unreadable DICOM file(s)" in out and "x.dcm: cannot decode its JPEG 2000" in out


def test_a_config_error_is_exit_two_with_one_paragraph(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["check", "--config", str(config(tmp_path))])  # data/ does not exist
    err = capsys.readouterr().err
    assert done.value.code == 2 and "root not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_hsl_check_as_a_command(tmp_path):
    """The entry point itself, in a subprocess: the exit status and the report on stdout."""
    png_tree(tmp_path / "data")
    _break(tmp_path / "data", "unreadable")
    done = subprocess.run([sys.executable, "-m", "hsl_lightning", "check", "--no-progress", "--config",
                           str(config(tmp_path))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "scan.png" in done.stdout and "Traceback" not in done.stderr


def test_supernode_check_only_runs_the_check_on_the_sites_data_config(tmp_path, capsys, monkeypatch):
    """A site's `hsl flower supernode --check-only` with a data-config: the same report, and a problem stops it
    (the certificate, key and connection checks, tested in test_supernode_check, pass here by stand-in)."""
    from hsl_lightning.errors import HSLError
    from hsl_lightning.flower import commands
    from hsl_lightning.flower.keys import make_keys

    make_keys(tmp_path / "keys", ["hospital1"], ["localhost"])
    monkeypatch.setattr(commands, "check_tls", lambda *a: None)
    monkeypatch.setattr(commands, "check_registered", lambda *a: True)
    png_tree(tmp_path / "data")
    site = config(tmp_path)
    argv = ["--superlink", "localhost:1", "--root-certificates", str(tmp_path / "keys" / "ca.crt"),
            "--auth-supernode-private-key", str(tmp_path / "keys" / "hospital1"), "--check-only",
            "--node-config", f'node-index=0 name="hospital1" data-config="{site}"']
    commands.supernode(argv)
    assert "no problems found" in capsys.readouterr().out
    _break(tmp_path / "data", "duplicate across splits")
    with pytest.raises(HSLError, match=r"Site hospital1: hsl check found 1 problem"):
        commands.supernode(argv)
    assert "copy.png" in capsys.readouterr().out


def test_a_sites_config_checks_its_own_node_only(tmp_path, capsys):
    """A deployed site's data config lists every node and holds one: the others are 'at another site'."""
    import shutil

    png_tree(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "a")
    code, out, report = run_check(tmp_path, capsys, nodes=["a", "b"])
    assert code == 0, out
    assert report["nodes"]["a"] == "at another site" and report["nodes"]["b"]["train"]["images"] > 0


def test_a_deployed_site_names_its_files_in_its_own_log_only(tmp_path, capsys):
    """Export paths can hold a patient's ID: a site whose files training refuses tells the coordinator what is wrong
    (split and reason) and names the files only in its own output."""
    from test_flower import TINY, keyed

    from hsl_lightning.errors import HSLError
    from hsl_lightning.flower.site import Site

    png_tree(tmp_path / "data")
    (tmp_path / "data" / "b" / "test" / "1" / "PID-4471-scan.png").write_bytes(b"not a png")
    config = {**TINY, "data": {**TINY["data"], "primary": {"class_path": "hsl_lightning.ImageFolders", "init_args": {
        "root": str(tmp_path / "data"), "nodes": ["a", "b"], "size": 28}}, "scenario": {"num_nodes": 2}}}
    with pytest.raises(HSLError) as refused:
        Site(yaml.safe_dump(config), 1, tmp_path / "site", name="hospital2", **keyed(1))
    assert "b/test: 1 unreadable image(s)" in str(refused.value) and "PID-4471" not in str(refused.value)
    assert "PID-4471-scan.png" in capsys.readouterr().err

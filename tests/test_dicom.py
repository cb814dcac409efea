"""DicomFolders: DICOM files the tests make with pydicom, read as DICOM says (bits stored, rescale, VOI, MONOCHROME1),
refused with one message where they cannot be (multi-frame, undecodable), and never a patient identifier written."""

import json

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from hsl_lightning import DicomFolders, HSLError

IDENTIFIERS = {"PatientName": "Doe^Janet^Quincy", "PatientID": "PID-7734-991", "PatientBirthDate": "19610417",
               "StudyDate": "20240229", "AccessionNumber": "ACC55501234", "InstitutionName": "St Example Infirmary",
               "ReferringPhysicianName": "Holloway^Bartholomew"}


def write_dicom(path, pixels, photometric="MONOCHROME2", bits=12, signed=False, frames=1, **tags):
    """A secondary-capture-like file holding ``pixels`` (uint16 or int16), with any further elements in ``tags``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:] if photometric.startswith("MONO") else pixels.shape[-3:-1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16 if signed else np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def tree(root, n=4, size=8, **tags):
    """Two hospitals, each train/test x label 0/1 with ``n`` distinct 12-bit images."""
    for h, hospital in enumerate(("a", "b")):
        for split in ("train", "test"):
            for label in (0, 1):
                for i in range(n):
                    v = 1000 + 100 * h + 10 * i + 3 * label + (0 if split == "train" else 1)
                    write_dicom(root / hospital / split / str(label) / f"{i}.dcm", np.full((size, size), v), **tags)
    return root


def one(root, **kwargs):
    return DicomFolders(str(root), val_fraction=0.5, **kwargs).load()


def value(data, hospital="a", split="test", k=0):
    return int(data[hospital][split].images[k, 0, 0, 0].to(torch.int64))


def test_bits_stored_scale_a_twelve_bit_image_and_keep_it_at_sixteen_bits(tmp_path):
    data = one(tree(tmp_path))
    images = data["a"]["test"].images
    assert images.dtype == torch.uint16
    # test split, label 0, i = 0 .. 3: 1001, 1011, 1021, 1031 of 4095
    assert [int(v) for v in images[:4, 0, 0, 0].to(torch.int64)] == [round(v / 4095 * 65535) for v in (1001, 1011, 1021, 1031)]


def test_monochrome1_is_inverted(tmp_path):
    write_dicom(tmp_path / "x" / "train" / "0" / "m2.dcm", np.full((4, 4), 1000))
    write_dicom(tmp_path / "x" / "train" / "1" / "m1.dcm", np.full((4, 4), 1000), photometric="MONOCHROME1")
    write_dicom(tmp_path / "x" / "test" / "0" / "a.dcm", np.full((4, 4), 7))
    write_dicom(tmp_path / "x" / "test" / "1" / "b.dcm", np.full((4, 4), 9))
    source = DicomFolders(str(tmp_path))
    survey = source.survey()
    m2, m1 = (d.array[0, 0] for d in survey.nodes["x"]["train"].decoded)
    assert int(m2) == round(1000 / 4095 * 65535) and int(m1) == round((1 - 1000 / 4095) * 65535)


def test_rescale_and_window_of_a_ct_image(tmp_path):
    """Signed 12-bit CT: HU = stored - 1024; a soft-tissue window (center 40, width 400) maps -160 HU to black and
    240 HU to white, DICOM's LINEAR formula in between."""
    stored = np.array([[0, 824, 1064, 1264, 2000, -5]], dtype=np.int16)  # HU -1024, -200, 40, 240, 976, -1029
    write_dicom(tmp_path / "ct.dcm", stored, signed=True, RescaleSlope="1", RescaleIntercept="-1024",
                WindowCenter="40", WindowWidth="400")
    d = DicomFolders(csv=str(_csv(tmp_path, "ct.dcm"))).decode(tmp_path / "ct.dcm")
    hu = stored.astype(float) - 1024
    want = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    assert d.array.tolist() == np.round(want * 65535).astype(int).tolist()
    # the config's window replaces the file's; voi none takes the whole rescaled range
    wide = DicomFolders(csv=str(_csv(tmp_path, "ct.dcm")), window=[0, 2000]).decode(tmp_path / "ct.dcm")
    assert wide.array.tolist() == np.round(np.clip((hu + 0.5) / 1999 + 0.5, 0, 1) * 65535).astype(int).tolist()
    full = DicomFolders(csv=str(_csv(tmp_path, "ct.dcm")), voi="none").decode(tmp_path / "ct.dcm")
    lo, hi = -2048 - 1024, 2047 - 1024
    assert full.array.tolist() == np.round((hu - lo) / (hi - lo) * 65535).astype(int).tolist()


def test_a_voi_lut_sequence_is_applied(tmp_path):
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: 4096 entries from 0, 8-bit values
    lut.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())  # LUT Data: 0..255 over 0..4095
    write_dicom(tmp_path / "lut.dcm", np.array([[0, 160, 4095]]), VOILUTSequence=Sequence([lut]),
                WindowCenter="2048", WindowWidth="10")  # the LUT wins over the window
    d = DicomFolders(csv=str(_csv(tmp_path, "lut.dcm"))).decode(tmp_path / "lut.dcm")
    assert d.array.tolist() == [[0, round(10 / 255 * 65535), 65535]]


def test_compressed_files_decode_to_the_same_image(tmp_path):
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # OpenJPEG wants more than 8 x 8
    plain = write_dicom(tmp_path / "plain.dcm", pixels)
    rle = write_dicom(tmp_path / "rle.dcm", pixels)
    rle.compress(RLELossless)  # pydicom encodes and decodes RLE itself
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    source = DicomFolders(csv=str(_csv(tmp_path, "plain.dcm")))
    assert np.array_equal(source.decode(tmp_path / "rle.dcm").array, source.decode(tmp_path / "plain.dcm").array)
    # JPEG 2000 lossless through the dicom extra (pylibjpeg's OpenJPEG plugin), a dev dependency
    j2k = write_dicom(tmp_path / "j2k.dcm", pixels)
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    assert np.array_equal(source.decode(tmp_path / "j2k.dcm").array, source.decode(tmp_path / "plain.dcm").array)
    assert plain.file_meta.TransferSyntaxUID != pydicom.dcmread(tmp_path / "j2k.dcm").file_meta.TransferSyntaxUID


def test_undecodable_and_multi_frame_files_are_refused_with_one_message_each_and_a_count(tmp_path):
    tree(tmp_path)
    broken = write_dicom(tmp_path / "a" / "train" / "0" / "j2k.dcm", np.full((64, 64), 5))
    broken.compress(JPEG2000Lossless)
    broken.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])  # a cut JPEG 2000 stream
    broken.save_as(tmp_path / "a" / "train" / "0" / "j2k.dcm", enforce_file_format=True)
    for i in range(3):
        write_dicom(tmp_path / "a" / "test" / "1" / f"cine{i}.dcm", np.full((2, 8, 8), 100 + i), frames=2)
    with pytest.raises(HSLError) as error:
        one(tmp_path)
    text = str(error.value)
    assert "a/train: 1 unreadable DICOM file(s)" in text and "j2k.dcm: cannot decode its JPEG 2000" in text
    assert text.count("multi-frame, multi-page or 3D file(s)") == 1 and "a/test: 3 multi-frame" in text
    assert all(f"cine{i}.dcm" in text for i in range(3))


def test_a_dicom_tree_trains_and_no_patient_identifier_is_written_anywhere(tmp_path, capsys, monkeypatch):
    """Files carrying names, IDs and dates (and a refused multi-frame one): neither the check's report, the
    refusal, a run's printed output, its files (summary.json, config, logs) nor its offline W&B record holds any."""
    from conftest import tiny_hsl
    from hsl_lightning import FederatedDataModule, Federation, SyntheticAnchor
    from hsl_lightning.data.check import check, format_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    root = tree(tmp_path / "data", n=6, size=16, **IDENTIFIERS)
    dm = FederatedDataModule(primary=DicomFolders(str(root), size=16), sat=SyntheticAnchor(num_samples=32, size=16),
                             batch_size=8)
    report = check(dm, progress=False)
    assert report["problems"] == [] and report["nodes"]["a"]["train"]["bits"] == {"12": 12}
    printed = format_report(report)
    summary = Federation(rounds=1, run_dir=str(tmp_path / "run"), wandb="offline", progress=False).fit(tiny_hsl(), dm)
    assert [n["name"] for n in summary["nodes"]] == ["a", "b"]
    write_dicom(root / "b" / "train" / "1" / "cine.dcm", np.full((2, 16, 16), 3), frames=2, **IDENTIFIERS)
    with pytest.raises(HSLError) as refused:
        DicomFolders(str(root)).load()
    out = capsys.readouterr()
    texts = [printed, json.dumps(report), str(refused.value), out.out, out.err]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.relative_to(tmp_path).parts[:1]]
    assert any(p.name == "summary.json" for p in written) and any("wandb" in p.parts for p in written)
    for name, value in IDENTIFIERS.items():
        for token in {value, value.replace("^", " "), *value.split("^")}:
            assert not any(token in t for t in texts), f"{name} ({token}) printed"
            hits = [p for p in written if token.encode() in p.read_bytes()]
            assert not hits, f"{name} ({token}) written to {hits}"


def test_a_missing_csv_column_and_a_missing_pydicom_are_clear(tmp_path, monkeypatch):
    (tmp_path / "t.csv").write_text("path,label\nx.dcm,0\n")
    with pytest.raises(HSLError, match="lacks the column.*split"):
        DicomFolders(csv=str(tmp_path / "t.csv")).load()
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("pydicom") else real(name, *a, **k))
    with pytest.raises(HSLError, match=r"pip install 'hsl_lightning\[dicom\]'"):
        DicomFolders(str(tmp_path))


def _csv(folder, *names):
    path = folder / "files.csv"
    path.write_text("path,label,split\n" + "".join(f"{n},{i % 2},train\n" for i, n in enumerate(names)))
    return path

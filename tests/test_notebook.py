"""The notebooks run top to bottom in a real Jupyter kernel (the one way to test them as a reader
runs them): slow, and shortened to one round through their HSL_NOTEBOOK_* settings."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


def test_every_notebook_reads_its_shortening_settings_from_the_environment():
    """The fast check: each notebook is valid and takes the HSL_NOTEBOOK_* settings the slow tests set
    (a notebook that ignored them would train its full length in the suite)."""
    for name in ("quickstart", "homogenization"):
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        source = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
        for setting in ("ROUNDS", "EPOCHS", "SAMPLES", "SAT_SAMPLES", "RUN_DIR"):
            assert f"HSL_NOTEBOOK_{setting}" in source, (name, setting)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("HSL_NOTEBOOK_ROUNDS", "1")
    monkeypatch.setenv("HSL_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("HSL_NOTEBOOK_SAMPLES", "300")
    monkeypatch.setenv("HSL_NOTEBOOK_SAT_SAMPLES", "300")
    monkeypatch.setenv("HSL_NOTEBOOK_RUN_DIR", str(tmp_path / "run"))
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no figure"
    assert any("mean test AUC" in o.get("text", "") for o in outputs)
    assert (tmp_path / "run" / "summary.json").is_file()
    assert any("probability" in o.get("text", "") for o in outputs), "the notebook made no prediction"
    assert len((tmp_path / "run" / "predictions.csv").read_text().splitlines()) == 9  # header + 8 images


@pytest.mark.slow
def test_homogenization_notebook_runs_and_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("HSL_NOTEBOOK_ROUNDS", "1")
    monkeypatch.setenv("HSL_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("HSL_NOTEBOOK_SAMPLES", "300")
    monkeypatch.setenv("HSL_NOTEBOOK_SAT_SAMPLES", "200")
    monkeypatch.setenv("HSL_NOTEBOOK_RUN_DIR", str(tmp_path))
    nb = nbformat.read(REPO / "notebooks" / "homogenization.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no figure"
    table = "".join(o.get("text", "") for o in outputs)
    assert all(m in table for m in ("local", "fedavg", "hsl")) and "node separability" in table
    assert (tmp_path / "embedding.png").is_file()

import nbformat
from nbclient import NotebookClient

from conftest import REPO


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

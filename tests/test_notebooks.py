"""The Colab notebooks, executed top to bottom on CPU with SMALL=True (tiny random backbones,
synthetic images), through nbclient, as a person runs them; and saved without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

import saejax

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


@pytest.mark.parametrize("name", ["quickstart", "explore", "intervene"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    notebook = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in notebook.cells
               if cell.cell_type == "code"), "saved with outputs"
    # The first code cell installs this released saejax, by name and version, with the TPU extra.
    assert f'"saejax[tpu]=={saejax.__version__}"' in notebook.cells[1].source
    monkeypatch.setenv("SAEJAX_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "[CpuDevice" in text  # it really ran, on the CPU
    if name == "quickstart":
        assert "NMSE" in text
    if name == "intervene":
        images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images  # the before/after figure

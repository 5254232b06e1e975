"""The notebooks run top to bottom, offline, on the shipped embedded model."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from spu_peft.embedded import embedded_clip_path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sequence.ipynb", "analysis.ipynb"])
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(
        not cell.get("outputs") and not cell.get("execution_count")
        for cell in notebook.cells
        if cell.cell_type == "code"
    )


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # stays empty: the default model is shipped with the package
    monkeypatch.setenv("SPU_PEFT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert (tmp_path / "results" / "quickstart" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "results" / "quickstart" / "spu_selection.png").stat().st_size > 0
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "reloaded output identical: True" in outputs
    assert embedded_clip_path().parent == cache  # the kernel's loader would cache there: nothing was cached
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no cache, every output under results/


@pytest.mark.slow
def test_sequence_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPU_PEFT_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOKS / "sequence.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    results = json.loads((tmp_path / "results" / "sequence" / "results.json").read_text())
    assert list(results["methods"]) == ["zeroshot", "finetune_replay", "spu_replay", "vision_replay"]
    assert results["config"]["numerics_report"]["mode"] == "reproducible"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no cache, every output under results/


@pytest.mark.slow
def test_analysis_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPU_PEFT_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    figures = ("causal_trace.png", "repeat_rates.png", "neuron_maps.png")
    assert all((tmp_path / "results" / "analysis" / name).stat().st_size > 0 for name in figures)
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "recommended target_modules: [" in outputs and "(4, 4, 28, 28)" in outputs
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no cache, every output under results/


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

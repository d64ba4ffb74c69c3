"""notebooks/explore.ipynb runs top to bottom on micro models logged to a real MLflow store, and
git keeps it without outputs."""

from __future__ import annotations

import json

import pytest
from conftest import PARAMS, linked_outputs, micro_args

from blossom import cli

NOTEBOOK = PARAMS.parent / "notebooks" / "explore.ipynb"


def test_the_notebook_is_kept_without_outputs():
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells and all(c["outputs"] == [] and c["execution_count"] is None for c in cells)


@pytest.mark.slow
def test_the_notebook_runs_on_two_trained_runs_and_their_champion(micro_prepared, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _, paths = micro_prepared
    out = linked_outputs(paths, tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = [*micro_args(out), "--set", "tracking.live=true"]
    assert cli.main([*base, "classifier"]) == 0
    for lr in ("1e-3", "3e-3"):  # two runs to compare, each trained, evaluated and promoted
        for stage in ("train", "evaluate", "promote"):
            assert cli.main([*base, "--set", f"train.lr={lr}", stage]) == 0, stage

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    text = "".join(o.get("text", "") for o in outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "champion: blossom version" in text
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3  # the grid, the curves, the comparison
    assert "petal colour" in html  # the adherence table
    assert "train.lr" in html and "0.001" in html and "0.003" in html  # the two runs' differing setting

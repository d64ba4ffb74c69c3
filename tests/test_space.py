"""Deploying the app to a Hugging Face Space: the workflow is valid, and the staged Space runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import PARAMS
from streamlit.testing.v1 import AppTest

ROOT = PARAMS.parent
WORKFLOW = ROOT / ".github" / "workflows" / "deploy-space.yml"


def test_workflow_is_valid_against_the_github_workflow_schema():
    checker = Path(sys.executable).parent / "check-jsonschema"
    res = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_workflow_deploys_on_push_to_main_with_secrets_from_the_repository():
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert flow[True]["push"]["branches"] == ["main"]  # YAML 1.1 reads the key `on` as true
    text = WORKFLOW.read_text()
    assert "secrets.HF_TOKEN" in text and "secrets.HF_SPACES_REPO" in text
    assert "python space/stage.py build/space" in text


def stage(tmp_path: Path) -> Path:
    res = subprocess.run(
        [sys.executable, str(ROOT / "space" / "stage.py"), str(tmp_path / "space")],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(res.stdout.strip())


def test_staged_space_has_streamlit_front_matter_and_its_app_file(tmp_path):
    space = stage(tmp_path)
    front = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "streamlit" and (space / front["app_file"]).exists()
    assert (space / "src" / "blossom" / "webapp.py").exists() and not list(space.rglob("__pycache__"))
    requirements = (space / "requirements.txt").read_text()
    assert "onnxruntime" in requirements
    # a CPU Space gets the CPU build of torch, never the CUDA wheels
    assert "download.pytorch.org/whl/cpu" in requirements and "+cpu" in requirements
    # app.py's own path setup finds the staged package, not an installed one
    code = "import sys; sys.path.insert(0, 'src'); import blossom.webapp; print(blossom.webapp.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=space, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(space)


def test_staged_space_serves_the_model_with_onnx_runtime(tmp_path, micro_exported, monkeypatch):
    _, folder, _ = micro_exported
    space = stage(tmp_path)
    monkeypatch.delenv("HF_MODEL_REPO", raising=False)
    monkeypatch.setenv("BLOSSOM_MODEL", str(folder))
    at = AppTest.from_file(str(space / "app.py"), default_timeout=120).run()
    assert not at.exception and at.radio[0].value == "onnx"  # ONNX Runtime is the default backend
    at.slider[0].set_value(3)
    next(b for b in at.button if b.label == "Generate").click().run()
    assert "with ONNX Runtime" in at.success[0].value


def test_a_hub_model_that_cannot_be_downloaded_is_a_message(monkeypatch):
    monkeypatch.setenv("HF_MODEL_REPO", "someone/blossom-flowers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(str(ROOT / "src" / "blossom" / "app_entry.py"), default_timeout=60).run()
    assert not at.exception and "Could not download the model" in at.error[0].value

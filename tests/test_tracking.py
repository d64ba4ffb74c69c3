"""MLflow tracking and promotion against a real SQLite store."""

import dataclasses
import json

import pytest

from blossom.config import redact
from blossom.mlflow_run import flatten
from blossom.tracking import champion, log_training_run, promote
from blossom.train.diffusion import train_diffusion


@pytest.fixture
def tracked(micro_prepared, tmp_path, monkeypatch):
    """The micro config on an MLflow store of this test's own."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    cfg, paths = micro_prepared
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri sets it: undone after the test
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=uri)), paths


@pytest.fixture
def trained(tracked, tmp_path):
    cfg, paths = tracked
    out = tmp_path / "train"
    train_diffusion(cfg, paths.cache, paths.vae, out)
    return cfg, out, tmp_path


@pytest.fixture
def live_cfg(tracked):
    cfg, paths = tracked
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, live=True)), paths


def stop_after_checkpoint(monkeypatch, at_step, action):
    """Let training write its checkpoint at `at_step`, then run `action` (a kill, an error)."""
    from blossom.train import checkpoint

    real = checkpoint.save_checkpoint

    def save(ckpt_dir, step, *args):
        real(ckpt_dir, step, *args)
        if step == at_step:
            action()

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def test_training_streams_to_mlflow_and_a_resumed_run_continues_the_same_mlflow_run(live_cfg, tmp_path, monkeypatch):
    import os
    import signal

    from mlflow import MlflowClient

    cfg, paths = live_cfg
    client = MlflowClient(cfg.tracking.uri)
    out = tmp_path / "train"
    seen = {}

    def sigterm():  # what torchrun or a scheduler sends; the run must say KILLED, not stay RUNNING
        (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        seen["status"] = run.info.status
        seen["steps"] = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        os.kill(os.getpid(), signal.SIGTERM)

    stop_after_checkpoint(monkeypatch, 2, sigterm)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(cfg, paths.cache, paths.vae, out, track=True)
    assert seen == {"status": "RUNNING", "steps": [1, 2]}  # the run is there while training runs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    run_id = (out / "checkpoints" / "mlflow_run.txt").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    result = train_diffusion(cfg, paths.cache, paths.vae, out, resume="latest", track=True)
    run = client.get_run(run_id)
    assert result["mlflow_run_id"] == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]  # on from the checkpoint
    assert run.data.metrics["val_loss"] == result["val_loss"]
    assert run.data.params["train.lr"] == str(cfg.train.lr)

    candidate = log_training_run(cfg, out, tmp_path / "no-eval")  # promote logs the model into the same run
    assert candidate["run_id"] == run_id and len(client.search_runs([run.info.experiment_id])) == 1
    assert client.get_model_version(cfg.tracking.model_name, candidate["version"]).run_id == run_id
    from mlflow.models import Model

    model = Model.load(f"models:/{cfg.tracking.model_name}/{candidate['version']}")
    assert model.saved_input_example_info["type"] == "dataframe"  # MLflow served it once before registering


def test_training_that_fails_marks_its_mlflow_run_failed(live_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    cfg, paths = live_cfg

    def fail():
        raise RuntimeError("disk on fire")

    stop_after_checkpoint(monkeypatch, 2, fail)
    with pytest.raises(RuntimeError):
        train_diffusion(cfg, paths.cache, paths.vae, tmp_path / "train", track=True)
    run_id = (tmp_path / "train" / "checkpoints" / "mlflow_run.txt").read_text().strip()
    assert MlflowClient(cfg.tracking.uri).get_run(run_id).info.status == "FAILED"


def with_val_loss(train_dir, value):
    """Stand in for a run that reached `value`: promotion reads only the logged val loss."""
    info_path = train_dir / "model" / "train.json"
    info = json.loads(info_path.read_text())
    info["val_loss"], info["val_history"] = value, [[info["steps"], value]]
    info_path.write_text(json.dumps(info))


def test_champion_loss_never_rises_and_output_changes_only_on_promotion(trained):
    cfg, train_dir, tmp = trained
    out = tmp / "champion"
    history = []
    # better than nothing, worse, better, better only within tolerance, worse
    for loss in (0.5, 0.6, 0.4, 0.4 - cfg.tracking.promote_tolerance / 2, 0.45):
        with_val_loss(train_dir, loss)
        candidate = log_training_run(cfg, train_dir, tmp / "no-eval")
        before = (out / "champion.json").read_bytes() if out.exists() else None
        result = promote(cfg, candidate, out)
        after = (out / "champion.json").read_bytes()
        history.append((result["promoted"], result["val_loss"], before == after))
    assert [h[0] for h in history] == [True, False, True, False, False]
    assert [h[1] for h in history] == [0.5, 0.5, 0.4, 0.4, 0.4]
    assert [h[2] for h in history] == [False, True, False, True, True]  # unchanged bytes when not promoted
    assert champion(cfg)["version"] == "3"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()  # a loadable model folder


def test_champion_folder_is_rebuilt_identically_after_removal(trained):
    # DVC deletes stage outputs before a stage runs: the champion must come back from MLflow, same bytes.
    import shutil

    cfg, train_dir, tmp = trained
    with_val_loss(train_dir, 0.3)
    promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
    first = {p.relative_to(tmp / "champion"): p.read_bytes() for p in (tmp / "champion").rglob("*") if p.is_file()}
    shutil.rmtree(tmp / "champion")
    with_val_loss(train_dir, 0.35)
    result = promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
    second = {p.relative_to(tmp / "champion"): p.read_bytes() for p in (tmp / "champion").rglob("*") if p.is_file()}
    assert not result["promoted"] and first == second


def test_params_hold_the_config_but_no_credentials(trained):
    from mlflow import MlflowClient

    cfg, train_dir, tmp = trained
    secret_uri = cfg.tracking.uri  # a file store has no password; check redaction on a server URI too
    candidate = log_training_run(cfg, train_dir, tmp / "no-eval")
    run = MlflowClient(secret_uri).get_run(candidate["run_id"])
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert "tracking.uri" not in run.data.params
    assert run.data.metrics["val_loss"] == candidate["val_loss"]
    assert redact("https://alice:s3cret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert flatten({"a": {"b": [1, 2], "c": None}}) == {"a.b": "[1, 2]", "a.c": "null"}


def test_unreachable_server_is_a_one_line_error(trained, monkeypatch):
    from blossom.mlflow_run import TrackingError

    cfg, train_dir, tmp = trained
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri="http://user:pw@127.0.0.1:9"))
    with pytest.raises(TrackingError) as err:
        log_training_run(cfg, train_dir, tmp / "no-eval")
    message = str(err.value)
    assert "http://127.0.0.1:9" in message and "pw" not in message and "\n" not in message


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts, in its own process group."""
    import sys
    from pathlib import Path

    from servers import free_port, http_ok, process_group

    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    url = f"http://127.0.0.1:{port}"
    with process_group(cmd, tmp_path / "server.log", http_ok(f"{url}/health")):
        yield url


@pytest.mark.slow
def test_logging_and_promotion_through_a_real_mlflow_server(trained, mlflow_server, monkeypatch):
    from conftest import MICRO, PARAMS
    from mlflow import MlflowClient

    from blossom.config import load_config

    _, train_dir, tmp = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = load_config(PARAMS, None, MICRO)
    assert cfg.tracking.uri == mlflow_server  # the environment wins over params.yaml
    with_val_loss(train_dir, 0.5)
    first = promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
    with_val_loss(train_dir, 0.7)
    second = promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
    assert first["promoted"] and not second["promoted"] and second["version"] == "1"

    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions(f"name = '{cfg.tracking.model_name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    run = client.get_run(client.get_model_version_by_alias(cfg.tracking.model_name, "champion").run_id)
    assert run.data.metrics["val_loss"] == 0.5 and run.data.params["train.steps"] == str(cfg.train.steps)
    assert (tmp / "champion" / "unet" / "diffusion_pytorch_model.safetensors").exists()  # downloaded via the server
    assert (tmp / "champion" / "train.json").exists() and not (tmp / "champion" / "MLmodel").exists()


def decode_png(text: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_the_champion_is_a_standard_mlflow_model(trained):
    """`models:/blossom@champion` loads with MLflow alone and draws; its MLmodel has a signature."""
    import warnings

    import mlflow
    import numpy as np
    import pandas as pd

    cfg, train_dir, tmp = trained
    with_val_loss(train_dir, 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
        uri = f"models:/{cfg.tracking.model_name}@champion"
        model = mlflow.pyfunc.load_model(uri)
    # MLflow asks for type hints on predict at every logging and load, unless there are some
    assert not [w for w in caught if "type hint" in str(w.message)]
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["prompt"] and info.signature.outputs.input_names() == ["image"]
    assert {p.name for p in info.signature.params} == {"sampler", "steps", "guidance", "seed"}
    assert "python_function" in info.flavors
    out = model.predict(pd.DataFrame({"prompt": ["a red flower", "a blue flower"]}), params={"steps": 2, "seed": 3})
    images = [decode_png(t) for t in out["image"]]
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].tobytes() != images[1].tobytes()
    again = model.predict(pd.DataFrame({"prompt": ["a red flower"]}), params={"steps": 2, "seed": 3})
    # same seed, same image; alone rather than in a batch of two, CPU kernels may round a pixel apart
    alone = np.asarray(decode_png(again["image"][0])).astype(int)
    assert np.abs(alone - np.asarray(images[0]).astype(int)).max() <= 2
    with pytest.raises(Exception, match="steps must be"):
        model.predict(pd.DataFrame({"prompt": ["a red flower"]}), params={"steps": 0})


@pytest.mark.slow
def test_mlflow_models_serve_serves_the_champion(trained):
    """The champion behind MLflow's own REST server (`mlflow models serve`), as an MLOps user deploys it."""
    import os
    import sys
    import urllib.request
    from pathlib import Path

    from servers import free_port, process_group

    cfg, train_dir, tmp = trained
    with_val_loss(train_dir, 0.3)
    promote(cfg, log_training_run(cfg, train_dir, tmp / "no-eval"), tmp / "champion")
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{cfg.tracking.model_name}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    from servers import http_ok

    bin_dir = str(Path(sys.executable).parent)  # mlflow starts uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with process_group(cmd, tmp / "serve.log", http_ok(f"http://127.0.0.1:{port}/ping"), timeout=180, env=env):
        body = json.dumps(
            {"dataframe_split": {"columns": ["prompt"], "data": [["a red flower"]]}, "params": {"steps": 2}}
        ).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            predictions = json.loads(resp.read())["predictions"]
    assert decode_png(predictions[0]["image"]).size == (32, 32)

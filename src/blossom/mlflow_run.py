"""MLflow's connection (one-line errors, short retries) and the run a training streams to while it
trains. Kept apart from tracking.py so the train stage depends on this much of MLflow, not on the
model logging and registry code."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blossom.config import Config, redact
from blossom.errors import BlossomError, first_line

log = logging.getLogger(__name__)


class TrackingError(BlossomError):
    pass


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


def connect(cfg: Config):
    import os

    import mlflow
    from mlflow import MlflowClient

    # MLflow's own default retries a dead server for minutes; fail within seconds unless told otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    mlflow.set_tracking_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


@contextmanager
def guard(what: str, cfg: Config) -> Iterator[None]:
    """Turn MLflow's connection and store errors into one line that says what to check."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, ConnectionError, OSError) as e:
        first = redact(first_line(e, 200))  # MLflow's messages repeat the URI, password included
        raise TrackingError(
            f"MLflow {what} failed at {redact(cfg.tracking.uri)} ({first}): "
            "check MLFLOW_TRACKING_URI, the server and its credentials"
        ) from None


def params_of(cfg: Config) -> dict[str, str]:
    return {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith("tracking.uri")}


def row_metrics(row: dict) -> dict[str, float]:
    """One stats.jsonl row as MLflow metrics."""
    values = {k: row[k] for k in ("loss", "lr", "images_per_s", "grad_norm")}
    values.update({f"loss_t{b}": v for b, v in enumerate(row["loss_by_t_bin"])})
    return values


def continues(client, run_id: str, experiment_id: str) -> bool:
    """Whether run_id is a live run of this experiment in this store, to log on into."""
    from mlflow.exceptions import MlflowException

    try:
        info = client.get_run(run_id).info
    except MlflowException:  # another store than the one the run was started in
        log.warning("MLflow run %s is not in %s: it goes on in a new run", run_id, redact(client.tracking_uri))
        return False
    return info.lifecycle_stage == "active" and info.experiment_id == experiment_id


class LiveRun:
    """Rank 0's MLflow run while training: it shows before the first step, metrics stream in as
    they are logged, and its status says how training ended (FINISHED; KILLED on Ctrl-C or SIGTERM,
    which torchrun and schedulers send; FAILED on an error). A resumed training continues the same
    run: its id is kept beside the checkpoints, which live exactly as long as the run they belong to.
    A kill -9 leaves the run RUNNING until the resume reopens it."""

    FILE = "mlflow_run.txt"

    def __init__(self, cfg: Config, ckpt_dir: Path, resumed: bool, name: str):
        self.cfg, self.file, self.resumed, self.name = cfg, ckpt_dir / self.FILE, resumed, name
        self.run_id: str | None = None
        self._broken = False
        self._previous_handler = None

    def __enter__(self) -> LiveRun:
        import mlflow

        from blossom.fsutil import write_text

        with guard("logging", self.cfg):
            client = connect(self.cfg)
            experiment = mlflow.set_experiment(self.cfg.tracking.experiment)
            earlier = self.file.read_text().strip() if self.resumed and self.file.exists() else None
            if earlier and continues(client, earlier, experiment.experiment_id):
                run = mlflow.start_run(run_id=earlier)
                log.info("MLflow: continuing run %s", earlier)
            else:
                run = mlflow.start_run(run_name=self.name)
                mlflow.set_tag("tracking_uri", redact(self.cfg.tracking.uri))
                mlflow.log_params(params_of(self.cfg))  # MLflow sends them in batches of its own size
                write_text(self.file, run.info.run_id + "\n")
        self.run_id = run.info.run_id
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _interrupted)
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Never stops training: a tracking server that goes away costs the curves, not the model."""
        import mlflow
        from mlflow.exceptions import MlflowException

        if self._broken:
            return
        try:
            mlflow.log_metrics(metrics, step=step)
        except (MlflowException, OSError) as e:
            self._broken = True
            log.warning("MLflow logging stopped (%s); training goes on", redact(first_line(e, 200)))

    def __exit__(self, kind, exc, tb) -> None:
        import mlflow

        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.end_run(status)
        except Exception as e:  # the training's own outcome matters more than the run's status
            log.warning("MLflow could not mark run %s %s (%s)", self.run_id, status, redact(first_line(e, 200)))


class NoRun:
    """LiveRun's stand-in where nothing is tracked live (other ranks, tracking.live off)."""

    run_id = None

    def __enter__(self) -> NoRun:
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

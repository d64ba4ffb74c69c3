"""A SageMaker training job built from params.yaml: PyTorch estimator, torch_distributed, spot, S3 checkpoints.

`blossom sagemaker --dry-run` prints the job and needs nothing extra; submitting needs the
`sagemaker` SDK (pip install 'blossom[sagemaker]') and AWS credentials in the environment.
Inside the job, `sagemaker_entry.py` runs once per process under torchrun.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from blossom.config import Config
from blossom.errors import ConfigError

CHECKPOINTS = "/opt/ml/checkpoints"  # SageMaker syncs this folder with checkpoint_s3_uri, and restores it on restart
SHIPPED = ("src", "pyproject.toml", "README.md", "configs")  # what the job needs of the project


def job_definition(cfg: Config, overrides: list[str]) -> dict:
    s = cfg.sagemaker
    job = {
        "estimator": "sagemaker.pytorch.PyTorch",
        "entry_point": "sagemaker_entry.py",
        "source_dir": f"a staged copy of {', '.join(SHIPPED)}, params.yaml, the entry point and requirements.txt",
        "role": s.role,
        "instance_type": s.instance_type,
        "instance_count": s.instance_count,
        "framework_version": s.framework_version,
        "py_version": s.py_version,
        "distribution": {"torch_distributed": {"enabled": True}},  # torchrun on every instance
        "use_spot_instances": s.spot,
        "max_run": int(s.max_run_hours * 3600),
        "checkpoint_s3_uri": s.checkpoint_s3_uri,
        "checkpoint_local_path": CHECKPOINTS,
        "hyperparameters": {"preset": cfg.preset, "overrides": " ".join(overrides)},
        # Outputs (data, cache, checkpoints) live under the synced folder, so a restarted spot job
        # finds its cache and its `latest` checkpoint and goes on from there.
        "environment": {"BLOSSOM_OUTPUTS": f"{CHECKPOINTS}/outputs", "HF_HUB_OFFLINE": "1"},
    }
    if s.spot:
        job["max_wait"] = int(s.max_wait_hours * 3600)
    if s.output_s3_uri:
        job["output_path"] = s.output_s3_uri
    return job


def missing_for_submit(cfg: Config) -> list[str]:
    s = cfg.sagemaker
    missing = [] if s.role else ["sagemaker.role (the IAM role ARN the job runs as)"]
    if s.spot and not (s.checkpoint_s3_uri or "").startswith("s3://"):
        missing.append("sagemaker.checkpoint_s3_uri (s3://...; a spot job without it cannot resume)")
    return missing


def stage_source(project: Path, params: Path, into: Path) -> Path:
    for name in SHIPPED:
        src = project / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, into / name)
    shutil.copy2(params, into / "params.yaml")
    shutil.copy2(Path(__file__).with_name("sagemaker_entry.py"), into / "sagemaker_entry.py")
    # The SageMaker PyTorch container pip-installs this before running the entry point.
    (into / "requirements.txt").write_text(".[deepspeed]\n")
    return into


def submit(cfg: Config, job: dict, project: Path, params: Path, credentials: bool) -> str:
    missing = missing_for_submit(cfg)
    if missing:
        raise ConfigError(f"cannot submit the SageMaker job: set {'; '.join(missing)} (--dry-run shows the job)")
    if not credentials:
        raise ConfigError(
            "no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE), or pass --dry-run to print the job"
        )
    try:
        from sagemaker.pytorch import PyTorch
    except ImportError:
        raise ConfigError("the SageMaker SDK is not installed: pip install 'blossom[sagemaker]'") from None
    kwargs = {k: v for k, v in job.items() if k not in ("estimator", "source_dir")}
    with tempfile.TemporaryDirectory(prefix="blossom-sagemaker-") as tmp:
        estimator = PyTorch(source_dir=str(stage_source(project, params, Path(tmp))), **kwargs)
        estimator.fit(wait=False)
        return estimator.latest_training_job.name

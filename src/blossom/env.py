"""The one module that reads environment variables; everything else receives their values.

What a launcher says (torchrun, accelerate), what the config takes from the environment, Hub and
AWS credentials (kept out of Config so they are never saved), and the app's settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def overrides_from_env() -> dict[str, str]:
    """Config values the environment sets: BLOSSOM_PRESET (the preset, below --preset),
    BLOSSOM_OUTPUTS (outputs) and MLFLOW_TRACKING_URI (tracking.uri, over params.yaml)."""
    found = {
        "preset": os.environ.get("BLOSSOM_PRESET") or None,
        "outputs": os.environ.get("BLOSSOM_OUTPUTS"),
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or None,
    }
    return {k: v for k, v in found.items() if v is not None}


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a torchrun / accelerate launch (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0  # torchrun --max-restarts: how many times this worker group was restarted
    launched: bool = False  # started by torchrun / accelerate launch (even as a single process)
    mixed_precision: str | None = None  # accelerate launch --mixed_precision
    use_deepspeed: bool = False  # accelerate launch --use_deepspeed


def launch_env() -> LaunchEnv:
    def num(name: str, default: int) -> int:
        return int(os.environ.get(name) or default)

    world = num("WORLD_SIZE", 1)
    return LaunchEnv(
        num("RANK", 0),
        world,
        num("LOCAL_RANK", 0),
        num("LOCAL_WORLD_SIZE", world),
        num("TORCHELASTIC_RESTART_COUNT", 0),
        "LOCAL_RANK" in os.environ,
        os.environ.get("ACCELERATE_MIXED_PRECISION") or None,
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true",
    )


@dataclass(frozen=True)
class HubAccess:
    """Hugging Face Hub settings from the environment; kept out of Config so they are never saved."""

    token: str | None
    offline: bool
    endpoint: str


def hub_access() -> HubAccess:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return HubAccess(
        os.environ.get("HF_TOKEN") or None, offline, os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    )


@dataclass(frozen=True)
class AppSettings:
    hub_repo: str | None  # HF_MODEL_REPO: serve this Hub model repo
    model_dir: str | None  # BLOSSOM_MODEL: serve this local folder
    outputs: str  # where to look for the published model otherwise


def app_settings() -> AppSettings:
    return AppSettings(
        os.environ.get("HF_MODEL_REPO") or None,
        os.environ.get("BLOSSOM_MODEL") or None,
        os.environ.get("BLOSSOM_OUTPUTS", "outputs"),
    )


def aws_credentials_present() -> bool:
    """Whether boto3 could find credentials in the environment (keys, a profile, or a web identity)."""
    return any(
        os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        )
    )


def sagemaker_model_dir() -> str | None:
    """Inside a SageMaker job: the folder whose contents become model.tar.gz."""
    return os.environ.get("SM_MODEL_DIR") or None

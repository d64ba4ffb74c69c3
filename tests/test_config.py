import pytest
from conftest import PARAMS

from blossom.config import Config, load_config
from blossom.errors import ConfigError


def test_params_yaml_base_is_the_tiny_preset_and_matches_defaults():
    # params.yaml spells out every knob; its base sections must equal the built-in defaults,
    # so running without params.yaml gives the same tiny preset.
    from_file = load_config(PARAMS).to_dict()
    assert from_file == Config().to_dict()


def test_preset_overrides_only_its_keys():
    small = load_config(PARAMS, preset="small")
    tiny = load_config(PARAMS)
    assert small.preset == "small" and small.train.steps > tiny.train.steps
    assert small.unet == tiny.unet


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.steps=ten", "config key 'train.steps' must be int"),
        ("train.steps=true", "config key 'train.steps' must be int"),
        ("unet.block_out_channels=7", "config key 'unet.block_out_channels' must be a list"),
        ("train.steps=0", "config key 'train.steps' must be positive"),
        ("train.prediction_type=x0", "train.prediction_type must be"),
        ("nosuchsection.key=1", "unknown config key 'nosuchsection'"),
    ],
)
def test_bad_keys_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of tiny, small"):
        load_config(PARAMS, preset="huge")


def test_float_and_null_overrides_parse():
    cfg = load_config(PARAMS, overrides=["train.lr=3e-4", "train.min_snr_gamma=null", "sample.guidance=7"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.min_snr_gamma is None
    assert cfg.sample.guidance == 7.0 and isinstance(cfg.sample.guidance, float)


def test_missing_explicit_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_password_in_the_environment_never_reaches_a_saved_config(tmp_path, monkeypatch):
    from blossom.config import save_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.com")
    cfg = load_config(PARAMS)
    assert cfg.tracking.uri == "https://alice:s3cret@mlflow.example.com"  # used as given...
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in text and "https://mlflow.example.com" in text  # ...but saved without it


def test_a_password_in_params_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="tracking.uri holds a password"):
        load_config(PARAMS, overrides=["tracking.uri=https://bob:pw@mlflow.example.com"])


def test_no_credentials_in_tracked_project_files():
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=PARAMS.parent, capture_output=True, text=True).stdout.split()
    patterns = [
        r"AKIA[0-9A-Z]{16}",
        r"hf_[A-Za-z0-9]{30,}",
        r"://[^/\s:@{}]+:[^/\s@{}]+@",
        r"(?i)(password|secret|token)\s*[:=]\s*['\"][^'\"]{6,}",
    ]
    for name in files:
        if name.startswith("tests/") or not (PARAMS.parent / name).is_file():
            continue
        text = (PARAMS.parent / name).read_text(errors="ignore")
        for pattern in patterns:
            assert not re.search(pattern, text), f"{name} matches {pattern}"


def test_a_bare_no_written_by_yaml_1_2_tools_still_means_no(tmp_path):
    # `dvc exp run -S` rewrites params.yaml in YAML 1.2, where `no` needs no quotes; PyYAML reads it as false.
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  mixed_precision: no\n")
    assert load_config(params).train.mixed_precision == "no"
    params.write_text("train:\n  mixed_precision: yes\n")
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(params)


@pytest.mark.parametrize(
    ("env", "train", "result"),
    [
        ({"mixed_precision": "bf16"}, {}, "bf16"),  # accelerate launch --mixed_precision bf16 is honoured
        ({"mixed_precision": "no"}, {"mixed_precision": "bf16"}, "make them agree"),
        ({"mixed_precision": "fp8"}, {}, "no, bf16 or fp16"),
        ({"mixed_precision": "fp16"}, {"mixed_precision": "bf16"}, "make them agree"),
        ({"mixed_precision": "fp16"}, {"mixed_precision": "auto"}, "fp16"),  # the launcher decides what auto would
        ({"use_deepspeed": True}, {}, "train.deepspeed is not set"),
        ({}, {}, "no"),
    ],
)
def test_accelerate_launch_options_are_honoured_or_refused(env, train, result):
    import dataclasses

    from blossom.config import with_launcher
    from blossom.env import LaunchEnv

    cfg = Config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    launch = LaunchEnv(**env)
    if result in ("no", "bf16", "fp16"):
        assert with_launcher(cfg, launch).train.mixed_precision == result
    else:
        with pytest.raises(ConfigError, match=result):
            with_launcher(cfg, launch)


def test_launch_env_reads_accelerates_variables(monkeypatch):
    from blossom.env import launch_env

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env = launch_env()
    assert env.mixed_precision == "fp16" and env.use_deepspeed


def test_choice_fields_are_typed_and_the_sampler_choices_are_the_samplers():

    from blossom.config import SampleConfig, choices
    from blossom.sampling import SAMPLERS

    assert choices(SampleConfig, "sampler") == SAMPLERS
    with pytest.raises(
        ConfigError, match=r"^data.source must be one of 'synthetic', 'folder' or 'oxford102', got 'ftp'$"
    ):
        load_config(PARAMS, overrides=["data.source=ftp"])
    assert load_config(PARAMS, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"

import pytest

from blossom.config import Config, load_config
from blossom.errors import ConfigError

from conftest import PARAMS


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

import subprocess
import sys

import pytest
from conftest import PARAMS

from blossom.cli import main


def run(args, capsys):
    code = main(["--params", str(PARAMS), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "gigantic", "data"], "unknown preset 'gigantic'"),
        (["--set", "train.steps=-3", "train"], "'train.steps' must be positive"),
        (["--set", "train.lr=fast", "train"], "'train.lr' must be float"),
        (["--set", "sample.steps=0", "generate", "a flower"], "'sample.steps' must be positive"),
        (["generate", "   "], "the prompt is empty"),
        (
            ["generate", "a flower", "--backend", "torch", "--precision", "int8"],
            "the torch backend runs fp32 or bf16, not 'int8': use --backend onnx",
        ),
        (["--set", "data.source=folder", "data"], "data.path is empty"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, _, err = run(["--set", f"outputs={tmp_path}", *args], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_no_model_yet_says_how_to_make_one(capsys, tmp_path):
    code, _, err = run(["--set", f"outputs={tmp_path}", "generate", "a red flower"], capsys)
    assert code == 2 and "no model at" in err and "run `make run` (or `dvc repro`) to train one" in err


def test_generate_rejects_zero_steps_from_the_command_line(capsys, tmp_path, micro_prepared):
    code, _, err = run(["--set", f"outputs={tmp_path}", "generate", "a flower", "--steps", "0"], capsys)
    assert code == 2 and ("steps must be a positive number" in err or "no model at" in err)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "blossom.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in (
        "data",
        "caption",
        "push-data",
        "pull-data",
        "cache",
        "train-vae",
        "train",
        "classifier",
        "evaluate",
        "promote",
        "export",
        "publish",
        "generate",
        "run",
    ):
        assert stage in out.stdout


def test_global_options_work_after_the_command_and_combine(capsys, tmp_path):
    code, _, err = run(["generate", "a flower", "--set", "sample.steps=0"], capsys)
    assert code == 2 and "'sample.steps' must be positive" in err
    code, _, err = run(["--set", "sample.steps=0", "generate", "a flower", "--set", "sample.guidance=nan"], capsys)
    assert code == 2 and "'sample.guidance' must be a finite number" in err  # both reached the config
    code, _, err = run(["data", "--preset", "gigantic"], capsys)
    assert code == 2 and "unknown preset 'gigantic'" in err


def test_python_m_blossom_and_version():
    out = subprocess.run([sys.executable, "-m", "blossom", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("blossom 0.")


def test_known_third_party_noise_is_silenced_and_real_warnings_are_not(caplog):
    import logging

    from blossom.logs import setup

    setup()
    with caplog.at_level(logging.INFO):
        logging.getLogger().warning("Please consider pre-processing before quantization. See https://...")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed")
        logging.getLogger("onnxscript.optimizer._constant_folding").warning("Evaluation failed: cannot reshape")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
        logging.getLogger().warning("Please consider lowering the learning rate")
    assert [r.getMessage() for r in caplog.records] == [
        "Some weights were not initialized",
        "Please consider lowering the learning rate",
    ]


def test_generate_several_prompts_and_a_file_without_overwriting(micro_exported, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from blossom.backends import load_backend
    from blossom.sampling import sample

    _, folder, _ = micro_exported
    (tmp_path / "prompts.txt").write_text("a blue flower on sand\n\n  a white flower at night  \n")
    out = tmp_path / "gen"
    args = [
        "generate",
        "a red flower",
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--n",
        "2",
        "--steps",
        "2",
        "--guidance",
        "5",
        "--seed",
        "5",
        "--model",
        str(folder),
        "--out",
        str(out),
    ]
    assert run(args, capsys)[0] == 0
    assert run(args, capsys)[0] == 0  # again: numbered on, nothing overwritten
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:03d}.png" for i in range(12)]
    prompts = ["a red flower"] * 2 + ["a blue flower on sand"] * 2 + ["a white flower at night"] * 2
    # no --backend on an export: ONNX Runtime, as the app starts with
    alone = sample(load_backend("onnx", folder), prompts, "unipc", 2, 5.0, 5)
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:03d}.png")), alone[i])
        assert np.array_equal(np.asarray(Image.open(out / f"{i + 6:03d}.png")), alone[i])


def test_every_option_has_help_text():
    import argparse

    from blossom.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")
            elif not action.help and action.dest != "help":
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "blossom")
    assert missing == []

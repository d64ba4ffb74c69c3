"""int8 that is right on every x86 CPU, whatever CPU runs the tests.

CPUs without VNNI multiply u8 activations by s8 weights with VPMADDUBSW, whose pairwise 16-bit
sums saturate for full-range weights. The saved graphs are checked for the property that prevents
it (7-bit weights, u8 activations), and the int8 UNet is run on an emulated AVX2-only CPU
(qemu-user, -cpu Haswell) beside this one: the same graph must agree with fp32 equally well on
both, while a full-range graph, the old format, is shown to break there (so the emulation really
takes the saturating path). The int8 text encoder (8-bit weights in blocks, other kernels) is run
on both the same way.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto
from transformers import AutoTokenizer

from blossom import cpu
from blossom.backends import load_backend
from blossom.cpu import auto_precision, has_vnni, vector_features
from blossom.errors import ModelError
from blossom.layout import INT8_FILES, INT8_TEXT_ENCODER
from blossom.models import tokenize
from blossom.quantize import WEIGHT_LIMIT, int8_operand_ranges, saturates_without_vnni

TEXT_PROMPTS = ["a red flower with five round petals on green grass", "a ruby blossom at midnight"]
# Runs an fp32 graph and int8 versions of it on recorded inputs with ONNX Runtime alone (no torch,
# so it starts quickly under emulation) and prints each int8 graph's output SNR against fp32, in dB.
SNR_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
feeds = np.load(sys.argv[1]); fp32, graphs = sys.argv[2], sys.argv[3:]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
run = lambda path: ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, dict(feeds))[0]
ref = run(fp32)
print(" ".join(str(10 * np.log10(np.mean(ref**2) / np.mean((ref - run(g))**2))) for g in graphs))
"""


def test_saved_int8_graphs_cannot_saturate_on_any_x86_cpu(micro_exported):
    _, out, _ = micro_exported
    for name in INT8_FILES.values():
        largest, activations = int8_operand_ranges(out / "onnx" / name)
        assert 0 < largest <= WEIGHT_LIMIT and activations == {TensorProto.UINT8}, name
        # u8 x s8 pairs summed in 16 bits (VPMADDUBSW): the worst case must fit in an int16
        assert 2 * 255 * largest <= 2**15 - 1
        assert not saturates_without_vnni(out / "onnx" / name)


@pytest.fixture(scope="session")
def full_range(micro_exported, tmp_path_factory):
    """The micro export with full-range (8-bit) int8 weights: the format blossom wrote before."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from blossom.backends import OnnxBackend
    from blossom.export import CHECK_PROMPTS
    from blossom.quantize import _Reader, calibration_feeds, nodes_to_quantize

    _, out, _ = micro_exported
    folder = tmp_path_factory.mktemp("full-range") / "export"
    shutil.copytree(out, folder)
    feeds, _ = calibration_feeds(OnnxBackend(out), CHECK_PROMPTS * 4, "ddim", 4, 5.0)
    import onnx

    source = folder / "onnx" / "unet.onnx"
    quantize_static(
        str(source),
        str(folder / "onnx" / INT8_FILES["unet"]),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_quantize=nodes_to_quantize(onnx.load(str(source), load_external_data=False).graph),
        use_external_data_format=True,
    )
    np.savez(folder / "feeds.npz", **feeds[len(feeds) // 2])  # a mid-trajectory UNet input
    return folder


def _snr(graphs: list, fp32, feeds, emulate: bool) -> list[float]:
    cmd = [sys.executable, "-c", SNR_SCRIPT, str(feeds), str(fp32), *map(str, graphs)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", "Haswell", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [float(x) for x in done.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86 CPU without VNNI")
def test_int8_is_as_right_on_an_avx2_cpu_as_here(micro_exported, full_range):
    assert shutil.which("qemu-x86_64"), "qemu-user is missing: `make test` installs it (apt-get install qemu-user)"
    _, out, _ = micro_exported
    graphs = [out / "onnx" / INT8_FILES["unet"], full_range / "onnx" / INT8_FILES["unet"]]
    fp32, feeds = out / "onnx" / "unet.onnx", full_range / "feeds.npz"
    here = _snr(graphs, fp32, feeds, emulate=False)
    avx2 = _snr(graphs, fp32, feeds, emulate=True)
    print(
        f"UNet output SNR vs fp32, dB: 7-bit here {here[0]:.2f}, emulated AVX2 {avx2[0]:.2f}; "
        f"full-range here {here[1]:.2f}, emulated AVX2 {avx2[1]:.2f}"
    )
    # the text encoder's 8-bit block weights (MatMulNBits) take other kernels: right there too
    text_feeds = full_range / "text_feeds.npz"
    np.savez(text_feeds, **tokenize(AutoTokenizer.from_pretrained(out / "tokenizer"), TEXT_PROMPTS, 16))
    text = [out / "onnx" / INT8_TEXT_ENCODER]
    text_here = _snr(text, out / "onnx" / "text_encoder.onnx", text_feeds, emulate=False)[0]
    text_avx2 = _snr(text, out / "onnx" / "text_encoder.onnx", text_feeds, emulate=True)[0]
    print(f"text encoder states SNR vs fp32, dB: here {text_here:.2f}, emulated AVX2 {text_avx2:.2f}")
    assert text_here > 20 and abs(text_avx2 - text_here) < 1.0, (text_here, text_avx2)
    ours_here, ours_avx2 = here[0], avx2[0]
    old_here, old_avx2 = here[1], avx2[1]
    assert ours_here > 20 and abs(ours_avx2 - ours_here) < 1.0, (here, avx2)
    # the emulated CPU really takes the saturating path: full-range weights lose > 6 dB on it
    assert old_avx2 < old_here - 6 if has_vnni() else abs(old_avx2 - old_here) < 1.0, (here, avx2)


def test_old_full_range_int8_is_refused_where_it_would_saturate(full_range, monkeypatch):
    assert saturates_without_vnni(full_range / "onnx" / INT8_FILES["unet"])
    monkeypatch.setattr("blossom.cpu.has_vnni", lambda flags=None: False)
    with pytest.raises(ModelError, match="overflow on CPUs without VNNI.*blossom export.*--precision fp32"):
        load_backend("onnx", full_range, "int8")
    monkeypatch.setattr("blossom.cpu.has_vnni", lambda flags=None: True)
    assert load_backend("onnx", full_range, "int8").precision == "int8"


def test_auto_precision_picks_int8_only_with_vnni_and_int8_graphs(micro_exported, tmp_path):
    avx2 = frozenset({"avx2", "fma"})
    avx512_vnni = frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})
    assert auto_precision(True, avx2)[0] == "fp32"
    assert auto_precision(True, frozenset({"avx2", "fma", "avx_vnni"}))[0] == (
        "int8" if platform.machine() == "x86_64" else "fp32"
    )
    assert auto_precision(True, avx512_vnni)[0] == ("int8" if platform.machine() == "x86_64" else "fp32")
    assert auto_precision(False, avx512_vnni) == ("fp32", "the model has no int8 graphs")
    assert vector_features(avx512_vnni) == ["avx2", "fma", "avx512f", "avx512_vnni"]
    _, out, _ = micro_exported
    backend = load_backend("onnx", out, "auto")
    assert backend.precision == ("int8" if has_vnni() else "fp32") and backend.precision_why
    assert load_backend("torch", out, "auto").precision == "fp32"
    bare = tmp_path / "no-int8"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("*.int8.onnx*"))
    assert load_backend("onnx", bare, "auto").precision == "fp32"


def test_the_machine_line_names_the_cpu_family(monkeypatch):
    # two hosts of one kind report the same model name; their family tells the generations apart
    info = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "sse2 avx2 fma avx512f"}
    monkeypatch.setattr("blossom.cpu._cpuinfo", lambda key: info.get(key, ""))
    assert cpu.describe() == "AMD EPYC (family 26 model 2) [avx2 fma avx512f]"
    info.pop("cpu family")
    assert cpu.describe() == "AMD EPYC [avx2 fma avx512f]"

"""Bad input and faults across every command: one line naming the problem and the fix, the right
exit status, and nothing lost or changed.

Each case builds what it needs in a project folder that already holds a data set, a trained model
and its export (as after `make run`), runs `blossom` in-process, and checks: the exit status
(2 for usage errors, 1 for runtime failures), the error is one `blossom: error:` line with the
expected words and no traceback, and every file that existed before (outputs and the user's own
folders) is byte-identical afterwards, with the same permission bits. A new case is a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import micro_args, tiny_decoder
from PIL import Image

from blossom.cli import main

_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _digest(p: Path) -> str:
    # Cases share the made outputs through hard links: a file whose inode, size and times are
    # unchanged is the same file, hashed once.
    st = p.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _DIGESTS[key]


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: content hash and permission bits."""
    return {
        str(p.relative_to(root)): (_digest(p), stat.S_IMODE(p.lstat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def link_copy(src: Path, dst: Path) -> None:
    """A copy of src whose files are hard links: blossom replaces files, never edits them in place."""
    shutil.copytree(src, dst, copy_function=os.link)


def rewrite(path: Path, data: bytes) -> None:
    """New content under the name, leaving the linked original alone."""
    path.unlink()
    path.write_bytes(data)


def images(folder: Path, rows: list[dict] | None, n: int = 3, raw_meta: bytes | None = None) -> Path:
    """A user image folder: n small PNGs, and a metadata.jsonl of the given rows (or bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"{i}.png")
    if raw_meta is not None:
        (folder / "metadata.jsonl").write_bytes(raw_meta)
    elif rows is not None:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def good_rows(n: int = 3) -> list[dict]:
    return [{"file_name": f"{i}.png", "text": f"a flower number {i}"} for i in range(n)]


def escaping(root: Path, name: str) -> list[str]:
    folder = images(root / "user", [*good_rows(), {"file_name": name, "text": "a stolen file"}])
    return ["data", "--path", str(folder)]


def symlinked_out(root: Path) -> list[str]:
    secret = root / "elsewhere"
    secret.mkdir()
    Image.new("RGB", (40, 40)).save(secret / "secret.png")
    folder = images(root / "user", [*good_rows(), {"file_name": "link.png", "text": "a linked file"}])
    (folder / "link.png").symlink_to(secret / "secret.png")
    return ["data", "--path", str(folder)]


def no_usable_images(root: Path) -> list[str]:
    folder = root / "user"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG not an image")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good_rows()))
    return ["data", "--path", str(folder)]


def oxford(root: Path, setid: bytes | None, labels: bytes | None = b"garbage") -> list[str]:
    folder = root / "oxford"
    (folder / "jpg").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(folder / "jpg" / "image_00001.jpg")
    if labels is not None:
        (folder / "imagelabels.mat").write_bytes(labels)
    if setid is not None:
        (folder / "setid.mat").write_bytes(setid)
    return ["data", "--source", "oxford102", "--path", str(folder)]


def broken_copy(root: Path, damage) -> Path:
    model = root / "broken"
    link_copy(root / "outputs" / "export", model)
    damage(model)
    return model


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 3])


def gen(*extra: str):
    return lambda root: ["generate", "a red flower", *extra]


def generate_with(model_fn, *extra: str):
    return lambda root: ["generate", "a red flower", "--model", str(model_fn(root)), *extra]


def unfinished(root: Path) -> Path:
    tmp = root / "outputs" / ".export.999999.abcd.tmp"
    link_copy(root / "outputs" / "export", tmp)
    return tmp


def file_at(root: Path, name: str = "a-file") -> Path:
    (root / name).write_text("not a folder")
    return root / name


def file_bytes(root: Path, data: bytes) -> Path:
    (root / "prompts.txt").write_bytes(data)
    return root / "prompts.txt"


def params_file(root: Path, text: str) -> list[str]:
    (root / "p.yaml").write_text(text)
    return ["--params", str(root / "p.yaml"), "data"]


def no_outputs(*args: str):
    return lambda root: ["--set", f"outputs={root / 'empty-outputs'}", *args]


FOLDER = ["--set", "data.source=folder", "--set", "data.path=u"]  # evaluate reads outputs/data whatever the source


def cache_damaged(damage):
    """`blossom train` on the made cache after `damage(cache folder)`."""

    def setup(root: Path) -> list[str]:
        damage(root / "outputs" / "cache")
        return ["train"]

    return setup


def swap_bytes(path: Path, old: bytes, new: bytes) -> None:
    """The same bytes with one run replaced by another of equal length (sizes still match the index)."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    rewrite(path, data.replace(old, new, 1))


def classifier_of(root: Path, **info) -> list[str]:
    """A classifier folder whose saved description differs from what the model needs."""
    from blossom.classifier import FORMAT, HEADS

    folder = root / "outputs" / "classifier"
    folder.mkdir(parents=True)
    (folder / "classifier.json").write_text(json.dumps({"format": FORMAT, "image_size": 32, "heads": HEADS, **info}))
    return ["evaluate"]


def fake_checkpoint(root: Path) -> list[str]:
    step = root / "outputs" / "train" / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (step.parent / "latest").write_text("step-000004\n")
    return ["train", "--resume", "latest"]


def fake_student(root: Path, lcm: bool = True) -> Path:
    """The trained model's folder marked as a distilled student (enough for the refusals), with
    the LCM scheduler a student has, or (lcm False) still its teacher's."""
    folder = root / "student"
    shutil.copytree(root / "outputs" / "train" / "model", folder)
    info = json.loads((folder / "blossom.json").read_text())
    info["distilled"] = {"sampler": "lcm", "default_steps": 4, "max_steps": 8, "guidance_embedding_dim": 8}
    rewrite(folder / "blossom.json", json.dumps(info).encode())
    if lcm:
        path = folder / "scheduler" / "scheduler_config.json"
        rewrite(path, json.dumps({**json.loads(path.read_text()), "_class_name": "LCMScheduler"}).encode())
    return folder


def broken_config(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return str(folder)


def distill_tiny(decoder):
    return lambda root: [
        "--set",
        f"distill.tiny_decoder={decoder(root)}",
        "distill",
        "--teacher",
        "outputs/train/model",
        "--no-register",
    ]


S = lambda *a: lambda root: list(a)  # noqa: E731 - a case that needs no setup

# (id, setup -> argv, exit status, words the one error line must contain)
CASES = [
    # configuration
    ("unknown preset", S("--preset", "gigantic", "data"), 2, "unknown preset 'gigantic'"),
    ("negative steps", S("--set", "train.steps=-3", "train"), 2, "'train.steps' must be positive"),
    ("lr not a number", S("--set", "train.lr=fast", "train"), 2, "'train.lr' must be float"),
    ("lr nan", S("--set", "train.lr=nan", "train"), 2, "'train.lr' must be a finite number"),
    ("lr inf", S("--set", "train.lr=.inf", "train"), 2, "'train.lr' must be a finite number"),
    ("unknown timestep sampling", S("--set", "train.timesteps=cosine", "train"), 2, "train.timesteps must be one of"),
    (
        "logit_std zero",
        S("--set", "train.timesteps=logit_normal", "--set", "train.logit_std=0", "train"),
        2,
        "'train.logit_std' must be positive",
    ),
    (
        "guidance nan in params",
        S("--set", "sample.guidance=nan", "generate", "x"),
        2,
        "'sample.guidance' must be a finite",
    ),
    ("image size huge", S("--set", "data.image_size=100000", "data"), 2, "above its limit of 2048"),
    ("image size zero", S("--set", "data.image_size=0", "data"), 2, "'data.image_size' must be positive"),
    (
        "sample steps huge",
        S("--set", "sample.steps=5000", "generate", "x"),
        2,
        "'sample.steps' is 5000, above its limit",
    ),
    ("train size huge", S("--set", "data.train_size=1000000000", "data"), 2, "above its limit"),
    ("images per prompt huge", S("--set", "evaluate.images_per_pair=100000", "evaluate"), 2, "above its limit"),
    ("max tokens zero", S("--set", "text.max_tokens=0", "cache"), 2, "'text.max_tokens' must be positive"),
    ("malformed list", S("--set", "unet.block_out_channels=[1,2", "train"), 2, "not valid YAML"),
    ("override without =", S("--set", "train.steps", "train"), 2, "write it as key=value"),
    ("unknown key", S("--set", "train.stepz=3", "train"), 2, "unknown config key 'train.stepz'"),
    ("unknown section", S("--set", "trian.steps=3", "train"), 2, "unknown config key 'trian'"),
    ("section set to scalar", S("--set", "train=5", "train"), 2, "must be a section"),
    ("list where int", S("--set", "train.steps=[1,2]", "train"), 2, "'train.steps' must be int"),
    ("bool where int", S("--set", "train.steps=true", "train"), 2, "'train.steps' must be int"),
    ("unknown source", S("--set", "data.source=ftp", "data"), 2, "data.source must be"),
    ("folder source without path", S("--set", "data.source=folder", "data"), 2, "data.path is empty"),
    ("unknown resize", S("--set", "data.resize=stretch", "data"), 2, "data.resize must be one of"),
    ("unknown caption backend", S("--set", "caption.backend=gpt", "caption"), 2, "caption.backend must be"),
    ("unknown prediction type", S("--set", "train.prediction_type=x0", "train"), 2, "train.prediction_type must be"),
    ("cfg dropout 1.5", S("--set", "train.cfg_dropout=1.5", "train"), 2, "train.cfg_dropout must be in [0, 1)"),
    ("background dropout 1", S("--set", "data.background_dropout=1", "data"), 2, "data.background_dropout must be in"),
    ("colour shuffle above 1", S("--set", "vae.color_shuffle=1.5", "train-vae"), 2, "vae.color_shuffle must be in"),
    ("ema decay 1", S("--set", "train.ema_decay=1", "train"), 2, "train.ema_decay must be in [0, 1)"),
    ("fp8", S("--set", "train.mixed_precision=fp8", "train"), 2, "train.mixed_precision must be"),
    ("int8 cache", S("--set", "cache.precision=int8", "cache"), 2, "cache.precision must be one of 'auto'"),
    ("unknown sample order", S("--set", "train.order=sorted", "train"), 2, "train.order must be one of 'random' or"),
    (
        "unknown sampler in params",
        S("--set", "sample.sampler=lcm", "generate", "x"),
        2,
        "sample.sampler must be one of",
    ),
    ("zero lanes", S("--set", "train.lanes=0", "train"), 2, "'train.lanes' must be positive"),
    ("negative workers", S("--set", "data.workers=-1", "data"), 2, "data.workers must be 0 (one per core)"),
    ("workers huge", S("--set", "data.workers=100000", "data"), 2, "'data.workers' is 100000, above its limit of 512"),
    ("lanes over the shards", S("--set", "train.order=shards", "train"), 2, "set train.lanes to 1 or less"),
    ("cache url not on S3", S("--set", "train.cache_url=/tmp/c", "--set", "train.order=shards", "train"), 2, "s3://"),
    ("streaming in random order", S("--set", "train.cache_url=s3://b/c", "train"), 2, "set train.order to shards"),
    ("push-cache with nowhere to go", S("push-cache"), 2, "pass --to URL or set train.cache_url"),
    ("push-cache to a folder", S("push-cache", "--to", "/tmp/somewhere"), 2, "s3://bucket/prefix"),
    ("levels disagree", S("--set", "unet.down_block_types=[DownBlock2D]", "train"), 2, "one entry per level"),
    ("size not divisible", S("--set", "data.image_size=30", "data"), 2, "multiples of the VAE's downsampling"),
    ("repo id escapes", S("--set", "publish.repo_id=../../x", "publish"), 2, "is not a Hub repo id"),
    ("repo id absolute", S("--set", "publish.repo_id=/etc/x", "publish"), 2, "is not a Hub repo id"),
    ("repo id dotdot name", S("--set", "publish.repo_id=me/..", "publish"), 2, "is not a Hub repo id"),
    ("seed negative", S("--set", "sample.seed=-1", "generate", "x"), 2, "'sample.seed' must be from 0"),
    ("seed too big", S("--set", "train.seed=99999999999", "train"), 2, "'train.seed' must be from 0"),
    ("password in url", S("--set", "remote.url=s3://key:secret@bucket/x", "push-data"), 2, "holds a password"),
    ("missing params file", S("--params", "no-such.yaml", "data"), 2, "not found"),
    ("params not yaml", lambda root: params_file(root, "data: [unclosed\n"), 2, "is not valid YAML"),
    ("params a list", lambda root: params_file(root, "- 1\n- 2\n"), 2, "must be a mapping of sections"),
    # the command line itself
    ("no command", S(), 2, "the following arguments are required"),
    ("unknown command", S("trian"), 2, "invalid choice: 'trian'"),
    ("generate without prompt", S("generate"), 2, "the prompt is empty"),
    ("n not a number", S("generate", "x", "--n", "abc"), 2, "invalid int value: 'abc'"),
    ("steps a fraction", S("generate", "x", "--steps", "1.5"), 2, "invalid int value: '1.5'"),
    ("seed an expression", S("generate", "x", "--seed", "2**70"), 2, "invalid int value"),
    ("unknown backend", S("generate", "x", "--backend", "tf"), 2, "invalid choice: 'tf'"),
    ("unknown data source flag", S("data", "--source", "ftp"), 2, "invalid choice: 'ftp'"),
    ("port not a number", S("app", "--port", "abc"), 2, "invalid int value"),
    ("unknown option", S("train", "--resum", "latest"), 2, "unrecognized arguments"),
    # data: the user's folder is only read; a failed import keeps the previous data set
    ("data path missing", lambda root: ["data", "--path", str(root / "nope")], 2, "is not a folder"),
    ("data path a file", lambda root: ["data", "--path", str(file_at(root))], 2, "is not a folder"),
    (
        "data folder without images or metadata",
        lambda root: ["data", "--path", str(images(root / "u", None, n=0))],
        2,
        "metadata.jsonl not found",
    ),
    ("data no usable image keeps previous set", no_usable_images, 2, "the previous data set is kept"),
    (
        "data only unreadable metadata",
        lambda root: ["data", "--path", str(images(root / "u", None, raw_meta=b"{oops\n[1]\n"))],
        2,
        "has no captioned images",
    ),
    ("data file name escapes with ..", lambda root: escaping(root, "../../etc/passwd"), 2, "leads outside"),
    ("data file name absolute", lambda root: escaping(root, "/etc/shadow"), 2, "must be a relative path"),
    ("data file name not a string", lambda root: escaping(root, 7), 2, "must be a relative path"),
    ("data symlink out of the folder", symlinked_out, 2, "leads outside"),
    ("oxford without jpg", lambda root: ["data", "--source", "oxford102", "--path", str(root)], 2, "jpg not found"),
    ("oxford garbage labels", lambda root: oxford(root, setid=None), 2, "is not the Oxford 102 imagelabels.mat"),
    ("oxford missing labels", lambda root: oxford(root, setid=None, labels=None), 2, "imagelabels.mat not found"),
    # caption
    ("caption without folder", S("caption"), 2, "no folder to caption"),
    ("caption missing folder", lambda root: ["caption", str(root / "nope")], 2, "is not a folder"),
    (
        "caption template without slot",
        lambda root: [
            "--set",
            "caption.template=a flower",
            "caption",
            str(images(root / "u", [{"file_name": "0.png", "label": "x"}])),
        ],
        2,
        "has no {label}",
    ),
    (
        "caption model missing",
        lambda root: [
            "--set",
            "caption.backend=florence2",
            "--set",
            f"caption.model={root / 'no-model'}",
            "caption",
            str(images(root / "u", [{"file_name": "0.png"}])),
        ],
        2,
        "set caption.model to a local folder",
    ),
    (
        "caption escaping row",
        lambda root: ["caption", str(images(root / "u", [{"file_name": "../x.png"}]))],
        2,
        "leads outside",
    ),
    (
        "caption into its own folder",
        lambda root: [
            "--set",
            f"outputs={root / 'u' / 'out'}",
            "caption",
            str(images(root / "u", [{"file_name": "0.png", "label": "x"}])),
        ],
        2,
        "blossom never writes there",
    ),
    # stages run out of order
    ("cache without a VAE", no_outputs("cache"), 2, "run `blossom train-vae`"),
    ("train without cache", no_outputs("train"), 2, "blossom cache"),
    (
        "train on an old-format cache",
        cache_damaged(lambda c: rewrite(c / "index.json", b'{"splits": {}}')),
        2,
        "format 1",
    ),
    (
        "train on a truncated cache shard",
        cache_damaged(lambda c: truncate(c / "train-00000.safetensors")),
        2,
        "truncated",
    ),
    ("train on a missing text shard", cache_damaged(lambda c: (c / "text-00000.safetensors").unlink()), 2, "missing"),
    (
        "train on a shard of another encoder",
        cache_damaged(lambda c: swap_bytes(c / "val-00000.safetensors", b'"max_tokens":"16"', b'"max_tokens":"77"')),
        2,
        "max_tokens=77",
    ),
    ("resume without checkpoints", no_outputs("train", "--resume", "latest"), 2, "no checkpoint in"),
    (
        "resume from a missing folder",
        lambda root: ["train", "--resume", str(root / "nope")],
        2,
        "not a complete checkpoint",
    ),
    ("resume from a damaged checkpoint", fake_checkpoint, 2, "no intact checkpoint"),
    ("evaluate without model", no_outputs("evaluate"), 2, "no model at"),
    ("evaluate without a classifier", S("evaluate"), 2, "run `blossom classifier` first"),
    ("evaluate a model of another size", S("--set", "data.image_size=48", "evaluate"), 2, "the model draws 32 px"),
    ("evaluate with another size's classifier", lambda root: classifier_of(root, image_size=64), 2, "reads 64 px"),
    (
        "evaluate with another vocabulary's classifier",
        lambda root: classifier_of(root, heads={"petal_color": ["red"]}),
        2,
        "other attribute values",
    ),
    (
        "FID weights not a file",
        S("--set", "data.source=folder", "--set", "data.path=u", "--set", "evaluate.inception=nope.pth", "evaluate"),
        2,
        "evaluate.inception nope.pth is not a file",
    ),
    (
        "FID weights not weights",
        lambda root: [*FOLDER, "--set", f"evaluate.inception={file_at(root)}", "evaluate"],
        2,
        "is not readable weights",
    ),
    (
        "CLIP folder not CLIP",
        lambda root: [*FOLDER, "--set", f"evaluate.clip={root}", "evaluate"],
        2,
        "is not a CLIP model folder",
    ),
    ("export missing model", lambda root: ["export", "--model", str(root / "nope")], 2, "no model at"),
    ("export a file", lambda root: ["export", "--model", str(file_at(root))], 2, "no model at"),
    (
        "export an unfinished temp folder",
        lambda root: ["export", "--model", str(unfinished(root))],
        2,
        "never finished",
    ),
    ("publish without export", no_outputs("publish"), 2, "export"),
    ("push-data outside a DVC project", S("push-data"), 2, "is not a DVC project"),
    ("pull-data outside a DVC project", S("pull-data"), 2, "is not a DVC project"),
    ("push-data to ftp", S("--set", "remote.url=ftp://host/x", "push-data"), 2, "use a local folder or s3://"),
    # generate: refused before any model loads or any image is made
    ("empty prompt", S("generate", "   "), 2, "the prompt is empty"),
    ("prompt too long", S("generate", "petal " * 1000), 2, "above the limit of 2000"),
    ("n zero", gen("--n", "0"), 2, "--n times the number of prompts must be from 1 to"),
    ("n huge", gen("--n", "100000"), 2, "must be from 1 to 10000 images per call"),
    ("n times prompts huge", S("generate", "a", "b", "c", "--n", "4000"), 2, "got 4000 x 3"),
    ("one of several prompts empty", S("generate", "a red flower", " "), 2, "the prompt is empty"),
    (
        "prompts file missing",
        lambda root: ["generate", "--prompts", str(root / "nope.txt")],
        2,
        "cannot read it as UTF-8 text (FileNotFoundError)",
    ),
    (
        "prompts file not text",
        lambda root: ["generate", "--prompts", str(file_bytes(root, b"\xff\xfe\x00junk"))],
        2,
        "cannot read it as UTF-8 text (UnicodeDecodeError)",
    ),
    (
        "prompts file empty",
        lambda root: ["generate", "--prompts", str(file_bytes(root, b"\n  \n"))],
        2,
        "the prompt is empty",
    ),
    ("steps zero", gen("--steps", "0"), 2, "got 0: try --steps 15"),
    ("steps huge", gen("--steps", "100000"), 2, "steps must be a positive number up to 1000"),
    ("fast steps zero", gen("--fast", "--steps", "0"), 2, "got 0: try --steps 4"),
    ("guidance nan", gen("--guidance", "nan"), 2, "guidance must be a number from 0 to 50"),
    ("guidance inf", gen("--guidance", "inf"), 2, "guidance must be a number from 0 to 50"),
    ("guidance negative", gen("--guidance", "-1"), 2, "guidance must be a number from 0 to 50"),
    ("generate seed negative", gen("--seed", "-1"), 2, "seed must be from 0"),
    ("seed past 64 bits", gen("--seed", str(2**70)), 2, "seed must be from 0"),
    ("seed plus n overflows", gen("--seed", str(2**32 - 2), "--n", "4"), 2, "image i uses seed + i"),
    ("unknown sampler", gen("--sampler", "heun"), 2, "unknown sampler 'heun'"),
    (
        "int8 on torch",
        gen("--backend", "torch", "--precision", "int8"),
        2,
        "the torch backend runs fp32 or bf16, not 'int8'",
    ),
    ("fp16 precision", gen("--backend", "onnx", "--precision", "fp16"), 2, "invalid choice: 'fp16'"),
    ("bf16 on onnx", gen("--backend", "onnx", "--precision", "bf16"), 2, "the onnx backend runs fp32 or int8"),
    ("out is a file", lambda root: ["generate", "x", "--out", str(file_at(root))], 2, "is a file: pass a folder"),
    ("out under a file", lambda root: ["generate", "x", "--out", str(file_at(root) / "sub")], 2, "which is a file"),
    ("out read-only", gen("--out", "/proc/blossom-out"), 2, "is not writable"),
    ("model missing", gen("--model", "/nonexistent/model"), 2, "no model at"),
    ("model unfinished temp folder", generate_with(unfinished), 2, "never finished"),
    (
        "int8 missing",
        generate_with(
            lambda root: broken_copy(root, lambda m: [p.unlink() for p in (m / "onnx").glob("*.int8.onnx*")]),
            "--backend",
            "onnx",
            "--precision",
            "int8",
        ),
        2,
        "missing onnx/unet.int8.onnx",
    ),
    (
        "truncated unet weights",
        generate_with(
            lambda root: broken_copy(root, lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors")),
            "--backend",
            "torch",
        ),
        2,
        "its files are damaged",
    ),
    (
        "damaged model json",
        generate_with(lambda root: broken_copy(root, lambda m: rewrite(m / "blossom.json", b"{"))),
        2,
        "its files are damaged",
    ),
    (
        "broken onnx graph",
        generate_with(
            lambda root: broken_copy(root, lambda m: rewrite(m / "onnx" / "unet.opt.onnx", b"junk")),
            "--backend",
            "onnx",
        ),
        2,
        "cannot load the ONNX model",
    ),
    # distill and the fast path
    (
        "distill guidance range upside down",
        S("--set", "distill.guidance_min=9", "distill"),
        2,
        "distill.guidance_min and guidance_max",
    ),
    (
        "distill solver grid",
        S("--set", "distill.solver_steps=7", "distill"),
        2,
        "must divide train.num_train_timesteps",
    ),
    ("distill default past max", S("--set", "distill.default_steps=9", "distill"), 2, "distill.default_steps <="),
    (
        "distill pruning not a yes or no",
        S("--set", "distill.prune_lowest_level=maybe", "distill"),
        2,
        "config key 'distill.prune_lowest_level' must be bool",
    ),
    ("distill without a champion", S("distill", "--no-register"), 2, "no trained model at"),
    ("distill a student", lambda root: ["distill", "--teacher", str(fake_student(root))], 2, "already a distilled"),
    ("distill tiny decoder missing", distill_tiny(lambda root: "nowhere"), 2, "nowhere has no config.json"),
    (
        "distill tiny decoder a full VAE",
        distill_tiny(lambda root: "outputs/train/model/vae"),
        2,
        "is an AutoencoderKL folder, not an AutoencoderTiny",
    ),
    (
        "distill tiny decoder config not JSON",
        distill_tiny(lambda root: broken_config(root / "taesd")),
        2,
        "config.json is not a JSON object",
    ),
    (
        "distill tiny decoder other latents",
        distill_tiny(lambda root: tiny_decoder(root, latent_channels=3)),
        2,
        "decodes 3-channel latents at 4 pixels each",
    ),
    (
        "distill tiny decoder other scale",
        distill_tiny(lambda root: tiny_decoder(root, latent_channels=4, downsampling=8)),
        2,
        "at 8 pixels each, the teacher's VAE makes 4-channel latents at 4",
    ),
    (
        "pretrained vae a tiny decoder",
        lambda root: ["--set", f"vae.pretrained={tiny_decoder(root, latent_channels=4)}", "cache"],
        2,
        "holds an AutoencoderTiny, a decoder-side stand-in",
    ),
    ("fast without a student", S("generate", "x", "--fast"), 2, "holds no distilled model"),
    ("lcm sampler on a teacher", S("generate", "x", "--sampler", "lcm"), 2, "draws with distilled models only"),
    ("tcd sampler on a teacher", S("generate", "x", "--sampler", "tcd"), 2, "draws with distilled models only"),
    (
        "teacher sampler on a student",
        lambda root: ["generate", "x", "--model", str(fake_student(root)), "--sampler", "ddim"],
        2,
        "is a distilled few-step model",
    ),
    (
        "student with a teacher's scheduler",
        lambda root: ["generate", "x", "--model", str(fake_student(root, lcm=False))],
        2,
        "but a DDPMScheduler scheduler",
    ),
    ("export fast model not a student", S("export", "--fast-model", "nowhere"), 2, "is not a distilled model"),
    # app
    ("port out of range", S("app", "--port", "99999"), 2, "--port must be from 1 to 65535"),
    ("port zero", S("app", "--port", "0"), 2, "--port must be from 1 to 65535"),
    # sagemaker
    ("sagemaker without role", S("sagemaker"), 2, "sagemaker"),
]


@pytest.fixture(scope="session")
def made(micro_exported, micro_prepared, tmp_path_factory):
    """A finished project's outputs (data set, trained model, export), made once and copied per case."""
    model, export, _ = micro_exported
    _, paths = micro_prepared
    base = tmp_path_factory.mktemp("made")
    shutil.copytree(paths.data, base / "outputs" / "data")
    for name in ("vae", "cache"):
        shutil.copytree(getattr(paths, name), base / "outputs" / name)
    shutil.copytree(model, base / "outputs" / "train" / "model")
    shutil.copytree(export, base / "outputs" / "export")
    return base


def test_the_battery_is_big_enough():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("setup, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(setup, code, words, made, tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    link_copy(made, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("BLOSSOM_OUTPUTS", raising=False)
    argv = setup(root)
    before = tree(root)
    if "--params" not in argv:
        argv = [*micro_args(root / "outputs"), *argv]
    with pytest.raises(SystemExit) if _usage(argv) else _nothing() as raised:
        status = main(argv)
    if raised is not None:
        status = raised.value.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("blossom: error:")]
    assert status == code, err[-2000:]
    assert len(errors) == 1 and words in errors[0], err[-2000:]
    assert "Traceback" not in err
    after = tree(root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"changed or removed: {changed[:5]}"


def _usage(argv: list[str]) -> bool:
    """argparse itself stops these (SystemExit), before blossom's main returns."""
    import contextlib
    import io

    from blossom.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit:
        return True
    return False


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_failed_import_keeps_the_previous_data_set(made, tmp_path, monkeypatch):
    root = tmp_path / "project"
    link_copy(made, root)
    before = tree(root / "outputs" / "data")
    argv = [*micro_args(root / "outputs"), *no_usable_images(root)]
    assert main(argv) == 2
    assert tree(root / "outputs" / "data") == before
    assert not [p for p in (root / "outputs").iterdir() if p.name.endswith(".tmp")]


def test_a_user_folder_is_never_written(tmp_path, monkeypatch):
    """Captions are made for uncaptioned images, into blossom's outputs; the user's files, odd
    lines, non-UTF-8 text and permissions included, are left byte for byte."""
    folder = images(
        tmp_path / "user",
        None,
        n=4,
        raw_meta=(
            b'{"file_name": "0.png", "text": "caf\xe9 flower"}\n'  # Windows-1252, not UTF-8
            b'not json at all\n{"text": "a row without a file"}\n{"file_name": "1.png", "label": "rose"}\n'
        ),
    )
    os.chmod(folder / "metadata.jsonl", 0o644)
    (folder / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(folder / "sub" / "2.png")
    before = tree(folder)
    out = tmp_path / "outputs"
    argv = micro_args(out)
    assert main([*argv, "caption", str(folder)]) == 0
    assert main([*argv, "data", "--path", str(folder)]) == 0
    assert tree(folder) == before
    texts = sorted(
        json.loads(line)["text"]
        for s in ("train", "val")
        for line in (out / "data" / s / "metadata.jsonl").read_text().splitlines()
    )
    assert texts == ["a photo of a rose", "a photo of a sub", "café flower"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", [["data"], ["cache"], ["export", "--model", "outputs/train/model"], ["publish"]], ids=lambda s: s[0]
)
def test_kill_9_at_random_points_then_a_plain_rerun_recovers(stage, made, micro_prepared, tmp_path):
    """SIGKILL lands at random moments of the stage; the previous result is still there after each
    kill, and a plain rerun succeeds and leaves no temp folder behind."""
    import random
    import signal
    import subprocess
    import sys
    import time

    _, paths = micro_prepared
    root = tmp_path / "project"
    shutil.copytree(made, root)
    cmd = [
        sys.executable,
        "-m",
        "blossom.cli",
        *micro_args(root / "outputs"),
        *stage,
    ]
    run = lambda: subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)  # noqa: E731
    start = time.monotonic()
    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    took = time.monotonic() - start
    result = {"data": "data", "cache": "cache", "export": "export", "publish": "hub"}[stage[0]]
    rng = random.Random(stage[0])
    for fraction in sorted(rng.uniform(0.4, 0.95) for _ in range(2)):
        proc = subprocess.Popen(
            cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(took * fraction)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert (root / "outputs" / result).is_dir()  # the swap is atomic: the previous result is never gone
    again = run()
    assert again.returncode == 0, again.stderr[-2000:]
    left = [str(p.relative_to(root)) for p in (root / "outputs").rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


@pytest.mark.slow
def test_sigterm_to_the_app_stops_its_server_too(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = subprocess.Popen(
        [sys.executable, "-m", "blossom.cli", "--set", f"outputs={tmp_path}", "app", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    else:
        app.kill()
        pytest.fail("the app did not start serving in 60 s")
    children = psutil.Process(app.pid).children(recursive=True)
    assert children
    app.send_signal(signal.SIGTERM)
    assert app.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

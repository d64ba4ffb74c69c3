"""`blossom <stage>`: one sub-command per pipeline stage, and `run` to chain them.

Stages read and write fixed folders under `outputs/` (see `Paths`), so each can be re-run alone
and DVC can track them. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blossom.config import Config, DataConfig, choices, load_config, save_config
from blossom.env import launch_env
from blossom.errors import BlossomError, ConfigError, first_line
from blossom.stages import STAGES

log = logging.getLogger("blossom")


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def model(self) -> Path:
        return self.root / "train" / "model"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def champion(self) -> Path:
        return self.root / "champion"

    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def served_model(self) -> Path:
        """What generate serves by default: the exported champion, else the last trained model."""
        return self.export if self.export.is_dir() else self.model


def vae_dir(cfg: Config, paths: Paths) -> Path:
    from blossom.models import model_path

    return Path(model_path(cfg.vae.pretrained, "vae.pretrained")) if cfg.vae.pretrained else paths.vae


def cmd_data(cfg: Config, paths: Paths, args) -> None:
    from blossom.data.sources import make_dataset

    if args.source:
        cfg.data.source = args.source
    if args.path:
        cfg.data.path = args.path
        cfg.data.source = args.source or "folder"
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise BlossomError(f"data source {cfg.data.source} needs a folder: pass --path DIR or set data.path")
    counts = make_dataset(cfg.data, paths.data, cfg.caption)
    save_config(cfg, paths.data / "config.yaml")
    extra = f" and {counts['test']} test" if counts.get("test") else ""
    print(f"data: {counts['train']} training, {counts['val']} validation{extra} images in {paths.data}")


def cmd_train_vae(cfg: Config, paths: Paths, args) -> None:
    from blossom.train.autoencoder import train_vae

    if cfg.vae.pretrained:
        save_config(cfg, paths.vae / "config.yaml")  # the stage's output names the VAE in use
        print(f"train-vae: skipped, using the pretrained VAE at {cfg.vae.pretrained}")
        return
    from blossom import report

    stats = train_vae(cfg, paths.data, paths.vae)
    save_config(cfg, paths.vae / "config.yaml")
    report.write_metrics(
        paths.root, "train-vae", {k: stats.get(k) for k in ("val_psnr_db", "scaling_factor", "params")}
    )
    print(f"train-vae: {stats['params'] / 1e6:.2f}M parameters, val PSNR {stats['val_psnr_db']} dB -> {paths.vae}")


def cmd_cache(cfg: Config, paths: Paths, args, rt=None) -> None:
    """rt: the distributed runtime to build with; by default this launch's (every process of a
    torchrun launch takes part). A caller that builds in one process of many passes Runtime()."""
    from blossom.cpu import pick_precision
    from blossom.data.cache import build_cache
    from blossom.models import check_cross_attention, load_text_encoder, load_vae
    from blossom.train import distributed

    encoder = load_text_encoder(cfg.text)
    check_cross_attention(cfg, encoder.dim)  # before any encoding: the mismatch is a config error, not a training one
    rt = rt or distributed.connect(launch_env())  # under torchrun each process encodes its share of the shards
    vae = load_vae(vae_dir(cfg, paths)).to(rt.device)
    encoder.model.to(rt.device)
    precision, why = pick_precision(cfg.cache.precision, rt.device)
    info = build_cache(
        paths.data,
        paths.cache,
        vae,
        encoder,
        cfg.data.image_size,
        cfg.text.encoder,
        cfg.data.random_flip,
        rt,
        precision=precision,
    )
    if rt.main:
        save_config(cfg, paths.cache / "config.yaml")
        print(
            f"cache: {info['splits']['train']['count']} training latents {tuple(info['latent_shape'])}, "
            f"{info['bytes_per_sample'] / 1024:.1f} KiB per sample, encoded in {precision} ({why}) -> {paths.cache}"
        )
    rt.stop()


def cmd_push_cache(cfg: Config, paths: Paths, args) -> None:
    from blossom.config import redact
    from blossom.data.stream import push_cache, s3_filesystem

    url = args.to or cfg.train.cache_url
    if not url or not url.startswith("s3://"):
        raise ConfigError("push-cache needs an s3://bucket/prefix: pass --to URL or set train.cache_url")
    index = push_cache(paths.cache, url, s3_filesystem(cfg.remote.endpoint, cfg.remote.region))
    n = sum(index["splits"][s]["count"] for s in index["splits"])
    shards = sum(len(index["splits"][s]["shards"]) for s in index["splits"])
    print(f"push-cache: {n} samples in {shards} shards -> {redact(url)}")


def cmd_train(cfg: Config, paths: Paths, args) -> dict:
    from blossom import report
    from blossom.config import with_launcher
    from blossom.train.diffusion import train_diffusion

    launch = launch_env()
    cfg = with_launcher(cfg, launch)
    result = train_diffusion(
        cfg, paths.cache, vae_dir(cfg, paths), paths.train, args.resume, launch, track=cfg.tracking.live
    )
    if launch.rank == 0:
        report.training(paths.root, paths.train, result)
        print(f"train: {result['steps']} steps, val loss {result['val_loss']:.5f} -> {paths.model}")
    return result


def cmd_caption(cfg: Config, paths: Paths, args) -> dict:
    from transformers import AutoTokenizer

    from blossom.data.captions import caption_folder, captions_file
    from blossom.models import count_tokens, text_encoder_path

    folder = args.folder or cfg.data.path
    if not folder:
        raise BlossomError("no folder to caption: pass one, e.g. blossom caption my_images/, or set data.path")
    out = captions_file(paths.root / "captions", Path(folder))
    tokenizer = AutoTokenizer.from_pretrained(text_encoder_path(cfg.text.encoder))
    counts = caption_folder(
        Path(folder), cfg.caption, lambda t: count_tokens(tokenizer, t), cfg.text.max_tokens, out=out
    )
    print(
        f"caption: {counts['captioned']} captioned ({cfg.caption.backend}), {counts['kept']} already had one, "
        f"{counts['failed']} failed, {counts['too_long']} longer than {cfg.text.max_tokens} tokens -> {out} "
        f"({folder} is left as it was; `blossom data --path {folder}` uses these captions)"
    )
    return counts


def cmd_push_data(cfg: Config, paths: Paths, args) -> None:
    from blossom.config import redact
    from blossom.datastore import push_data
    from blossom.fsutil import write_json

    sent = push_data(cfg.remote, Path.cwd())
    # A small receipt as the DVC stage's output: where the data went, never with credentials.
    write_json(paths.root / "push.json", {"remote": redact(cfg.remote.url), "endpoint": cfg.remote.endpoint})
    print(f"push-data: {sent} file(s) sent to {redact(cfg.remote.url)}")


def cmd_pull_data(cfg: Config, paths: Paths, args) -> None:
    from blossom.config import redact
    from blossom.datastore import pull_data

    fetched = pull_data(cfg.remote, Path.cwd())
    print(f"pull-data: {fetched} file(s) fetched from {redact(cfg.remote.url)} -> {paths.data}")


def cmd_classifier(cfg: Config, paths: Paths, args) -> None:
    from blossom.classifier import provide_classifier

    ceiling, source = provide_classifier(cfg, paths.classifier, retrain=getattr(args, "retrain", False))
    save_config(cfg, paths.classifier / "config.yaml")
    print(f"classifier ({source}): accuracy on fresh random procedural flowers {ceiling} -> {paths.classifier}")


def _classifier_unless_current(cfg: Config, paths: Paths, args) -> None:
    """`blossom run` trains the classifier once and reuses it while its settings stay the same."""
    from blossom.classifier import judge_settings, load_classifier

    saved = paths.classifier / "config.yaml"
    try:
        load_classifier(paths.classifier, cfg.data.image_size)
        same = saved.exists() and judge_settings(load_config(saved)) == judge_settings(cfg)
    except BlossomError:
        same = False
    if same:
        print(f"classifier: reusing {paths.classifier}")
    else:
        cmd_classifier(cfg, paths, args)


def cmd_evaluate(cfg: Config, paths: Paths, args) -> dict:
    import json

    from blossom import report
    from blossom.backends import TorchBackend
    from blossom.evaluate import evaluate, format_table

    train_info_path = paths.model / "train.json"
    train_info = json.loads(train_info_path.read_text()) if train_info_path.exists() else None
    metrics = evaluate(cfg, TorchBackend(paths.model), paths.classifier, paths.eval, train_info, data_dir=paths.data)
    save_config(cfg, paths.eval / "config.yaml")
    report.evaluation(paths.root, metrics)
    print(f"adherence -> {paths.eval / 'metrics.json'}, samples -> {paths.eval / 'samples.png'}")
    print(format_table(metrics))
    return metrics


def cmd_promote(cfg: Config, paths: Paths, args) -> dict:
    """Log the trained model to MLflow, then make it the champion only if its val loss is better."""
    from blossom.tracking import log_training_run, promote

    candidate = log_training_run(cfg, paths.train, paths.eval)
    result = promote(cfg, candidate, paths.champion)
    verdict = "promoted to champion" if result["promoted"] else f"kept champion version {result['version']}"
    print(
        f"promote: version {candidate['version']} (val loss {candidate['val_loss']:.5f}) {verdict} -> {paths.champion}"
    )
    return result


# The most a distilled student's default-step colour and background adherence may fall below the
# teacher's default before it is refused the `fast` alias.
FAST_BAR = 0.02
SKIPPED = "SKIPPED.txt"
FAST_ATTRIBUTES = ("petal_color", "background")


def fast_verdict(student: dict, teacher: dict | None) -> tuple[bool, str]:
    """Whether the student's adherence at its default steps holds the bar against the teacher's."""
    if teacher is None or "adherence" not in teacher:
        return False, "no teacher adherence to compare with (procedural data only)"
    s, t = student["adherence"]["all"]["all"], teacher["adherence"]["all"]["all"]
    gaps = {k: t[k]["acc"] - s[k]["acc"] for k in FAST_ATTRIBUTES}
    said = ", ".join(f"{k} {s[k]['acc']:.3f} vs {t[k]['acc']:.3f}" for k in FAST_ATTRIBUTES)
    return all(g <= FAST_BAR for g in gaps.values()), said


def cmd_distill(cfg: Config, paths: Paths, args) -> dict:
    """Distil the champion into a few-step student, score it at 1/2/4/8 steps, and register it
    in MLflow (alias `fast` only when it holds the adherence bar)."""
    import json

    from blossom import report
    from blossom.fsutil import write_json, write_text

    if args.if_enabled and not cfg.distill.enabled:
        # DVC needs the stage's outputs to exist, and warns of an empty one: placeholders that
        # export, generate and resuming pass over (a student distilled earlier by hand is left
        # alone; export checks whose student it is)
        for name in ("model", "eval", "checkpoints"):
            (paths.distill / name).mkdir(parents=True, exist_ok=True)
            if not any((paths.distill / name).iterdir()):
                write_text(paths.distill / name / SKIPPED, "distill.enabled is false: nothing distilled\n")
        report.write_metrics(paths.root, "distill", {"enabled": False})
        print("distill: skipped (set distill.enabled=true to distil the champion into a few-step model)")
        return {}
    from blossom.config import with_launcher
    from blossom.train.distill import distill  # after the skip: the skipped DVC stage needs no torch

    launch = launch_env()
    cfg = with_launcher(cfg, launch)
    teacher = Path(args.teacher) if args.teacher else paths.champion
    if launch.rank == 0:  # a skipped run's placeholder, beside the checkpoints this run writes
        (paths.distill / "checkpoints" / SKIPPED).unlink(missing_ok=True)
    result = distill(cfg, paths.cache, teacher, paths.distill, resume=args.resume, launch=launch)
    if launch.rank != 0:
        return result
    summary = {"enabled": True, "distill_loss": result["loss_history"][-1][1] if result["loss_history"] else None}
    if cfg.data.source == "synthetic":
        from blossom.backends import TorchBackend
        from blossom.evaluate import evaluate_fast

        backend = TorchBackend(paths.distill / "model")
        steps = sorted({1, 2, 4, 8, cfg.distill.default_steps} & set(range(1, cfg.distill.max_steps + 1)))
        metrics = evaluate_fast(cfg, backend, paths.classifier, paths.distill / "eval", steps)
        teacher_metrics = (
            json.loads((teacher / "metrics.json").read_text()) if (teacher / "metrics.json").exists() else None
        )
        default = metrics["steps"][str(cfg.distill.default_steps)]
        holds, said = fast_verdict(default, teacher_metrics)
        # the student carries its scores at its default steps, as a champion does (card, app, export)
        write_json(
            paths.distill / "model" / "metrics.json",
            {
                **default,
                "sampler": backend.distilled["sampler"],
                "steps": cfg.distill.default_steps,
                "guidance": cfg.sample.guidance,
            },
        )
        summary.update(
            holds_bar=holds, **{f"steps_{n}": m["adherence"]["all"]["all"] for n, m in metrics["steps"].items()}
        )
        print(
            f"distill: {cfg.distill.default_steps}-step student {said} (bar: within {FAST_BAR:.2f}): "
            + ("holds" if holds else "does not hold")
        )
    else:
        from blossom.fsutil import atomic_dir

        metrics, holds = None, False
        why = "adherence is scored on procedural flowers only, so a student of folder data gets no `fast` alias"
        with atomic_dir(paths.distill / "eval") as tmp:
            (tmp / SKIPPED).write_text(why + "\n")
        print(f"distill: {why}")
    if not args.no_register:
        from blossom.tracking import log_student

        champion = json.loads((teacher / "champion.json").read_text()) if (teacher / "champion.json").exists() else {}
        logged = log_student(cfg, paths.distill, metrics, holds, champion.get("run_id"))
        print(f"distill: MLflow version {logged['version']}" + (" is now `fast`" if holds else " (not aliased fast)"))
    report.write_metrics(paths.root, "distill", summary)
    print(f"distill: student -> {paths.distill / 'model'}")
    return result


def calibration_captions(folder: Path) -> list[str] | None:
    """Captions that int8 calibration samples: the first of an image folder's metadata.jsonl."""
    from blossom.data.folder import read_metadata
    from blossom.quantize import CALIBRATION_CAPTIONS

    if not (folder / "metadata.jsonl").exists():
        log.warning(
            "no captions at %s to calibrate int8 with: int8 graphs not written (pass --calibration FOLDER)", folder
        )
        return None
    return [r.text for r in read_metadata(folder)[:CALIBRATION_CAPTIONS]]


def cmd_export(cfg: Config, paths: Paths, args) -> dict:
    from blossom.export import export

    source = Path(args.model) if args.model else paths.champion
    fast = Path(args.fast_model) if getattr(args, "fast_model", None) else paths.distill / "model"
    if not (fast / "blossom.json").exists():
        if getattr(args, "fast_model", None):
            raise BlossomError(f"--fast-model {fast} is not a distilled model: pass the folder `blossom distill` wrote")
        fast = None  # nothing distilled (distill.enabled is false): the teacher alone
    elif not getattr(args, "fast_model", None) and (source / "champion.json").exists():
        import json

        teacher_run = json.loads((fast / "blossom.json").read_text()).get("distilled", {}).get("teacher_run")
        if teacher_run != json.loads((source / "champion.json").read_text())["run_id"]:
            log.warning("%s was distilled from another champion: exported without it (run `blossom distill`)", fast)
            fast = None
    calibration = calibration_captions(Path(args.calibration) if args.calibration else paths.data / "val")
    sampling = (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance)
    diffs = export(source, paths.export, calibration, sampling, fast_dir=fast)
    import json

    from blossom import report

    psnr = diffs.pop("image_int8_psnr_db", None)
    fast_psnr = diffs.pop("fast_image_int8_psnr_db", None)
    report.write_metrics(
        paths.root,
        "export",
        {"parity_max_abs_diff": max(diffs.values()), "int8_psnr_db": psnr, "fast_int8_psnr_db": fast_psnr},
    )
    int8 = "; no int8 (no calibration captions)"
    if psnr is not None:
        decided = json.loads((paths.export / "onnx" / "int8.json").read_text())
        fp32 = [] if decided.get("text_encoder_int8", True) else ["the text encoder"]
        fp32 += [decided["fp32_block"]] if decided["fp32_block"] else []
        kept = f", {' and '.join(fp32)} kept in fp32" if fp32 and decided["written"] else ""
        int8 = f"; int8 image vs fp32: {psnr:.1f} dB PSNR{kept}" + ("" if decided["written"] else " (not written)")
    print(
        f"export: diffusers pipeline + ONNX -> {paths.export}; ONNX vs PyTorch max abs diff: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + int8
    )
    return diffs


def cmd_publish(cfg: Config, paths: Paths, args) -> dict:
    from blossom.env import hub_access
    from blossom.fsutil import write_json
    from blossom.publish import publish

    hub = hub_access()
    result = publish(cfg.publish, paths.export, paths.root / "hub", hub.token, hub.offline, hub.endpoint)
    write_json(paths.root / "publish.json", result)
    if result["target"] == "hub":
        print(f"publish: uploaded to {result['repo_id']} ({result['url']}); local copy {result['path']}")
    else:
        print(
            f"publish: local folder {result['path']} ({result['reason']}; set publish.repo_id and HF_TOKEN for the Hub)"
        )
    return result


def cmd_app(cfg: Config, paths: Paths, args) -> None:
    """Serve the Streamlit page on this machine (127.0.0.1) until interrupted; SIGTERM and SIGINT
    reach the server too, so stopping blossom never leaves it serving."""
    import os
    import signal
    import subprocess

    if not 1 <= args.port <= 65535:
        raise BlossomError(f"--port must be from 1 to 65535, got {args.port}")
    env = {**os.environ, "BLOSSOM_OUTPUTS": str(paths.root)}
    if args.model:
        env["BLOSSOM_MODEL"] = args.model
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(Path(__file__).with_name("app_entry.py")),
        "--server.address",
        args.address,
        "--server.port",
        str(args.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]
    print(f"app: http://{args.address}:{args.port}", flush=True)
    server = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        server.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = server.wait()
    raise SystemExit(0 if code in (-signal.SIGTERM, -signal.SIGINT) else code)


MAX_IMAGES_PER_CALL, GENERATE_BATCH, MAX_PROMPT_CHARS = 10_000, 8, 2000


def writable_folder(out: Path, flag: str) -> None:
    """A one-line error now, not after the work, when `out` cannot become a folder we write into."""
    import os
    import tempfile

    if out.exists() and not out.is_dir():
        raise BlossomError(f"{flag} {out} is a file: pass a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BlossomError(f"{flag} {out} is under {probe}, which is a file: pass a folder")
    try:  # an unnamed file, gone when closed: root passes os.access() even on read-only mounts
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError
        tempfile.TemporaryFile(dir=probe).close()
    except OSError:
        raise BlossomError(f"{flag} {out} is not writable ({probe} is read-only here): pass another folder") from None


def read_prompts(given: list[str], file: str | None) -> list[str]:
    """The prompts of a generate call: those given, then the file's non-empty lines; each checked."""
    prompts = list(given)
    if file:
        try:
            text = Path(file).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BlossomError(
                f"--prompts {file}: cannot read it as UTF-8 text ({type(e).__name__}): pass a text "
                "file with one prompt per line"
            ) from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise BlossomError('the prompt is empty: pass one, e.g. blossom generate "a red flower with five round petals"')
    long = next((p for p in prompts if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise BlossomError(
            f"a prompt is {len(long)} characters, above the limit of {MAX_PROMPT_CHARS} "
            "(the text encoder reads only its first tokens anyway): shorten it"
        )
    return prompts


def cmd_generate(cfg: Config, paths: Paths, args) -> None:
    import re

    from PIL import Image
    from tqdm import tqdm

    from blossom.backends import default_backend, load_backend
    from blossom.fsutil import atomic_path
    from blossom.sampling import check_request, sample

    prompts = read_prompts(args.prompt, args.prompts)
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    seed = cfg.sample.seed if args.seed is None else args.seed
    total = args.n * len(prompts)
    if not 1 <= args.n * len(prompts) <= MAX_IMAGES_PER_CALL:
        raise BlossomError(
            f"--n times the number of prompts must be from 1 to {MAX_IMAGES_PER_CALL} images per call, "
            f"got {args.n} x {len(prompts)}"
        )
    from blossom.sampling import FAST_SAMPLER, check_sampler_fits

    asked = args.sampler or (FAST_SAMPLER if args.fast else cfg.sample.sampler)
    check_request(
        asked, cfg.sample.steps if args.steps is None else args.steps, guidance, seed, total
    )  # before loading
    folder = Path(args.model) if args.model else paths.served_model()
    if args.fast:
        from blossom.backends import fast_folder

        folder = fast_folder(folder, paths.distill / "model")
    out = Path(args.out)
    writable_folder(out, "--out")
    precision = args.precision or ("auto" if args.fast else "fp32")
    backend = load_backend(args.backend or default_backend(folder, args.precision), folder, precision)
    fast = backend.distilled
    sampler = (args.sampler or fast["sampler"]) if fast else args.sampler or cfg.sample.sampler
    check_sampler_fits(backend, sampler)  # before --out is made
    steps = (fast["default_steps"] if fast else cfg.sample.steps) if args.steps is None else args.steps
    check_request(sampler, steps, guidance, seed, total)
    if precision == "auto":
        print(f"generate: precision auto -> {backend.precision} ({backend.precision_why})")
    out.mkdir(parents=True, exist_ok=True)
    # Never overwrite earlier images: number on from the highest NNN.png already there.
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.fullmatch(r"(\d+)\.png", p.name))]
    first = max(taken, default=-1) + 1
    # Each prompt's --n images in turn. Batches bound memory whatever the count, and each image is
    # on disk as soon as its batch is done; image i still comes from seed + i, as in one call.
    wanted = [p for p in prompts for _ in range(args.n)]
    with tqdm(total=total, desc="generate", unit="img", disable=total <= GENERATE_BATCH) as bar:
        for start in range(0, total, GENERATE_BATCH):
            batch = wanted[start : start + GENERATE_BATCH]
            for i, img in enumerate(sample(backend, batch, sampler, steps, guidance, seed + start)):
                with atomic_path(out / f"{first + start + i:03d}.png") as tmp:
                    Image.fromarray(img).save(tmp, format="png")
            bar.update(len(batch))
    print(f"generate: {total} image(s) -> {out} ({first:03d}.png to {first + total - 1:03d}.png)")


def stage_command(name: str):
    """The function behind `blossom <stage>`: cmd_<stage>."""
    return globals()[f"cmd_{name.replace('-', '_')}"]


def cmd_run(cfg: Config, paths: Paths, args) -> None:
    """The whole job without DVC: data -> ... -> publish, with the time of each stage."""
    from blossom.fsutil import write_json

    timings = {}
    stage_args = argparse.Namespace(
        source=None,
        path=None,
        resume=None,
        model=None,
        calibration=None,
        teacher=None,
        no_register=False,
        if_enabled=True,
    )
    for stage in STAGES:
        if not stage.in_run:
            continue
        name = stage.name
        fn = _classifier_unless_current if name == "classifier" else stage_command(name)
        start = time.time()
        print(f"== {name}", flush=True)
        fn(cfg, paths, stage_args)
        timings[name] = round(time.time() - start, 1)
    total = sum(timings.values())
    write_json(paths.root / "run.json", {"preset": cfg.preset, "seconds": timings, "total_seconds": round(total, 1)})
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total {total / 60:.1f} min")


def cmd_sagemaker(cfg: Config, paths: Paths, args) -> dict:
    import json
    import shlex

    from blossom.env import aws_credentials_present
    from blossom.sagemaker import job_definition, missing_for_submit, submit

    overrides = [shlex.quote(o) for o in args.set if not o.startswith("outputs=")]
    job = job_definition(cfg, overrides)
    if args.dry_run:
        print(json.dumps(job, indent=2))
        missing = missing_for_submit(cfg)
        if missing:
            print(f"sagemaker: to submit, set {'; '.join(missing)}", file=sys.stderr)
        return job
    project = Path.cwd()
    if not (project / "pyproject.toml").exists() or not (project / "src" / "blossom").is_dir():
        raise BlossomError("run `blossom sagemaker` from the blossom project folder: the job ships its src/ and params")
    name = submit(cfg, job, project, Path(args.params or "params.yaml"), aws_credentials_present())
    print(f"sagemaker: submitted training job {name} ({cfg.sagemaker.instance_count} x {cfg.sagemaker.instance_type})")
    return job


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blossom")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (the problem and where help is), exit status 2, like every blossom error;
    no abbreviated options (a typo like --resum must not silently mean --resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        self.exit(2, f"blossom: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="blossom", description="Text-to-image latent diffusion, from data to a served model.")
    p.add_argument("--params", help="params file (default: ./params.yaml, else built-in defaults)")
    p.add_argument("--preset", help="a preset from params.yaml (default: its 'preset' key, tiny)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=200"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs, and tracebacks for unexpected errors")
    p.add_argument("--version", action="version", version=f"blossom {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    sub_parsers = sub.choices

    stage = {}  # one verb per pipeline stage, in the pipeline's order (stages.py)
    for st in STAGES:
        stage[st.name] = sub.add_parser(st.name, help=st.summary)
        stage[st.name].set_defaults(fn=stage_command(st.name))
    s = stage["data"]
    s.add_argument(
        "--source",
        choices=choices(DataConfig, "source"),
        help="where the images come from (default: data.source)",
    )
    s.add_argument(
        "--path",
        help="an image folder with metadata.jsonl (implies --source folder unless given), "
        "or the Oxford 102 folder with --source oxford102",
    )
    s = sub.add_parser("caption", help="caption the images in a folder that have no caption (resumable)")
    s.add_argument(
        "folder",
        nargs="?",
        help="an image folder (default: data.path), only read; its metadata with the "
        "new captions goes to outputs/captions/",
    )
    s.set_defaults(fn=cmd_caption)
    sub.add_parser("pull-data", help="fetch the data set from the DVC remote into outputs/data").set_defaults(
        fn=cmd_pull_data
    )
    s = sub.add_parser("push-cache", help="write the cache to object storage, for training that streams it")
    s.add_argument("--to", metavar="URL", help="s3://bucket/prefix (default: train.cache_url)")
    s.set_defaults(fn=cmd_push_cache)
    stage["classifier"].add_argument(
        "--retrain", action="store_true", help="train a judge here even where the one shipped with blossom fits"
    )
    stage["train"].add_argument(
        "--resume", help="'latest', 'auto' (latest if there is one, else start) or a checkpoint folder"
    )
    s = stage["distill"]
    s.add_argument("--teacher", help="model folder to distil (default: outputs/champion)")
    s.add_argument("--resume", help="'latest', 'auto' (latest if there is one, else start) or a checkpoint folder")
    s.add_argument("--no-register", action="store_true", help="score the student but log nothing to MLflow")
    s.add_argument("--if-enabled", action="store_true", help="do nothing unless distill.enabled (the DVC stage)")
    s = stage["export"]
    s.add_argument("--model", help="model folder to export (default: outputs/champion)")
    s.add_argument("--fast-model", help="a distilled student to export beside it (default: outputs/distill/model)")
    s.add_argument(
        "--calibration", help="image folder whose captions calibrate the int8 graphs (default: outputs/data/val)"
    )
    s = sub.add_parser("sagemaker", help="submit training as a SageMaker job (spot, multi-node, resumable)")
    s.add_argument("--dry-run", action="store_true", help="print the job definition; submit nothing")
    s.set_defaults(fn=cmd_sagemaker)
    s = sub.add_parser("app", help="serve the web app (Streamlit) on http://127.0.0.1:8501")
    s.add_argument("--port", type=int, default=8501, help="the port to serve on (default 8501)")
    s.add_argument(
        "--address", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)"
    )
    s.add_argument("--model", help="model folder to serve (default: the published one in outputs/hub)")
    s.set_defaults(fn=cmd_app)
    s = sub.add_parser("generate", help="generate images for one or more prompts")
    s.add_argument("prompt", nargs="*", help="one or more prompts (quote each)")
    s.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line, after any given above")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument(
        "--steps", type=int, help="sampler steps (default: sample.steps; a distilled model's own with --fast)"
    )
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: sample.guidance)")
    s.add_argument(
        "--seed", type=int, help="the first image's seed; each further image takes the next (default: sample.seed)"
    )
    s.add_argument("--sampler", help="ddim, dpm++2m, unipc, euler or ddpm; tcd or lcm with --fast")
    s.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        help="default: onnx where the model folder has ONNX graphs (an export), else torch; as the app",
    )
    s.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "int8", "auto"],
        help="fp32 (the default); bf16 (torch: AVX512-BF16/AMX CPUs, GPUs); int8 (onnx); auto (onnx: int8 on "
        "CPUs with VNNI, fp32 elsewhere; the default with --fast)",
    )
    s.add_argument("--model", help="model folder (default: outputs/export, else outputs/train/model)")
    s.add_argument(
        "--fast",
        action="store_true",
        help="the distilled few-step model (the folder's fast/, or outputs/distill/model): 4 steps by default",
    )
    s.add_argument(
        "--out", default="outputs/generated", help="folder for the PNGs, numbered on after any already there"
    )
    s.set_defaults(fn=cmd_generate)
    sub.add_parser("run", help="the whole job without DVC: data to publish").set_defaults(fn=cmd_run)
    # The global options work after the sub-command too (blossom train --set train.steps=5); kept
    # apart (sub_*) so both places combine instead of one replacing the other.
    for s in sub_parsers.values():
        g = s.add_argument_group("global options (also accepted before the command)")
        g.add_argument("--params", dest="sub_params", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument("--preset", dest="sub_preset", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument(
            "--set",
            dest="sub_set",
            action="append",
            default=argparse.SUPPRESS,
            metavar="KEY=VALUE",
            help="override a config key, e.g. train.steps=200",
        )
        g.add_argument(
            "-v",
            "--verbose",
            dest="sub_verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.set = [*args.set, *getattr(args, "sub_set", [])]
    args.params = getattr(args, "sub_params", None) or args.params
    args.preset = getattr(args, "sub_preset", None) or args.preset
    args.verbose = args.verbose or getattr(args, "sub_verbose", False)
    from blossom.logs import setup

    launch = launch_env()
    setup(args.verbose, launch.rank, launch.world_size)
    try:
        cfg = load_config(args.params, args.preset, args.set)
        from blossom.models import set_threads

        set_threads(cfg.threads, launch_env().local_world_size)
        args.fn(cfg, Paths(cfg.out), args)
    except BlossomError as e:
        print(f"blossom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "blossom: interrupted; `blossom train --resume latest` continues training from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    except OSError as e:  # the machine, not the input: a full disk, a vanished mount, a permission
        if args.verbose:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"blossom: error: {e.strerror or e}{where}: free space or fix the path, then run the stage again "
            "(earlier results are kept)",
            file=sys.stderr,
        )
        return 1
    except MemoryError:
        print("blossom: error: out of memory: lower the batch size or image size (see params.yaml)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line by default, the traceback with -v
        if args.verbose:
            raise
        first = first_line(e, 200, default="")
        print(
            f"blossom: error: unexpected {type(e).__name__}: {first} (rerun with -v for the traceback, and report it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

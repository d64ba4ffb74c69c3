"""The pipeline, stage by stage, in order: what each is called, what it runs, reads and writes.

The one list the rest follows: the CLI makes a verb of each stage (`cli.cmd_<name>`, with this
summary as its help), `blossom run` runs them in this order, the SageMaker entry point prepares
what training needs from it, and `dvc.yaml` spells the same stages for DVC: its names, order,
commands, inputs, outputs, params and code deps are checked against this list by
tests/test_stages.py (code deps: the import closure of the modules a stage runs, so editing any
module reruns exactly the stages that use it), as is the README's stage table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI verb and the DVC stage
    summary: str  # the verb's help
    modules: tuple[str, ...]  # what its command runs (cli.py itself aside: a help-text edit reruns nothing)
    reads: tuple[str, ...]  # the config it depends on: whole sections, or section.key
    deps: tuple[str, ...] = ()  # earlier stages' outputs it reads (and data shipped in the package)
    outs: tuple[str, ...] = ()
    dvc_args: str = ""  # what the DVC stage adds to `blossom <name>`
    in_run: bool = True  # `blossom run` runs it (push-data needs a remote of your own: DVC only)

    @property
    def command(self) -> str:
        return f"blossom {self.name} {self.dvc_args}".strip()


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "write the data set (procedural flowers, or your image folder)",
        ("blossom.data.sources",),
        ("data", "caption"),
        outs=("outputs/data",),
    ),
    Stage(
        "push-data",
        "push the data set to the DVC remote (remote.url)",
        ("blossom.datastore",),
        ("remote",),
        deps=("outputs/data",),
        outs=("outputs/push.json",),
        in_run=False,
    ),
    Stage(
        "train-vae",
        "train the small VAE (skipped when vae.pretrained is set)",
        ("blossom.train.autoencoder", "blossom.report"),
        ("vae", "data.image_size", "train.seed"),
        deps=("outputs/data",),
        outs=("outputs/vae",),
    ),
    Stage(
        "cache",
        "encode latents and text embeddings once",
        ("blossom.cpu", "blossom.data.cache", "blossom.models", "blossom.train.distributed"),
        ("text", "cache", "data.image_size", "vae.pretrained"),
        deps=("outputs/data", "outputs/vae"),
        outs=("outputs/cache",),
    ),
    Stage(
        "classifier",
        "the attribute classifier that scores prompt adherence (shipped for the default settings, else trained)",
        ("blossom.classifier",),
        (
            "data.image_size",
            "evaluate.classifier_train_size",
            "evaluate.classifier_test_size",
            "evaluate.classifier_epochs",
        ),
        deps=("src/blossom/assets/classifier",),
        outs=("outputs/classifier",),
    ),
    Stage(
        "train",
        "train the diffusion UNet on the cache",
        ("blossom.train.diffusion", "blossom.report"),
        ("unet", "train", "text", "data.image_size", "vae.pretrained"),
        deps=("outputs/cache", "outputs/vae"),
        outs=("outputs/train/model", "outputs/train/checkpoints"),
        dvc_args="--resume auto",
    ),
    Stage(
        "evaluate",
        "validation loss, prompt adherence and a sample grid",
        ("blossom.evaluate", "blossom.backends", "blossom.report"),
        (
            "sample",
            "data.source",
            "evaluate.images_per_pair",
            "evaluate.batch_size",
            "evaluate.real_images",
            "evaluate.inception",
            "evaluate.clip",
        ),
        deps=("outputs/train/model", "outputs/classifier", "outputs/data"),
        outs=("outputs/eval",),
    ),
    Stage(
        "promote",
        "log the model to MLflow; promote it to champion if its val loss is better",
        ("blossom.tracking",),
        ("tracking.uri", "tracking.experiment", "tracking.model_name", "tracking.promote_tolerance"),
        deps=("outputs/train/model", "outputs/eval"),
        outs=("outputs/champion",),
    ),
    Stage(
        "distill",
        "distil the champion into a 1-8 step student (latent consistency)",
        ("blossom.train.distill", "blossom.evaluate", "blossom.backends", "blossom.tracking", "blossom.report"),
        (
            "distill",
            "train.mixed_precision",
            "train.deepspeed",
            "train.grad_clip",
            "text",
            "data.image_size",
            "data.random_flip",
            "data.source",
            "sample.guidance",
            "sample.seed",
            "evaluate.images_per_pair",
            "evaluate.batch_size",
            "tracking.uri",
            "tracking.experiment",
            "tracking.model_name",
        ),
        deps=("outputs/champion", "outputs/cache", "outputs/classifier"),
        outs=("outputs/distill/model", "outputs/distill/eval", "outputs/distill/checkpoints"),
        dvc_args="--if-enabled --resume auto",
    ),
    Stage(
        "export",
        "the champion as a diffusers pipeline folder and ONNX graphs, checked",
        ("blossom.export", "blossom.report"),
        ("sample.sampler", "sample.steps", "sample.guidance"),
        deps=("outputs/champion", "outputs/distill/model", "outputs/data/val"),
        outs=("outputs/export",),
    ),
    Stage(
        "publish",
        "the exported model to the Hub (publish.repo_id + HF_TOKEN) or outputs/hub/",
        ("blossom.publish",),
        ("publish",),
        deps=("outputs/export",),
        outs=("outputs/hub", "outputs/publish.json"),
    ),
)

BY_NAME = {s.name: s for s in STAGES}


def needed_by(name: str) -> list[Stage]:
    """The stages whose outputs `name` reads, directly or through others, in pipeline order."""
    wanted, todo = set(), list(BY_NAME[name].deps)
    while todo:
        path = todo.pop()
        for s in STAGES:
            if s.name not in wanted and any(path == o or path.startswith(o + "/") for o in s.outs):
                wanted.add(s.name)
                todo.extend(s.deps)
    return [s for s in STAGES if s.name in wanted]

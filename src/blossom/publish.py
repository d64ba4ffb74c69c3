"""Publish the exported model: to a Hugging Face Hub model repo when a token and repo id are set,
else to a local folder of the same layout (`outputs/hub/<repo>`) that `generate` and the app load.

Both get a generated model card (README.md) with the model's metrics, sample grid, config,
training data, intended use, limitations and license.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from blossom.config import PublishConfig
from blossom.errors import BlossomError, first_line
from blossom.fsutil import atomic_dir, write_text
from blossom.layout import INT8_TEXT_ENCODER, sample_settings
from blossom.stats import adherence_note, adherence_table

log = logging.getLogger(__name__)

DEFAULT_REPO = "blossom-flowers"


class PublishError(BlossomError):
    pass


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


DATA_NAMES = {
    "synthetic": lambda d: "procedural flowers",
    "folder": lambda d: f"the image folder `{d.get('name') or 'data'}`",
    "oxford102": lambda d: "Oxford 102 Flowers",
}
TRAINING_DATA = {
    "synthetic": lambda d: (
        "Procedural flowers drawn by blossom's generator: 8 petal colours, 3-8 petals, 3 petal shapes, "
        "5 backgrounds, with exact captions; five colour/background pairs are held out of training "
        "to measure generalisation. No real photographs and no personal data."
    ),
    "folder": lambda d: (
        f"The user's image folder `{d.get('name') or 'data'}` (an imagefolder with captions in metadata.jsonl); "
        "see that data set for its origin, license and any personal data it holds."
    ),
    "oxford102": lambda d: (
        "Oxford 102 Flowers (Nilsback and Zisserman, 2008): 8,189 flower photographs in 102 categories, "
        "captioned by blossom; see the data set's own terms."
    ),
}
DATASET_TYPES = {"synthetic": "procedural-flowers", "folder": "imagefolder", "oxford102": "oxford-flowers-102"}


def card_data(repo_id: str, data: dict, metrics: dict | None):
    """The Hub's metadata: license, pipeline, data set, a widget prompt and model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    source = data["source"]
    dataset_name = DATA_NAMES[source](data).strip("`").replace("the image folder ", "")
    results = []
    if metrics and "adherence" in metrics:
        template = metrics["adherence"]["template"]
        for split in ("seen", "held_out"):
            for key, label in (
                ("petal_color", "petal colour"),
                ("background", "background"),
                ("petal_count", "petal count"),
                ("petal_shape", "petal shape"),
            ):
                results.append(
                    EvalResult(
                        task_type="text-to-image",
                        dataset_type=DATASET_TYPES[source],
                        dataset_name=dataset_name,
                        metric_type="accuracy",
                        metric_name=f"{label} adherence ({split.replace('_', '-')} pairs)",
                        metric_value=template[split][key]["acc"],
                    )
                )
    for key, metric in (("fid", "FID"), ("clip_score", "CLIP score")):
        value = (metrics or {}).get("real_images", {}).get(key)
        if value is not None:
            results.append(
                EvalResult(
                    task_type="text-to-image",
                    dataset_type=DATASET_TYPES[source],
                    dataset_name=dataset_name,
                    metric_type=key,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return ModelCardData(
        license="apache-2.0",
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["text-to-image", "diffusers", "latent-diffusion", "blossom", "onnx"],
        model_name=repo_id,
        eval_results=results or None,
        widget=[{"text": "a red flower with five round petals on green grass"}] if source == "synthetic" else None,
    )


def fast_section(folder: Path, repo_id: str, guidance: float) -> list[str]:
    """The card's part on the distilled few-step student in `fast/`, when the export has one."""
    info = (_read(folder / "fast" / "blossom.json") or {}).get("distilled")
    if not info:
        return []
    metrics = _read(folder / "fast" / "metrics.json")
    if info.get("sampler") == "lcm":
        loads = "It loads as a `LatentConsistencyModelPipeline` (LCM's sampler)"
    else:
        loads = (
            "It loads as a `StableDiffusionPipeline` with a `TCDScheduler` (deterministic consistency steps at the "
            "pipeline's default `eta=0`; an `LCMScheduler` in a `LatentConsistencyModelPipeline` draws LCM's way)"
        )
    lines = [
        "## Fast: the distilled few-step model",
        "",
        f"`fast/` holds a student distilled from this model by {info['method']} (LCM): "
        f"{info['default_steps']} steps by default (1 to {info['max_steps']}), one UNet call per step with the "
        f"guidance scale as an input (trained for {info['guidance_range'][0]:g} to {info['guidance_range'][1]:g}). "
        f"{loads}, and has its own ONNX graphs in `fast/onnx/`."
        + (
            " It decodes with a tiny decoder (`AutoencoderTiny`, TAESD's architecture) instead of this model's VAE: "
            "much faster at large sizes, a little less detail."
            if info.get("decoder") == "tiny"
            else ""
        )
        + (
            " Its UNet is pruned: no attention and no mid-block at the lowest resolution, the rest of this model's "
            "weights as they were before distillation, so each step costs less."
            if info.get("pruned")
            else ""
        ),
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained(snapshot_download("{repo_id}") + "/fast")',
        'image = pipe("a red flower with five round petals on green grass",',
        f"             num_inference_steps={info['default_steps']}, guidance_scale={guidance:g}).images[0]",
        "```",
        "",
    ]
    if metrics and "adherence" in metrics:
        rows = adherence_table(metrics)
        lines += [f"Its prompt adherence ({adherence_note(metrics)}):", ""]
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    return lines


def model_card(folder: Path, repo_id: str) -> str:
    """The card for an exported folder, from the metrics, config and samples it carries."""
    train = _read(folder / "train.json") or {}
    metrics = _read(folder / "metrics.json")
    info = _read(folder / "blossom.json") or {}
    champion = _read(folder / "champion.json") or {}
    guidance = sample_settings(folder)["guidance"]  # what the export was evaluated and is served at
    data = info.get("data") or {"source": "synthetic"}
    lines = [
        "---",
        card_data(repo_id, data, metrics).to_yaml().strip(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A small text-to-image latent diffusion model trained with blossom on {DATA_NAMES[data['source']](data)}. "
        "It loads in stock `diffusers` "
        "(`StableDiffusionPipeline.from_pretrained`) and ships ONNX graphs (`onnx/`) for ONNX Runtime"
        + (
            ", with statically quantized int8 copies of the UNet and VAE decoder (`onnx/*.int8.onnx`, "
            "calibrated on validation captions)"
            + (
                " and of the text encoder (8-bit block-wise weights, ONNX Runtime's MatMulNBits)"
                if (folder / "onnx" / INT8_TEXT_ENCODER).exists()
                else ""
            )
            if (folder / "onnx" / "unet.int8.onnx").exists()
            else ""
        )
        + ".",
        "",
        "## Metrics",
        "",
    ]
    val = train.get("val_loss")
    lines.append(
        f"- Validation loss (noise MSE, fixed seed, the served weights): **{val:.4f}**"
        if val is not None
        else "- Validation loss: not recorded"
    )
    lines.append(
        f"- Training: {train.get('steps', '?')} steps, {train.get('images_seen', '?')} images seen, "
        f"{train.get('unet_params', 0) / 1e6:.2f}M-parameter UNet, preset `{info.get('preset', '?')}`"
    )
    if champion:
        lines.append(f"- MLflow: registered version {champion.get('version')}, run `{champion.get('run_id')}`")
    if metrics and "adherence" in metrics:
        lines += [
            "",
            f"Prompt adherence (an attribute classifier reads the generated images; {adherence_note(metrics)}):",
            "",
        ]
        rows = adherence_table(metrics)
        lines += ["| " + " | ".join(r) + " |" for r in rows[:1]]
        lines.append("|" + "---|" * len(rows[0]))
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if (folder / "samples.png").exists():
        lines += [
            "",
            "## Samples",
            "",
            "![samples](samples.png)",
            "",
            "Rows: petal colours; columns: sky, grass, night, sand, stone backgrounds.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}")',
        'image = pipe("a red flower with five round petals on green grass", num_inference_steps=30,',
        f"             guidance_scale={guidance:g}).images[0]",
        "```",
        "",
        *fast_section(folder, repo_id, guidance),
        "## Training data",
        "",
        TRAINING_DATA[data["source"]](data),
        "",
        "## Intended use and limitations",
        "",
        f"A demonstration and teaching model at {info.get('image_size', '?')} px: it draws what its training "
        "captions described and knows little else; at small training budgets fine structure (petal count "
        "and shape on procedural flowers) is unreliable (see the metrics), and it is not meant for any "
        "decision about people.",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(info, sort_keys=False).strip(),
        "```",
        "",
        "## License",
        "",
        "Apache-2.0, code and weights.",
        "",
    ]
    return "\n".join(lines)


def stage(export_dir: Path, out: Path, repo_id: str) -> None:
    """out: the exported folder plus its model card, written atomically."""
    if not (export_dir / "model_index.json").exists():
        raise PublishError(f"no exported model at {export_dir}: run `blossom export` (or `dvc repro`) first")
    with atomic_dir(out) as tmp:
        shutil.copytree(export_dir, tmp, dirs_exist_ok=True)
        write_text(tmp / "README.md", model_card(tmp, repo_id))


def _reachable(endpoint: str, timeout: float = 3.0) -> None:
    """Fail in seconds when the Hub cannot be reached, rather than through the client's retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        raise PublishError(
            f"cannot reach {endpoint} ({e.strerror or e}): check the network, or unset "
            "publish.repo_id to publish to the local folder"
        ) from None


def publish(
    cfg: PublishConfig,
    export_dir: Path,
    hub_root: Path,
    token: str | None,
    offline: bool,
    endpoint: str = "https://huggingface.co",
) -> dict:
    """Hub when a repo id and token are set (and the Hub is not switched off), else the local folder."""
    repo_id = cfg.repo_id or DEFAULT_REPO
    local = hub_root / repo_id.replace("/", "--")
    stage(export_dir, local, repo_id)
    if not cfg.repo_id:
        return {"target": "local", "path": str(local), "reason": "publish.repo_id is not set"}
    if not token:
        return {"target": "local", "path": str(local), "reason": "HF_TOKEN is not set"}
    if offline:
        raise PublishError(
            f"HF_HUB_OFFLINE is set, so {repo_id} cannot be uploaded: unset it, or publish locally "
            f"(the local copy is at {local})"
        )
    _reachable(endpoint)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=cfg.private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(local), commit_message="blossom publish")
    except Exception as e:  # httpx / HfHubHTTPError: say what failed, keep the token out of it
        first = first_line(e, 200)
        raise PublishError(
            f"uploading to the Hub repo {repo_id} failed ({first.replace(token, '***')}): "
            f"check HF_TOKEN's write access and the network; the local copy is at {local}"
        ) from None
    return {"target": "hub", "repo_id": repo_id, "url": str(getattr(commit, "commit_url", "")), "path": str(local)}

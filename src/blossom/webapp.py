"""The Streamlit page: a prompt in, flowers out, with either backend.

Models load once per process (`st.cache_resource`); everything a generation changes (scheduler,
random generators, latents) is created inside `sampling.sample` for that one call, so visitors
share no mutable state. Run it with `blossom app` (Streamlit runs app_entry.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import streamlit as st

from blossom.env import app_settings
from blossom.errors import BlossomError, first_line
from blossom.images import png_bytes
from blossom.sampling import FAST_SAMPLERS, SAMPLERS
from blossom.stats import adherence_table

BACKEND_LABELS = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
EXAMPLES = [
    "a red flower with five round petals on green grass",
    "a white flower with eight thin petals at night",
    "a yellow flower with three pointed petals on sand",
    "a blue flower with six round petals under a clear sky",
]
MAX_IMAGES, MAX_STEPS, MAX_SEED = 8, 100, 2**31 - 1
FAST_MAX_STEPS = 8


def find_model() -> Path | None:
    """The model to serve: HF_MODEL_REPO from the Hub, else BLOSSOM_MODEL, else the local published folder."""
    settings = app_settings()
    if settings.hub_repo:
        return Path(_download(settings.hub_repo))
    if settings.model_dir:
        return Path(settings.model_dir)
    hub = Path(settings.outputs) / "hub"
    for candidate in [hub / "blossom-flowers", *sorted(hub.glob("*")), Path(settings.outputs) / "export"]:
        if (candidate / "model_index.json").exists():
            return candidate
    return None


def sampling_defaults(folder: Path) -> dict:
    """Where the page starts: the sampling the model was exported with (params.yaml's `sample:`,
    as `blossom generate` uses it), params.yaml's defaults for a folder that does not say."""
    from blossom.config import SampleConfig
    from blossom.layout import sample_settings

    start = sample_settings(folder)
    if start["sampler"] not in SAMPLERS:  # a distilled model's own sampler: the fast switch shows it
        start["sampler"] = SampleConfig.sampler
    return start


# What each use of a Hub model repo needs: the page its card and metadata, each backend its own
# weights (a published repo holds both formats; one backend never needs the other's).
HUB_FILES = {
    "card": ["*.json", "*.md", "*.png", "tokenizer/*", "scheduler/*", "fast/tokenizer/*", "fast/scheduler/*"],
    "onnx": ["onnx/*", "fast/onnx/*"],
    "torch": ["unet/*", "vae/*", "text_encoder/*", "fast/unet/*", "fast/vae/*", "fast/text_encoder/*"],
}
FAST = "fast"  # the distilled student's sub-folder of an exported or published model


@st.cache_resource(show_spinner="Downloading the model…")
def _download(repo_id: str, part: str = "card") -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_FILES[part])


@st.cache_resource(show_spinner="Loading the model…")
def load(backend: str, folder: str, precision: str = "fp32", fast: bool = False):
    from blossom.backends import load_backend

    repo = app_settings().hub_repo
    if repo:
        folder = _download(repo, backend)  # the same snapshot folder, now with this backend's weights
    return load_backend(backend, Path(folder) / FAST if fast else folder, precision)


def has_fast(folder: Path) -> bool:
    """Whether the folder carries a distilled few-step student (`blossom distill`, then export)."""
    path = folder / FAST / "blossom.json"
    return path.exists() and bool(json.loads(path.read_text()).get("distilled"))


def precisions(backend: str, folder: Path) -> list[str]:
    """What the backend can run this folder in: int8 (and `auto`, which picks it on VNNI CPUs) only
    where export wrote the int8 graphs."""
    from blossom.backends import PRECISIONS
    from blossom.layout import has_int8

    int8 = has_int8(folder)
    return [p for p in PRECISIONS[backend] if p not in ("int8", "auto") or (backend == "onnx" and int8)]


def model_card(folder: Path) -> dict:
    def read(name: str) -> dict:
        path = folder / name
        return json.loads(path.read_text()) if path.exists() else {}

    return {"train": read("train.json"), "metrics": read("metrics.json"), "champion": read("champion.json")}


def token_count(backend, prompt: str) -> int:
    from blossom.models import count_tokens

    return count_tokens(getattr(backend, "tokenizer", None) or backend.text_encoder.tokenizer, prompt)


def model_label(folder: Path) -> str:
    """What visitors see of the model's location: the Hub repo id, or the folder's name, never the
    server's paths."""
    return app_settings().hub_repo or folder.name


def sidebar(folder: Path) -> None:
    card = model_card(folder)
    st.sidebar.header("Model")
    st.sidebar.caption(model_label(folder))
    champion, train, metrics = card["champion"], card["train"], card["metrics"]
    if champion:
        st.sidebar.write(f"MLflow version **{champion.get('version')}**, run `{str(champion.get('run_id', ''))[:12]}`")
    if train.get("val_loss") is not None:
        st.sidebar.metric("Validation loss", f"{train['val_loss']:.4f}")
        st.sidebar.caption(
            f"{train.get('steps')} training steps, {train.get('unet_params', 0) / 1e6:.1f}M-parameter UNet"
        )
    if metrics and "adherence" in metrics:
        rows = adherence_table(metrics)
        st.sidebar.write("Prompt adherence (accuracy [95 % interval])")
        st.sidebar.table({head: [r[i] for r in rows[1:]] for i, head in enumerate(rows[0][:3])})


def no_model_page() -> None:
    st.title("blossom")
    st.info("There is no model to serve yet. Train, export and publish one with one command in the project folder:")
    st.code("make run", language="bash")
    st.caption(
        "It takes 15 to 30 minutes on a 2-core laptop. Or point the app at a model: "
        "HF_MODEL_REPO=you/blossom-flowers (a Hub repo) or BLOSSOM_MODEL=path/to/folder."
    )


def main() -> None:
    st.set_page_config(page_title="blossom", layout="wide")
    try:
        folder = find_model()
    except Exception as e:  # a Hub download that failed: say so on the page
        st.error(f"Could not download the model: {first_line(e, 200)}. Check HF_MODEL_REPO and the network.")
        return
    if folder is None:
        no_model_page()
        return

    st.title("blossom")
    st.caption("Text-to-image latent diffusion, trained on procedural flowers.")
    state = st.session_state
    state.setdefault("prompt", EXAMPLES[0])
    cols = st.columns(len(EXAMPLES))
    for col, example in zip(cols, EXAMPLES, strict=True):
        if col.button(example, key=f"example-{example}", width="stretch"):
            state["prompt"] = example
    prompt = st.text_area("Prompt", key="prompt", height=80)

    c1, c2, c3 = st.columns(3)
    fast = c1.toggle(
        "Fast (distilled, 1-8 steps)",
        value=False,
        disabled=not has_fast(folder),
        help="the few-step student `blossom distill` made of this model: one UNet call per step, guidance built in"
        if has_fast(folder)
        else "this model has no distilled student: run `blossom distill`, then export and publish",
    )
    from blossom.backends import default_backend

    served = folder / FAST if fast else folder
    start = sampling_defaults(served)
    backend_name = c1.radio(
        "Backend",
        list(BACKEND_LABELS),
        index=list(BACKEND_LABELS).index(default_backend(served)),
        format_func=BACKEND_LABELS.get,
        horizontal=True,
    )
    precision = c1.radio(
        "Precision",
        precisions(backend_name, served),
        horizontal=True,
        help="int8 (ONNX Runtime) and bf16 (PyTorch, on CPUs with AVX512-BF16 or AMX) trade "
        "a little accuracy for speed on large models; auto picks int8 on CPUs with VNNI "
        "int8 dot products, fp32 elsewhere",
    )
    if fast:
        sampler = c1.selectbox(
            "Sampler",
            FAST_SAMPLERS,
            key="fast-sampler",
            help="tcd: deterministic consistency steps (sharper adherence here); lcm: fresh noise at every step",
        )
        steps = c2.slider("Steps", 1, FAST_MAX_STEPS, min(int(start["steps"]), FAST_MAX_STEPS), key="fast-steps")
    else:
        sampler = c1.selectbox("Sampler", SAMPLERS, index=SAMPLERS.index(start["sampler"]))
        steps = c2.slider("Steps", 1, MAX_STEPS, min(int(start["steps"]), MAX_STEPS))
    guidance = c2.slider(
        "Guidance",
        1.0,
        15.0,
        float(start["guidance"]),
        0.5,
        help="an input of the student, which was distilled over a range of scales; a briefly distilled "
        "student follows it only weakly (docs/fast.md)"
        if fast
        else "classifier-free guidance: how strongly the image follows the prompt (each step costs two UNet calls)",
    )
    n = c3.number_input("Images", 1, MAX_IMAGES, 4)
    random_seed = c3.checkbox("Random seed")
    seed = c3.number_input("Seed", 0, MAX_SEED, 0, disabled=random_seed)

    try:
        backend = load(backend_name, str(folder), precision, fast)
        sidebar(served)
    except (
        Exception
    ) as e:  # a broken folder can fail in many libraries' own ways; none may reach the page as a traceback
        # blossom's own messages end with the fix, which a cut would lose on a long path
        first = str(e) if isinstance(e, BlossomError) else first_line(e, 300)
        st.error(f"The model {model_label(folder)} cannot be loaded: {first}")
        return

    if st.button("Generate", type="primary"):
        chosen = backend.precision + (" (auto)" if precision == "auto" else "")
        label = BACKEND_LABELS[backend_name] + ("" if chosen == "fp32" else f" {chosen}")
        generate(
            backend, label, prompt, sampler, int(steps), float(guidance), int(n), None if random_seed else int(seed)
        )
    show(state.get("result"))


def generate(
    backend, backend_label: str, prompt: str, sampler: str, steps: int, guidance: float, n: int, seed: int | None
) -> None:
    """Sample and keep the result in this visitor's session, so a later rerun still shows it."""
    state = st.session_state
    if not prompt.strip():
        st.warning("Type a prompt first, e.g. “a red flower with five round petals on green grass”.")
        return
    limit = backend.info["text"]["max_tokens"]
    if token_count(backend, prompt) > limit:
        st.info(f"The prompt is longer than the model's {limit} tokens: only its beginning is used.")
    if seed is None:
        seed = random.randrange(MAX_SEED)
    bar = st.progress(0.0, text="Denoising…")

    def progress(i: int, total: int) -> None:
        bar.progress(i / total, text=f"Denoising: step {i} of {total}")

    from blossom.sampling import sample

    start = time.perf_counter()
    try:
        images = sample(backend, [prompt] * n, sampler, steps, guidance, seed, progress)
    except BlossomError as e:
        bar.empty()
        st.error(str(e))
        return
    except Exception as e:  # whatever else fails, the visitor gets a sentence, not a traceback
        bar.empty()
        st.error(
            f"Generation failed ({type(e).__name__}: {first_line(e, 200, default='')}). "
            "Try again; if it keeps failing, the model folder may be damaged."
        )
        return
    took = time.perf_counter() - start
    bar.empty()
    state["result"] = {
        "images": images,
        "seed": seed,
        "seconds": took,
        "summary": f"{len(images)} image(s) in {took:.2f} s with {backend_label} "
        f"({sampler}, {steps} steps, guidance {guidance}, seed {seed})",
    }


def show(result: dict | None) -> None:
    if not result:
        return
    st.success(result["summary"])
    images, seed = result["images"], result["seed"]
    grid = st.columns(min(4, len(images)))
    for i, image in enumerate(images):
        with grid[i % len(grid)]:
            st.image(image, caption=f"seed {seed + i}", width="stretch")
            st.download_button(
                "Download PNG",
                png_bytes(image),
                file_name=f"blossom-{seed + i}.png",
                mime="image/png",
                key=f"download-{i}",
                on_click="ignore",
            )

"""The app in a real browser: `blossom app` on 127.0.0.1, Debian's chromium driven by Playwright."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from servers import free_port, http_ok, process_group

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def model_folder(micro_exported) -> Path:
    """The micro model; BLOSSOM_APP_MODEL=folder measures another (the README's numbers use the tiny one)."""
    return Path(os.environ.get("BLOSSOM_APP_MODEL") or micro_exported[1])


@pytest.fixture(scope="module")
def served(model_folder, tmp_path_factory):
    """`blossom app` serving the model; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "blossom.cli", "app", "--port", str(port), "--model", str(model_folder)]
    with process_group(cmd, tmp_path_factory.mktemp("app") / "app.log", http_ok(f"{url}/_stcore/health"), timeout=60):
        yield url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ONNX Runtime", "PyTorch"])
def test_type_a_prompt_generate_and_download(served, browser, backend, model_folder, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    start = time.time()
    page.goto(served)
    prompt = page.get_by_label("Prompt")
    prompt.wait_for(timeout=60_000)
    ready = time.time() - start  # recorded, not asserted: the first visit includes loading the model
    prompt.fill("a pink flower with six thin petals at night")
    page.get_by_text(backend, exact=True).click()
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("image(s) in").wait_for(timeout=60_000)
    summary = page.get_by_text("image(s) in").inner_text()
    assert summary.startswith("4 image(s) in") and backend in summary
    page.get_by_role("button", name="Download PNG").nth(3).wait_for(timeout=30_000)
    # the browser may draw the images after their buttons (a CI run counted 0 there): wait for them
    page.locator("[data-testid='stImage'] img").nth(3).wait_for(timeout=30_000)
    assert page.locator("[data-testid='stImage'] img").count() == 4

    with page.expect_download() as download:
        page.get_by_role("button", name="Download PNG").first.click()
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "blossom-0.png"
    size = json.loads((model_folder / "blossom.json").read_text())["image_size"]
    assert Image.open(io.BytesIO(saved.read_bytes())).size == (size, size)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"app-{backend.split()[0].lower()}.png"), full_page=True)
    (ARTIFACTS / f"app-{backend.split()[0].lower()}.json").write_text(
        json.dumps({"page_ready_s": round(ready, 2), "summary": summary})
    )
    page.close()


@pytest.mark.slow
def test_sixteen_concurrent_sessions_each_get_their_own_seeds_image(served, browser, model_folder):
    """16 visitors click Generate at once, each with its own seed: no errors, and each gets exactly
    the image its seed gives alone (the app shares no scheduler or generator between sessions)."""
    import numpy as np

    from blossom.backends import load_backend
    from blossom.sampling import sample

    folder = model_folder
    prompt, sessions = "a white flower with eight thin petals at night", 16
    pages = []
    for i in range(sessions):
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        page.goto(served)
        page.get_by_label("Prompt").fill(prompt)
        page.get_by_role("spinbutton", name="Images").fill("1")
        page.get_by_role("spinbutton", name="Images").press("Enter")
        page.get_by_role("spinbutton", name="Seed").fill(str(100 + i))
        page.get_by_role("spinbutton", name="Seed").press("Enter")
        pages.append(page)
    start = time.time()
    for page in pages:  # as close together as one driver can click
        page.get_by_role("button", name="Generate").click()
    shown = []
    ARTIFACTS.mkdir(exist_ok=True)
    for i, page in enumerate(pages):
        try:
            page.get_by_text("image(s) in").wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"load-session-{i}.png"), full_page=True)
            raise
        shown.append(float(page.get_by_text("image(s) in").inner_text().split(" in ")[1].split(" s")[0]))
    wall = time.time() - start
    assert not any(p.locator("[data-testid='stException']").count() for p in pages)

    alone = load_backend("onnx", folder)
    steps = json.loads((folder / "blossom.json").read_text())["sample"][
        "steps"
    ]  # the page's default, as export wrote it
    for i, page in enumerate(pages):
        with page.expect_download() as download:
            page.get_by_role("button", name="Download PNG").first.click()
        got = np.asarray(Image.open(download.value.path()))
        assert np.array_equal(got, sample(alone, [prompt], "unipc", steps, 5.0, 100 + i)[0]), f"session {i}"
        page.close()
    report = {
        "sessions": sessions,
        "errors": 0,
        "wall_seconds": round(wall, 2),
        "images_per_second": round(sessions / wall, 2),
        "p95_generation_seconds": round(sorted(shown)[int(0.95 * (sessions - 1))], 2),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(report, indent=1))
    print(report)

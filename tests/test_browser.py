"""A real browser uploads a photo to the page served by `imgclf serve` and reads the label."""

import os
import shutil
from pathlib import Path

import pytest

from imgclf.serve.process import serve_in_subprocess

from .conftest import PREDICT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
def test_page_labels_uploaded_daisy(small_model_file, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    sync_api = pytest.importorskip("playwright.sync_api")
    model = small_model_file
    with serve_in_subprocess(model) as (url, _):
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            page.goto(f"{url}/")
            page.wait_for_selector("text=labels: daisy, dandelion, tulips")
            page.set_input_files("#picker", str(PREDICT / "classic-daisy.jpg"))
            label = page.wait_for_selector(".label", timeout=30_000)
            assert label.inner_text().startswith("daisy")
            page.set_input_files("#picker", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"text"}])
            error = page.wait_for_selector(".error", timeout=30_000)
            assert "notes.jpg" in error.inner_text()
            shot = os.environ.get("IMGCLF_SCREENSHOT", str(tmp_path / "page.png"))
            page.screenshot(path=shot, full_page=True)
            browser.close()

"""A real browser uploads a photo to the page served by `imgclf serve` and reads the label; an MRI
slice gets its label too, with the page saying it looks like nothing the model was trained on; with
"show what it looked at" ticked, the page draws the class activation map over the photo."""

import os
import shutil
from pathlib import Path

import pytest

from imgclf.serve.process import serve_in_subprocess

from .conftest import PREDICT

MRI_SLICE = Path(__file__).parent / "data" / "brain-mri" / "glioma" / "Te-glTr_0003.jpg"

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
            assert page.locator(".unknown").count() == 0  # a daisy is known
            page.set_input_files("#picker", str(MRI_SLICE))
            warning = page.wait_for_selector(".unknown", timeout=30_000)
            assert "doesn't look like anything the model was trained on" in warning.inner_text()
            assert page.locator(".label").count() == 2  # the label is still given
            page.check("#explain")  # show what it looked at: the overlay is drawn on the page
            page.set_input_files("#picker", str(PREDICT / "classic-daisy.jpg"))
            page.wait_for_selector("canvas.overlay[data-drawn=true]", timeout=30_000)
            coloured = page.evaluate("""() => {
                const c = document.querySelector("canvas.overlay");
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let red = 0;
                for (let i = 0; i < d.length; i += 4) { if (d[i] > d[i + 1] + 60 && d[i] > d[i + 2] + 60) red++; }
                return [c.width, c.height, red];
            }""")  # fmt: skip
            assert coloured[0] > 100 and coloured[1] > 100 and coloured[2] > 0.01 * coloured[0] * coloured[1]
            assert page.locator(".looked").first.inner_text().startswith("What it looked at for daisy")
            page.set_input_files("#picker", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"text"}])
            error = page.wait_for_selector(".error", timeout=30_000)
            assert "notes.jpg" in error.inner_text()
            shot = os.environ.get("IMGCLF_SCREENSHOT", str(tmp_path / "page.png"))
            page.screenshot(path=shot, full_page=True)
            browser.close()

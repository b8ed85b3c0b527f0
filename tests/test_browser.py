"""The page at ``/`` in a real browser: Debian's Chromium driven by Playwright.

A user chooses (or drops) an image; the page must show the image, the Grad-CAM
heatmap, the probability and the decision that the API returns, and say plainly
that this is a research tool, not a diagnosis. A screenshot is saved (to
``$BREASTCAD_SCREENSHOT_DIR`` when set, else the test's tmp folder).

Chromium comes from Debian (``make browser``, which ``make test`` runs); Playwright
never downloads a browser here.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from synthetic import write_busi_like

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A tiny trained run, served by ``python -m breastcad serve RUN --port 0``."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: run `make browser` (scripts/install-chromium.sh)")
    tmp = tmp_path_factory.mktemp("browser")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    train = subprocess.run(
        [sys.executable, "-m", "breastcad", "train", "--data", str(data), "--out",
         str(tmp / "run"), "--quiet", "--folds", "2", "--epochs", "1", "--image-size", "32",
         "--set", "eval.n_bootstrap=50", "--set", "cv.val_fraction=0.34",
         "--set", "train.batch_size=8"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    log = tmp / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "breastcad", "serve", str(tmp / "run"), "--port", "0"],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            for word in log.read_text().split():
                if word.startswith("http://127.0.0.1:") and word.endswith("/"):
                    try:
                        if httpx.get(word + "healthz", timeout=5).status_code == 200:
                            url = word.rstrip("/")
                    except httpx.HTTPError:
                        pass
            time.sleep(0.2)
        assert url, log.read_text()
        yield url, data
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def screenshot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("BREASTCAD_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_the_page_shows_image_heatmap_probability_and_decision(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, data = served
    image = data / "malignant" / "malignant (4).png"
    api = httpx.post(url + "/api/v1/predict", files={"file": ("m.png", image.read_bytes())}).json()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            console_errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(url + "/")
            disclaimer = page.locator("#disclaimer")
            expect(disclaimer).to_be_visible()
            expect(disclaimer).to_contain_text("Research tool, not a diagnosis")
            expect(page.locator("#model-line")).to_contain_text("basic_cnn x2")
            expect(page.locator("#model-line")).to_contain_text("ROC-AUC")
            expect(page.locator("#result")).to_be_hidden()

            page.set_input_files("#file", str(image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)
            expect(page.locator("#probability")).to_have_text(f"{100 * api['probability']:.1f}%")
            expect(page.locator("#decision")).to_have_text(api["decision"])
            threshold = api["operating_point"]["threshold"]
            expect(page.locator("#threshold")).to_have_text(f"{100 * threshold:.1f}%")
            # both pictures really rendered (decoded PNGs with a size), the heatmap coloured
            for sel in ("#image", "#heatmap"):
                page.wait_for_function(
                    f"document.querySelector('{sel}').complete && "
                    f"document.querySelector('{sel}').naturalWidth > 0"
                )
            colour = page.evaluate(
                """() => {
                    const img = document.querySelector('#heatmap');
                    const c = document.createElement('canvas');
                    c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                    const d = g.getImageData(0, 0, c.width, c.height).data;
                    let most = 0;
                    for (let i = 0; i < d.length; i += 4) {
                        most = Math.max(most, Math.max(d[i], d[i+1], d[i+2])
                                              - Math.min(d[i], d[i+1], d[i+2]));
                    }
                    return most;
                }"""
            )
            assert colour > 40  # a colour overlay, not the grey image again
            expect(page.locator("#heatmap-caption")).to_contain_text("Grad-CAM")
            expect(page.locator("#error")).to_be_hidden()
            shot = screenshot_dir(tmp_path) / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # dropping a file that is not an image shows the server's reason, not a crash
            page.evaluate(
                """(b64) => {
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer();
                    dt.items.add(new File([bytes], 'notes.txt', {type: 'text/plain'}));
                    const drop = document.querySelector('#drop');
                    drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                              cancelable: true}));
                }""",
                base64.b64encode(b"just some text").decode(),
            )
            expect(page.locator("#error")).to_be_visible(timeout=15_000)
            expect(page.locator("#error")).to_contain_text("text/plain is not accepted")
            assert console_errors == [] or all("415" in e for e in console_errors), console_errors
        finally:
            browser.close()

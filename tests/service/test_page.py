"""The browser page at `/`, driven by headless Chromium (Debian's) through Playwright, against the
real app serving the committed digits model on a loopback port.

Screenshots land in build/screenshots/ (git-ignored). With VAE_DOCS_SCREENSHOT=1 the tour also
refreshes docs/page.png and docs/heatmap-card.png, the pictures the README shows."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.conftest import png_bytes, serve

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the dev extras are not installed: the browser tests skip, the rest run
    sync_playwright = None

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SCREENSHOTS = ROOT / "build" / "screenshots"
UPDATE_DOCS = os.environ.get("VAE_DOCS_SCREENSHOT") == "1"
WAIT_MS = 15_000            # every wait is explicit; this only bounds a broken page
PNG_SOURCE = re.compile(r"^data:image/png;base64,")
NOT_AN_IMAGE = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"}


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    """The committed default model, so verdicts on the images below are known."""
    with serve(model_path=ROOT / "models" / "digits.pt") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); Playwright's own browser "
                    "download is not used")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: Browser, page_url: str) -> Iterator[Page]:
    """A fresh page on `/` that fails the test on any script error or request leaving the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    script_errors: list[str] = []
    foreign: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    tab.on("request", lambda request: None if request.url.startswith((page_url, "data:", "blob:"))
           else foreign.append(request.url))
    tab.goto(page_url + "/")
    expect(tab.locator("#model-name")).to_have_text("digits")
    yield tab
    context.close()
    assert not script_errors, script_errors
    assert not foreign, f"the page fetched from outside the service: {foreign}"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:2] / 16.0


def png_file(name: str, pixels: np.ndarray) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(pixels)}


def stained(digit: np.ndarray) -> np.ndarray:
    """A digit with a bright 3x3 blot in its top-left corner: far above the 1% threshold."""
    blotted = digit.copy()
    blotted[:3, :3] = 1.0
    return blotted


def card(page: Page, name: str) -> Any:
    return page.get_by_test_id("result-card").filter(has_text=name)


def loaded_width(image: Any) -> int:
    """naturalWidth once the image has decoded (decode() rejects a broken image)."""
    expect(image).to_have_attribute("src", PNG_SOURCE)
    return image.evaluate("img => img.decode().then(() => img.naturalWidth)")


def screenshot(target: Any, name: str, docs_name: str | None = None) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    options = {"full_page": True} if hasattr(target, "goto") else {}     # a whole page, or one element
    target.screenshot(path=str(SCREENSHOTS / name), **options)
    if UPDATE_DOCS and docs_name:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(SCREENSHOTS / name, ROOT / "docs" / docs_name)


# ---- without a browser ---------------------------------------------------------------------------

def test_page_and_assets_are_served_but_not_in_the_api_schema(page_url: str) -> None:
    with httpx.Client(base_url=page_url, timeout=10) as http:
        index = http.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in index.headers["content-security-policy"]
        for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
            response = http.get(asset)
            assert response.status_code == 200 and kind in response.headers["content-type"], asset
            assert asset.removeprefix("/") in index.text
        assert http.get("/static/missing.js").status_code == 404
        assert "/" not in http.get("/openapi.json").json()["paths"]


# ---- in the browser ------------------------------------------------------------------------------

def test_a_user_scores_samples_and_interpolates(page: Page, digits: np.ndarray) -> None:
    uploads = [png_file("digit0.png", digits[0]), png_file("digit1.png", digits[1]),
               png_file("stained.png", stained(digits[0]))]
    page.get_by_test_id("file-input").set_input_files(uploads)

    for name, verdict in (("digit0.png", "normal"), ("digit1.png", "normal"), ("stained.png", "anomalous")):
        result = card(page, name)
        expect(result.get_by_test_id("verdict")).to_have_text(verdict)
        assert float(result.get_by_test_id("score").inner_text()) > 0
        p_value = float(result.get_by_test_id("p-value").inner_text())
        assert (p_value <= 0.01) == (verdict == "anomalous")
        assert loaded_width(result.get_by_test_id("heatmap")) == 8          # the model's 8x8, over the input
        assert loaded_width(result.get_by_test_id("reconstruction")) == 8
        expect(result.get_by_test_id("card-error")).to_be_hidden()

    page.get_by_test_id("sample-n").fill("8")
    page.get_by_test_id("sample-seed").fill("0")
    page.get_by_test_id("sample-button").click()
    samples = page.get_by_test_id("sample-image")
    expect(samples).to_have_count(8)
    assert all(loaded_width(samples.nth(i)) == 8 for i in range(8))

    # the first two images that scored are the ends; walk the path with the slider
    page.get_by_test_id("interp-steps").fill("6")
    page.get_by_test_id("interp-button").click()
    shown = page.get_by_test_id("interp-image")
    expect(page.get_by_test_id("interp-step-label")).to_contain_text("step 1 of 6")
    first_src = shown.get_attribute("src")
    slider = page.get_by_test_id("interp-slider")
    slider.press("ArrowRight")
    expect(page.get_by_test_id("interp-step-label")).to_contain_text("step 2 of 6")
    expect(shown).not_to_have_attribute("src", first_src)
    slider.press("End")
    expect(page.get_by_test_id("interp-step-label")).to_contain_text("step 6 of 6")
    assert loaded_width(shown) == 8
    slider.press("ArrowLeft")
    slider.press("ArrowLeft")           # partway, so the picture shows a mix of both ends
    screenshot(page, "page.png", docs_name="page.png")
    screenshot(card(page, "stained.png"), "heatmap-card.png", docs_name="heatmap-card.png")


def test_bad_inputs_show_the_services_error_on_the_page(page: Page, digits: np.ndarray) -> None:
    page.get_by_test_id("file-input").set_input_files([NOT_AN_IMAGE, png_file("digit0.png", digits[0])])
    bad = card(page, "notes.txt")
    expect(bad.get_by_test_id("verdict")).to_have_text("error")
    expect(bad.get_by_test_id("card-error")).to_be_visible()
    expect(bad.get_by_test_id("card-error")).to_contain_text("422")
    expect(bad.get_by_test_id("card-error")).to_contain_text("not an image this service can read")
    expect(card(page, "digit0.png").get_by_test_id("verdict")).to_have_text("normal")   # one bad file spoils nothing

    # the text file as one end of an interpolation: the request fails, and the page says why
    page.get_by_test_id("interp-file-a").set_input_files(NOT_AN_IMAGE)
    page.get_by_test_id("interp-file-b").set_input_files(png_file("digit1.png", digits[1]))
    page.get_by_test_id("interp-button").click()
    expect(page.get_by_test_id("interp-error")).to_contain_text("not an image this service can read")

    page.get_by_test_id("sample-n").fill("2000")          # above the input's max: the form refuses it ...
    page.get_by_test_id("sample-n").evaluate("input => input.removeAttribute('max')")
    page.get_by_test_id("sample-button").click()          # ... and without that, the service does
    expect(page.get_by_test_id("sample-error")).to_contain_text("above the limit")
    screenshot(page, "page-errors.png")


def test_the_page_says_when_no_model_is_loaded(browser: Browser, tmp_path: Path) -> None:
    with serve(model_path=tmp_path / "missing.pt") as url:
        tab = browser.new_page()
        tab.goto(url + "/")
        expect(tab.get_by_test_id("model-error")).to_contain_text("no model is loaded", timeout=WAIT_MS)
        tab.close()


def test_with_api_keys_the_page_asks_for_one_and_then_works(browser: Browser, digits: np.ndarray) -> None:
    with serve(model_path=ROOT / "models" / "digits.pt", api_keys="page-test-key-0123456789") as url:
        context = browser.new_context()
        context.set_default_timeout(WAIT_MS)
        tab = context.new_page()
        tab.goto(url + "/")
        expect(tab.get_by_test_id("model-error")).to_contain_text("401")
        expect(tab.get_by_test_id("key-form")).to_be_visible()
        tab.get_by_test_id("api-key").fill("a-wrong-key-0123456789")
        tab.get_by_test_id("key-submit").click()
        expect(tab.get_by_test_id("model-error")).to_contain_text("not valid")
        tab.get_by_test_id("api-key").fill("page-test-key-0123456789")
        tab.get_by_test_id("key-submit").click()
        expect(tab.locator("#model-name")).to_have_text("digits")
        expect(tab.get_by_test_id("key-form")).to_be_hidden()
        tab.get_by_test_id("file-input").set_input_files([png_file("digit0.png", digits[0])])
        expect(card(tab, "digit0.png").get_by_test_id("verdict")).to_have_text("normal")
        screenshot(tab, "api-key.png")
        context.close()

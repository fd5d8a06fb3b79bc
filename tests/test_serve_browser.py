"""The playground page in a real headless browser (Debian's chromium driven by
playwright): type a prompt, generate, see the image with its parameters."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install -y chromium; "
                                                         ".ci/run installs it)")
def test_playground_generates_an_image_in_a_browser(exported):
    sync_api = pytest.importorskip("playwright.sync_api")
    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(exported("sd15")) as pipe, LiveServer(pipe, warmup=False) as live, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "a lighthouse at dusk")
            page.fill("#size", "64x64")
            page.fill("#steps", "3")
            page.fill("#seed", "5")
            page.click("#generate")
            image = page.wait_for_selector("img.result", timeout=60_000)
            assert image.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.querySelector('img.result').naturalWidth") == 64
            caption = page.text_content("figcaption")
            assert "a lighthouse at dusk" in caption and "64x64" in caption and "3 steps" in caption
            assert "seed 5" in caption
            assert page.text_content("#message") == "done"
            page.fill("#size", "63x64")  # a bad size shows the server's one-line error
            page.click("#generate")
            page.wait_for_function("document.getElementById('message').className === 'error'")
            assert "multiple of 8" in page.text_content("#message")
        finally:
            browser.close()

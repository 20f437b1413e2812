"""End to end: `python app.py` driven in headless Chromium (Debian's chromium package, installed by .ci/run;
playwright drives it through executable_path, no browser download).

Screenshots go to $DIFFACCEL_TEST_ARTIFACTS (default: the test's temporary folder); with
$DIFFACCEL_DEMO_SCREENSHOT=docs/demo.png the first one is also written there (the README's picture).
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def artifacts(tmp_path):
    path = os.environ.get("DIFFACCEL_TEST_ARTIFACTS") or str(tmp_path / "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def server(artifacts):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("GRADIO_SERVER_PORT", None)
    log = open(os.path.join(artifacts, "app.log"), "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"app.py exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(f"app.py did not serve {url} within 180 s; see {log.name}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def _choose(page, elem_id, option):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _tiny(page):
    """Native size, two steps: a few seconds per run."""
    _set_number(page, "height", 32)
    _set_number(page, "width", 32)
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Tab")


def test_generate_pattern_error_and_recovery_in_chromium(server, artifacts):
    from playwright.sync_api import expect, sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (as .ci/run does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1150})
            page.goto(server)
            page.wait_for_selector("#generate")

            # 1. a method and its options, Generate: both images, the report and the pattern picture
            _choose(page, "method", "clear")
            expect(page.locator("#opt-clear-radius input")).to_have_value("8")  # the shipped student's setting
            weights = page.locator("#opt-clear-weights textarea, #opt-clear-weights input").first
            expect(weights).to_have_value("small-flux-clear")
            page.locator("#opt-clear-radius input").fill("4")
            weights.fill("")  # its weights are for radius 8: the undistilled projections for radius 4
            _tiny(page)
            page.click("#generate")
            for sel in ("#dense-out img", "#method-out img", "#pattern img"):
                page.wait_for_selector(sel, timeout=90_000)
            expect(page.locator("#report")).to_contain_text("clear(radius=4.0)")
            expect(page.locator("#report")).to_contain_text("Speedup over full attention")
            caption = page.locator("#pattern-caption")
            expect(caption).to_contain_text("row 8, column 8 of the 16x16 token grid")
            expect(caption).to_contain_text("45 of 256 image tokens")  # squared distance < 16
            shot = os.path.join(artifacts, "01-generated.png")
            page.screenshot(path=shot, full_page=True)
            if os.environ.get("DIFFACCEL_DEMO_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["DIFFACCEL_DEMO_SCREENSHOT"])

            # a click on the result picks another query
            img = page.locator("#method-out img")
            box = img.bounding_box()
            img.click(position={"x": box["width"] * 0.1, "y": box["height"] * 0.9})
            expect(caption).not_to_contain_text("row 8, column 8")
            m = re.search(r"row (\d+), column (\d+)", caption.inner_text())
            assert int(m.group(1)) >= 12 and int(m.group(2)) <= 3, caption.inner_text()
            page.screenshot(path=os.path.join(artifacts, "02-query-picked.png"), full_page=True)

            # 2. a bad model name: the message is in the page
            model = page.locator("#model input")
            model.fill("no-such-model")
            model.press("Enter")
            page.click("#generate")
            toast = page.locator(".toast-body", has_text="cannot load pipeline 'no-such-model'")
            expect(toast.first).to_be_visible(timeout=30_000)
            page.screenshot(path=os.path.join(artifacts, "03-error.png"), full_page=True)

            # 3. the server still serves: back to a real model, generate again
            _choose(page, "model", "small-flux")
            expect(page.locator("#method input")).to_have_value("neighborhood", timeout=30_000)
            _tiny(page)
            page.click("#generate")
            expect(page.locator("#report")).to_contain_text("neighborhood(kernel_size=9)", timeout=90_000)
            expect(caption).to_contain_text("81 of 256 image tokens")
            page.screenshot(path=os.path.join(artifacts, "04-recovered.png"), full_page=True)
        finally:
            browser.close()

"""A real browser (Debian's chromium driven by Playwright) against a real `streamlit run app.py`.

Loads the digits preset in the New experiment form (fewer epochs), launches it, watches it reach `completed` on the run page,
checks the accuracy chart and the summary, and saves a screenshot of every page under
test-artifacts/screenshots/. The other test_browser_*.py modules reuse ``serve``, ``browser_page`` and ``settle``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run"]
SHOTS = Path("test-artifacts/screenshots")

pytestmark = pytest.mark.browser


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        message = f"Debian's chromium is not installed at {CHROMIUM}: `apt-get install chromium` (CI installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(home: Path, **extra_env: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`streamlit run app.py` on a free port with its own database and data folder under ``home``."""
    require_chromium()
    env = {
        **os.environ,
        "DISTILLERY_DB_URL": f"sqlite:///{home / 'distillery.db'}",
        "DISTILLERY_HOME": str(home),
        "DISTILLERY_ARTIFACTS": str(home / "artifacts"),
        "DISTILLERY_SLOTS": "1",
        **extra_env,
    }
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("the dashboard did not answer /_stcore/health within 60 s")
    try:
        yield url, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
        stop_workers(env)


def stop_workers(env: dict[str, str]) -> None:
    """Workers are detached from the server by design; cancel any that a failed test left running."""
    from kd_core import runner
    from storage import Store

    store = Store(env["DISTILLERY_DB_URL"])
    for run in store.list_runs(status=sorted(runner.ACTIVE_STATUSES), include_hidden=True):
        runner.cancel(store, run.id)
    store.dispose()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 2200):
    """A fresh Chromium page; ``expect`` waits generously (a fresh server's first page imports torch)."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=90_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(90_000)
        try:
            yield page
        finally:
            browser.close()


def settle(page) -> None:
    """Wait until Streamlit has finished running the page script and drawn it (as Streamlit's own browser tests do)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(500)
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(timeout=90_000)
    page.get_by_test_id("stStatusWidget").wait_for(state="detached", timeout=90_000)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0)
    page.wait_for_timeout(1000)  # plotly draws after the script ends


def type_into(page, label: str, value: str, nth: int = 0) -> None:
    box = page.get_by_label(label, exact=True).nth(nth)
    box.fill(value)
    box.press("Enter")
    settle(page)


def wait_until_finished(page):
    """After Launch: the Run detail page's header once the run has ended (it polls while the run is live)."""
    from playwright.sync_api import expect

    page.wait_for_url("**/run_detail**")
    header = page.get_by_test_id("stMarkdownContainer").filter(has_text="· dataset").first
    expect(header).to_contain_text(re.compile("completed|failed|cancelled"), timeout=600_000)
    return header


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory):
    with serve(tmp_path_factory.mktemp("browser")) as served:
        yield served


def test_launch_the_digits_preset_and_watch_the_run_complete(app_url) -> None:
    from playwright.sync_api import expect

    url, _ = app_url
    with browser_page() as page:
        page.goto(f"{url}/new_experiment")
        expect(page.get_by_text("Start from a preset", exact=True)).to_be_visible()
        preset = page.get_by_test_id("stSelectbox").filter(has_text="Start from a preset")
        preset.click()
        page.get_by_role("option", name="digits · cnn_small → cnn_tiny").click()
        page.get_by_role("button", name="Load preset").click()
        settle(page)
        expect(page.get_by_text("(65.3× smaller)").first).to_be_visible()  # the preset's computed compression
        type_into(page, "Epochs", "2", nth=0)  # teacher: a shorter run than the preset's, on a machine shared with others
        type_into(page, "Epochs", "3", nth=1)  # student and baseline
        page.screenshot(path=str(SHOTS / "new_experiment.png"))
        launch = page.get_by_role("button", name="Launch")
        expect(launch).to_be_enabled()
        launch.click()

        header = wait_until_finished(page)
        page.screenshot(path=str(SHOTS / "run_detail_finished.png"))
        expect(header).to_contain_text("completed")
        expect(page.get_by_text("KD gain").first).to_be_visible()
        # the page redraws once when the run finishes; then exactly one set of tabs remains
        expect(page.get_by_role("tab", name="Accuracy")).to_have_count(1, timeout=30_000)
        page.get_by_role("tab", name="Accuracy").click()
        expect(page.locator(".js-plotly-plot >> visible=true").first).to_be_visible()
        page.screenshot(path=str(SHOTS / "run_detail.png"))

        for name, path in (("runs", "/"), ("compare", "/compare?runs=1"), ("playground", "/playground"), ("analysis", "/analysis?run=1")):
            page.goto(url + path)
            settle(page)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            page.screenshot(path=str(SHOTS / f"{name}.png"))

"""The widget in a real JupyterLab, driven through Debian's Chromium (headless) with Playwright.

JupyterLab is served on localhost from a temporary root directory with its own runtime,
config and data directories (tests/jupyter_lab.py); the kernel inherits this test's isolated Chronos state, so the
test can check the ledger that the notebook's lease lives in. Set CHRONOS_UPDATE_SCREENSHOT=1
to refresh docs/screenshot-widget.png.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import chronos
from tests.jupyter_lab import CHROMIUM, CHROMIUM_ARGS, ROOT, Lab, notebook
from tests.waiting import wait_for

SCREENSHOT = ROOT / "docs" / "screenshot-widget.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)"),
]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    server = Lab(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_widget_shows_the_lease_and_a_moving_countdown(lab: Lab, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    source = ("%load_ext chronos_jupyter\n%chronos reserve 1G 10m --label browser\n"
              "from chronos.devices import simulated\nsimulated.allocate(0, '384M')  # the kernel uses GPU memory")
    (lab.root / "lease.ipynb").write_text(json.dumps(notebook([source])))
    lab.wait_ready()

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 700},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(lab.url("lab/tree/lease.ipynb"), wait_until="domcontentloaded")
            # Wait for the kernel, then run the cell.
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=30_000)
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=30_000)
            page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
            page.keyboard.press("Shift+Enter")

            # The live widget (not the static HTML fallback): a widget box with the countdown and buttons.
            widget = page.locator(".widget-vbox.chronos-lease").first
            widget.wait_for(timeout=30_000)
            [lease] = chronos.leases()
            assert lease.label == "browser"
            title = widget.inner_text()
            assert f"Chronos lease {lease.id}" in title and "browser" in title and "GPU 0" in title
            assert widget.locator("button", has_text="Release").count() == 1
            assert widget.locator("button", has_text="Extend").count() == 1
            countdown = widget.locator(".chronos-countdown")
            first = countdown.inner_text()
            assert "left (ends" in first, first

            def moved() -> str | None:
                text = countdown.inner_text()
                return text if text != first else None

            later = wait_for(moved, timeout=10, interval=0.25, what=f"the countdown to move from {first!r}")
            assert "left (ends" in later
            memory = widget.locator(".chronos-memory")
            wait_for(lambda: "384 MiB used of 1 GiB" in memory.inner_text(), timeout=10, interval=0.25,
                     what=lambda: f"the memory line to show the kernel's use: {memory.inner_text()!r}")

            no_news = page.get_by_role("button", name="No", exact=True)
            if no_news.count():
                no_news.first.click()

            cell = page.locator(".jp-Notebook .jp-Cell").first
            shot = tmp_path / "widget.png"
            cell.screenshot(path=str(shot))
            assert shot.stat().st_size > 1000
            if os.environ.get("CHRONOS_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
        finally:
            context.close()
    lab.stop()
    # The kernel went with the server, and the lease with the kernel.
    assert chronos.leases() == []

"""The lab extension in a real JupyterLab and Notebook 7, driven in Debian's headless Chromium.

One server (tests/jupyter_lab.py) and one browser serve the whole module, on one simulated
16 GiB GPU; each test starts from no kernels and no leases. Kernels are started from Chronos
kernelspecs by opening notebooks that name them. Set CHRONOS_UPDATE_SCREENSHOT=1 to refresh
docs/screenshot-statusbar.png, docs/screenshot-panel.png and docs/screenshot-launcher.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import chronos
from chronos.api import reset_default_engine
from chronos.units import format_clock
from chronos_jupyter.kernelspec import install_kernel
from tests.jupyter_lab import CHROMIUM, CHROMIUM_ARGS, ROOT, Lab, notebook
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)"),
]

DOCS = ROOT / "docs"
GIB = 1 << 30
STATE_ENV = ("CHRONOS_STATE_DIR", "CHRONOS_CONFIG", "CHRONOS_USER_CONFIG", "CHRONOS_BACKEND", "CHRONOS_SIM_GPUS")
KERNELS = {
    "gpu-8g": ("8G", "1h", {}),
    "gpu-short": ("2G", "30s", {"warn_before": "20s", "check_interval": 0.25}),
    "gpu-12g": ("12G", "1h", {"wait": True}),
}


def display(name: str) -> str:
    if name == "python3":
        return "Python 3 (ipykernel)"
    memory, duration, _ = KERNELS[name]
    return f"Python 3 (GPU {memory[:-1]} GiB, {duration})"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("lab")
    state = base / "state"
    state.mkdir()
    env = {"CHRONOS_STATE_DIR": str(state), "CHRONOS_CONFIG": str(state / "none.toml"),
           "CHRONOS_USER_CONFIG": str(state / "none-user.toml"), "CHRONOS_BACKEND": "simulated",
           "CHRONOS_SIM_GPUS": "1x16G", "NO_COLOR": "1"}
    for name, (memory, duration, extra) in KERNELS.items():
        path = Path(install_kernel(name, memory, duration, prefix=base, display_name=display(name),
                                   wait=extra.get("wait")))
        doc = json.loads((path / "kernel.json").read_text())
        config = doc["metadata"]["kernel_provisioner"]["config"]
        config.update({k: v for k, v in extra.items() if k != "wait"})
        (path / "kernel.json").write_text(json.dumps(doc))
    server = Lab(base, env, chronos=True)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - the dev extra installs playwright
    PlaywrightError = Exception  # type: ignore[misc,assignment]


@pytest.fixture(scope="module")
def browser(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 760},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def fresh(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Lab:
    """The test process on the server's ledger, with no kernel and no lease left from an earlier test."""
    for key in STATE_ENV:
        monkeypatch.setenv(key, lab.env[key])
    reset_default_engine()
    for kernel in lab.request("GET", "api/kernels")[1]:
        lab.request("DELETE", f"api/kernels/{kernel['id']}")
    for lease in chronos.leases():
        chronos.release(lease.id)
    return lab


def open_notebook(lab: Lab, browser: Any, name: str, kernel: str, cells: list[str] | None = None,
                  ui: str = "lab") -> Any:
    (lab.root / name).write_text(json.dumps(notebook(cells or ["1 + 1"], kernel, display(kernel))))
    page = browser.new_page()
    # `reset`: a fresh workspace, not the notebooks an earlier page of this browser left open.
    url = lab.url(f"lab/tree/{name}") + "&reset" if ui == "lab" else lab.url(f"notebooks/{name}")
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
    return page


def status_text(page: Any) -> str:
    return str(page.locator(".jp-ChronosStatus").first.inner_text())


def wait_text(page: Any, pattern: str, timeout: float = 30) -> str:
    seen: list[str] = []

    def matches() -> str | None:
        seen.append(status_text(page))
        return seen[-1] if re.fullmatch(pattern, seen[-1]) else None

    try:
        return wait_for(matches, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"the status item never read {pattern!r}; last {seen[-1:]!r}") from None


def kernel_lease(label_part: str) -> chronos.Lease:
    return wait_for(lambda: next((lease for lease in chronos.leases() if lease.label and label_part in lease.label),
                                 None), timeout=60)


def toast(page: Any, text: str) -> Any:
    locator = page.locator(".Toastify__toast", has_text=text)
    locator.first.wait_for(timeout=40_000)
    return locator.first


def dismiss_toasts(page: Any) -> None:
    """Close every toast (JupyterLab's news prompt among them), so that screenshots show what they are of."""
    def close_one() -> bool:
        toasts = page.locator(".Toastify__toast")
        if toasts.count() == 0:
            return True
        for toast in toasts.all():
            close = toast.locator(".jp-Notification-Toast-Close, .Toastify__close-button")
            with contextlib.suppress(PlaywrightError):  # one leaving as we click
                (close.first if close.count() else toast.get_by_role("button", name="No", exact=True)).click(
                    force=True, timeout=2000)
        return False

    wait_for(close_one, timeout=15, interval=0.3, what="every toast to close")


def clock(epoch: float) -> str:
    """A time as the CLI and the extension both write it: ``14:05`` today, ``Dec 02 00:04`` another day."""
    return format_clock(epoch)


def save(locator: Any, name: str, tmp_path: Path) -> None:
    shot = tmp_path / name
    locator.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    if os.environ.get("CHRONOS_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS / name)


def test_status_item_panel_and_extend_in_jupyterlab(fresh: Lab, browser: Any, tmp_path: Path) -> None:
    page = open_notebook(fresh, browser, "train.ipynb", "gpu-8g",
                         ["from chronos.devices import simulated\nsimulated.allocate(0, '3.1G')  # the model"])
    page.get_by_text(f"{display('gpu-8g')} | Idle").wait_for(timeout=60_000)
    lease = kernel_lease("gpu-8g")
    assert wait_text(page, r"GPU 0 · 0 / 8 GiB · (1h|59m) left")
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    page.keyboard.press("Shift+Enter")
    assert wait_text(page, r"GPU 0 · 3\.1 / 8 GiB · (1h|59m) left")
    item = page.locator(".jp-ChronosStatus").first
    assert "jp-mod-ok" in (item.get_attribute("class") or "")
    save(page.locator("#jp-main-statusbar"), "screenshot-statusbar.png", tmp_path)

    item.click()
    panel = page.locator("#chronos-panel")
    panel.wait_for(state="visible", timeout=10_000)
    row = panel.locator(f".jp-ChronosLease[data-lease-id='{lease.id}']")
    row.wait_for(timeout=10_000)
    assert "kernel gpu-8g · train.ipynb" in row.inner_text()
    gpu = panel.locator(".jp-ChronosGpu[data-gpu='0']").inner_text()
    assert "16 GiB" in gpu and "8 GiB reserved" in gpu and "3.1 GiB used" in gpu and "8 GiB free" in gpu
    spec = panel.locator(".jp-ChronosKernelspec[data-kernelspec='gpu-12g']").inner_text()
    assert "starts ≈" in spec  # 12 GiB waits for the kernel's 8 GiB

    before = lease.expires_at
    assert before is not None
    row.locator("button", has_text="Extend 30m").click()
    after = wait_for(lambda: (end := chronos.get_lease(lease.id).expires_at) != before and end, timeout=10)
    assert after == pytest.approx(before + 1800, abs=0.01)
    assert wait_text(page, r"GPU 0 · 3\.1 / 8 GiB · 1h (29|30)m left")
    toast(page, f"lease {lease.id} extended by 30m")
    dismiss_toasts(page)
    save(panel, "screenshot-panel.png", tmp_path)
    page.close()


def test_countdown_warning_notification_and_release_of_a_kernel_lease(fresh: Lab, browser: Any) -> None:
    page = open_notebook(fresh, browser, "short.ipynb", "gpu-short")
    lease = kernel_lease("gpu-short")
    first = wait_text(page, r"GPU 0 · 0 / 2 GiB · \d+s left")
    item = page.locator(".jp-ChronosStatus").first
    assert "jp-mod-critical" in (item.get_attribute("class") or "")  # red: under a minute left
    later = wait_text(page, r"GPU 0 · 0 / 2 GiB · \d+s left")
    wait_for(lambda: status_text(page) != first, timeout=5, interval=0.1)  # it counts down
    assert int(later.split(" · ")[-1].split("s")[0]) <= int(first.split(" · ")[-1].split("s")[0])

    # The kernelspec warns 20 seconds before the end (warn_before), with an Extend action.
    warning = toast(page, f"lease {lease.id} on GPU 0 ends in")
    assert "its kernel stops then" in warning.inner_text()
    assert chronos.get_lease(lease.id).remaining <= 21
    before = chronos.get_lease(lease.id).expires_at
    assert before is not None
    warning.locator("button", has_text="Extend 30m").click()
    wait_for(lambda: chronos.get_lease(lease.id).expires_at == pytest.approx(before + 1800, abs=0.01), timeout=10)
    assert wait_text(page, r"GPU 0 · 0 / 2 GiB · 30m left")
    assert "jp-mod-ok" in (item.get_attribute("class") or "")

    # Release from the panel: the kernel's own lease, so the dialog says the kernel will be stopped.
    item.click()
    row = page.locator(f"#chronos-panel .jp-ChronosLease[data-lease-id='{lease.id}']")
    row.locator("button", has_text="Release").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=10_000)
    assert "The kernel will be stopped" in dialog.inner_text()
    dialog.locator("button", has_text="Release and stop the kernel").click()
    wait_for(lambda: chronos.get_lease(lease.id).state == "released", timeout=10)
    assert wait_text(page, r"no GPU lease")
    kernel_pid = chronos.get_lease(lease.id).pid
    assert kernel_pid is not None and kernel_pid != fresh.proc.pid
    wait_for(lambda: not psutil.pid_exists(kernel_pid) or psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="the kernel to stop")
    page.close()


def test_a_magic_lease_notifies_when_it_ends(fresh: Lab, browser: Any) -> None:
    page = open_notebook(fresh, browser, "magic.ipynb", "python3",
                         ["%load_ext chronos_jupyter\n%chronos reserve 1G 8s --label probe"])
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    assert wait_text(page, r"no GPU lease")
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    page.keyboard.press("Shift+Enter")
    magic = kernel_lease("probe")
    # The lease is held by the kernel's process: its status item shows it like a kernelspec's lease.
    assert wait_text(page, r"GPU 0 · 0 / 1 GiB · \ds left")
    ended = toast(page, f"lease {magic.id} (probe) has expired")
    # The machine's on_expiry (terminate, by default) ended the kernel with its lease.
    assert "its kernel was stopped" in ended.inner_text()
    page.close()


def test_launcher_says_when_a_kernel_would_start_and_a_queued_kernel_its_place(fresh: Lab, browser: Any,
                                                                             tmp_path: Path) -> None:
    page = open_notebook(fresh, browser, "holder.ipynb", "gpu-8g")
    holder = kernel_lease("gpu-8g")
    assert holder.expires_at is not None
    page.keyboard.press("Control+Shift+L")  # a new launcher
    card = page.locator(".jp-LauncherCard[data-category='Notebook']", has=page.locator(
        ".jp-ChronosLauncherBadge[data-kernelspec='gpu-12g']"))
    card.first.wait_for(timeout=30_000)
    badge = card.first.locator(".jp-ChronosLauncherBadge")
    # 12 GiB does not fit beside the kernel's 8 GiB on 16 GiB: it would start when that lease ends.
    wait_for(lambda: badge.inner_text() == f"starts ≈{clock(holder.expires_at)}", timeout=10,
             what=lambda: f"the badge to read the start ({badge.inner_text()!r})")
    fits = page.locator(".jp-ChronosLauncherBadge[data-kernelspec='gpu-short']").first
    assert fits.inner_text() == "fits now"
    dismiss_toasts(page)
    save(page.locator(".jp-Launcher-section").first, "screenshot-launcher.png", tmp_path)

    # Someone queues first; then a kernel that needs 12 GiB waits in the queue behind them.
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "10G", "10m", "--wait"],
                              env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: [entry.position for entry in chronos.queue()] == [1], timeout=20)
        queued_page = open_notebook(fresh, browser, "big.ipynb", "gpu-12g")
        wait_for(lambda: len(chronos.queue()) == 2, timeout=30)
        entry = next(e for e in chronos.queue() if e.label and "gpu-12g" in e.label)
        assert entry.position == 2 and entry.estimated_start is not None
        assert wait_text(queued_page, rf"queued #2 · starts ≈{clock(entry.estimated_start)}")
        assert "jp-mod-queued" in (queued_page.locator(".jp-ChronosStatus").first.get_attribute("class") or "")
        # The others go: the kernel gets its lease, and its status item says so.
        waiter.terminate()
        waiter.wait(10)
        [holder_kernel] = [k for k in fresh.request("GET", "api/kernels")[1] if k["name"] == "gpu-8g"]
        assert fresh.request("DELETE", f"api/kernels/{holder_kernel['id']}")[0] == 204
        assert wait_text(queued_page, r"GPU 0 · 0 / 12 GiB · (1h|59m) left", timeout=60)
        queued_page.close()
    finally:
        if waiter.poll() is None:
            waiter.terminate()
            waiter.wait(10)
    page.close()


def test_notebook_7_shows_the_lease_counts_down_and_extends_from_the_warning(fresh: Lab, browser: Any) -> None:
    page = open_notebook(fresh, browser, "nb7.ipynb", "gpu-short", ui="notebook")
    lease = kernel_lease("gpu-short")
    # Notebook 7 has no status bar: the item sits in the notebook's toolbar.
    item = page.locator(".jp-NotebookPanel-toolbar .jp-ChronosStatus").first
    item.wait_for(timeout=30_000)
    first = wait_text(page, r"GPU 0 · 0 / 2 GiB · \d+s left")
    wait_for(lambda: status_text(page) != first, timeout=5, interval=0.1)
    item.click()  # opens the Chronos panel in Notebook 7's right sidebar
    page.locator(f"#chronos-panel .jp-ChronosLease[data-lease-id='{lease.id}']").wait_for(timeout=10_000)
    warning = toast(page, f"lease {lease.id} on GPU 0 ends in")
    before = chronos.get_lease(lease.id).expires_at
    assert before is not None
    warning.locator("button", has_text="Extend 30m").click()
    wait_for(lambda: chronos.get_lease(lease.id).expires_at == pytest.approx(before + 1800, abs=0.01), timeout=10)
    assert wait_text(page, r"GPU 0 · 0 / 2 GiB · 30m left")
    page.close()


def test_no_status_is_read_while_the_tab_is_hidden(fresh: Lab, browser: Any) -> None:
    page = open_notebook(fresh, browser, "quiet.ipynb", "gpu-short")
    wait_text(page, r"GPU 0 · 0 / 2 GiB · \d+s left")
    reads: list[float] = []
    page.on("request", lambda request: "chronos/api/status" in request.url and reads.append(time.monotonic()))

    def is_status(request: Any) -> bool:
        return "chronos/api/status" in request.url

    for _ in range(2):  # visible: about once a second
        with page.expect_request(is_status, timeout=5000):
            pass
    page.evaluate("""() => {
        Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    hidden_at = time.monotonic()
    # Three refresh intervals pass, counted by the page's own timers (Playwright delivers the
    # page's request events while it waits), with no read.
    page.evaluate("() => { window.chronosTicks = 0; window.setInterval(() => window.chronosTicks++, 1000); }")
    page.wait_for_function("() => window.chronosTicks >= 3", timeout=10_000)
    assert [t for t in reads if t > hidden_at + 1.0] == []  # a read already under way may finish
    with page.expect_request(is_status, timeout=5000):
        page.evaluate("""() => {
            Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'});
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
    page.close()

"""A provisioner kernel tells its notebook about its lease: real kernels, real IOPub messages.

What a front end shows is what the kernel publishes on IOPub: stream text parented to a cell, and
widget state (comm messages). These tests read exactly that, through a real kernel client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import chronos
from chronos_jupyter.kernelspec import install_kernel
from tests.waiting import wait_for_async

pytestmark = pytest.mark.slow


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prefix = tmp_path / "prefix"
    for key, value in {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
                       "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
                       "JUPYTER_PLATFORM_DIRS": "1", "IPYTHONDIR": str(tmp_path / "ipython")}.items():
        monkeypatch.setenv(key, value)
    return prefix


def spec(prefix: Path, name: str, duration: str, **config: Any) -> str:
    path = Path(install_kernel(name, "4G", duration, prefix=prefix))
    doc = json.loads((path / "kernel.json").read_text())
    doc["metadata"]["kernel_provisioner"]["config"].update({"check_interval": 0.25, **config})
    (path / "kernel.json").write_text(json.dumps(doc))
    return name


@dataclass
class Cell:
    """What one execution published: stream text, errors, and widget state changes."""

    text: str = ""
    errors: list[str] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    replied: bool = False


async def execute(km: Any, code: str, *, until: float = 60.0, cell: Cell | None = None) -> Cell:
    """Run ``code`` and collect what it published until it replies, the kernel dies, or ``until`` passes."""
    kc = km.client()
    kc.start_channels()
    cell = cell if cell is not None else Cell()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(code)
        deadline = time.monotonic() + until
        idle = False
        while time.monotonic() < deadline and not idle:
            try:
                msg = await kc.get_iopub_msg(timeout=0.5)
            except Exception:  # queue.Empty: look whether the kernel is still there
                if not await km.is_alive():
                    break
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_msg":
                cell.states.append(content["data"].get("state", {}))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if kind == "stream":
                cell.text += content["text"]
            elif kind == "error":
                cell.errors.append("\n".join(content["traceback"]) or content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle":
                idle = cell.replied = True
    finally:
        kc.stop_channels()
    return cell


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_warnings_and_the_end_reach_the_running_cell_and_the_widget_ends(prefix: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    name = spec(prefix, "short", "8s", warn_before="5s")

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel()
        try:
            [lease] = chronos.leases()
            cell = await execute(km, "%chronos status\nimport time; time.sleep(60)")
            assert not cell.replied  # the kernel was stopped at the end, inside the cell
            assert f"chronos: lease {lease.id} ends in " in cell.text and "save your work" in cell.text
            assert (f"chronos: lease {lease.id} ends now" in cell.text
                    or f"chronos: lease {lease.id} has expired" in cell.text), cell.text
            assert "this kernel is being stopped and its variables are lost" in cell.text
            classes = [s["_dom_classes"] for s in cell.states if "_dom_classes" in s]
            assert any("chronos-ended" in c for c in classes), classes  # sent before the kernel went
            assert chronos.get_lease(lease.id).state == "expired"
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())


def test_an_idle_kernel_is_told_at_the_top_of_the_next_cell(prefix: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    name = spec(prefix, "hour", "1h", warn_before="59m57s")  # due three seconds after the start

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel()
        try:
            [lease] = chronos.leases()

            async def warned() -> Cell | None:
                cell = await execute(km, "1 + 1")
                return cell if "chronos: lease" in cell.text else None

            cell = await wait_for_async(warned, timeout=60, interval=0.2, what="the warning in a cell")
            assert cell.text.startswith(f"chronos: lease {lease.id} ends in 59m"), cell.text
            later = await execute(km, "2 + 2")
            assert "chronos:" not in later.text  # said once
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())


def test_release_inside_the_kernel_is_refused_with_the_way_to_give_the_gpu_back(prefix: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    name = spec(prefix, "gpu", "1h")

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel()
        try:
            [lease] = chronos.leases()
            refused = await execute(km, "%chronos release")
            # IPython shows a UsageError as one line on stderr, no traceback
            lines = refused.text.strip().splitlines()
            assert refused.replied and len(lines) == 1, refused.text
            assert lines[0].startswith(f"UsageError: lease {lease.id} is this kernel's own")
            assert "releasing it stops this kernel" in lines[0] and "%chronos release --stop-kernel" in lines[0]
            assert chronos.get_lease(lease.id).state == "active" and await km.is_alive()
            stopped = await execute(km, "%chronos release --stop-kernel\nimport time; time.sleep(60)")
            assert f"chronos: releasing lease {lease.id}: this kernel is stopped now" in stopped.text
            assert f"lease {lease.id} was released at " in stopped.text, stopped.text
            assert chronos.get_lease(lease.id).state == "released"
            await wait_for_async(lambda: _dead(km), timeout=30, what="the kernel to be stopped")
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())


async def _dead(km: Any) -> bool:
    return not await km.is_alive()


def test_release_from_outside_is_told_in_the_notebook(prefix: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    name = spec(prefix, "gpu", "1h")

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel()
        try:
            [lease] = chronos.leases()
            code = "print('started', flush=True)\nimport time; time.sleep(60)"
            cell = Cell()
            running = asyncio.ensure_future(execute(km, code, cell=cell))
            await wait_for_async(lambda: "started" in cell.text, timeout=30, what="the cell to start")
            await asyncio.to_thread(chronos.release, lease.id)
            await running
            assert f"chronos: lease {lease.id} was released at " in cell.text, cell.text
            assert "this kernel is being stopped" in cell.text
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())


def test_the_next_kernel_of_a_notebook_whose_lease_ended_says_so_before_running_anything(prefix: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    name = spec(prefix, "short", "4s", warn_before="0")
    env = {"JPY_SESSION_NAME": "analysis.ipynb"}

    async def scenario() -> None:
        first = AsyncKernelManager(kernel_name=name)
        await first.start_kernel(env=env)
        [old] = chronos.leases()
        await wait_for_async(lambda: _dead(first), timeout=30, what="the kernel to be stopped at its end")
        second = AsyncKernelManager(kernel_name=name)
        await second.start_kernel(env=env)
        try:
            cell = await execute(second, "x = 1\nprint('ran')")
            assert len(cell.errors) == 1, cell
            [error] = cell.errors
            assert f"the notebook's previous kernel ended with its lease {old.id}" in error
            assert "This cell was not run: run it again" in error and "ran" not in cell.text
            again = await execute(second, "x = 1\nprint('ran')")
            assert again.errors == [] and "ran" in again.text
        finally:
            await second.shutdown_kernel(now=True)
            await first.shutdown_kernel(now=True)

    run(scenario())

"""ChronosProvisioner through jupyter_client's real kernel managers and real IPython kernels."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import chronos
from chronos.errors import InvalidRequestError, UnavailableError
from chronos_jupyter.kernelspec import install_kernel
from chronos_jupyter.provisioner import (
    ChronosProvisioner,
    KernelLeaseEnded,
    KernelLeaseInvalid,
    KernelLeaseUnavailable,
)
from tests.waiting import wait_for, wait_for_async

GiB = 1 << 30


@pytest.fixture
def jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Kernelspecs and runtime files under tmp_path only; returns the kernelspec prefix."""
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return prefix


def add_config(spec_dir: str, **extra: Any) -> None:
    """Add provisioner settings that the installer does not expose (e.g. check_interval)."""
    path = Path(spec_dir) / "kernel.json"
    doc = json.loads(path.read_text())
    doc["metadata"]["kernel_provisioner"]["config"].update(extra)
    path.write_text(json.dumps(doc))


async def kernel_env(km: Any) -> dict[str, Any]:
    """Run code in the kernel and return what it saw: its pid and Chronos environment."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        code = (
            "import json, os; print('ENV' + json.dumps({'pid': os.getpid(), "
            "'lease': os.environ.get('CHRONOS_LEASE_ID'), 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES')}))"
        )
        seen: list[str] = []

        def output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                seen.append(msg["content"]["text"])

        reply = await kc.execute_interactive(code, output_hook=output, timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    line = next(chunk for chunk in "".join(seen).splitlines() if chunk.startswith("ENV"))
    result: dict[str, Any] = json.loads(line[3:])
    return result


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def spec_8g(jupyter_dirs: Path) -> str:
    return install_kernel("gpu-8g", "8G", "1h", prefix=jupyter_dirs)


# --------------------------------------------------------------------------- start, restart, shutdown


@pytest.mark.slow
@pytest.mark.usefixtures("both_modes")
def test_start_restart_shutdown_keep_one_lease_bound_to_the_kernel(spec_8g: str) -> None:
    from jupyter_client.manager import AsyncKernelManager

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="gpu-8g")
        await km.start_kernel()
        try:
            prov = km.provisioner
            assert isinstance(prov, ChronosProvisioner)
            lease = chronos.get_lease(prov.lease_id)
            assert lease.state == "active" and lease.memory_bytes == 8 * GiB
            assert lease.pid == prov.pid, "the lease is held by the kernel process"
            assert lease.label and km.kernel_id in lease.label
            seen = await kernel_env(km)
            assert seen["pid"] == prov.pid
            assert seen["lease"] == lease.id
            assert seen["cuda"] == ",".join(lease.device_uuids)

            # a graceful restart (the front end's "Restart kernel") keeps the lease
            first_pid = prov.pid
            await km.restart_kernel()
            again = chronos.get_lease(lease.id)
            assert again.state == "active" and prov.lease_id == lease.id
            assert again.pid == prov.pid != first_pid
            assert (await kernel_env(km))["lease"] == lease.id

            # an immediate restart keeps it too
            second_pid = prov.pid
            await km.restart_kernel(now=True)
            again = chronos.get_lease(lease.id)
            assert again.state == "active" and again.pid == prov.pid != second_pid
            assert [x.id for x in chronos.leases()] == [lease.id]
        finally:
            await km.shutdown_kernel()
        ended = chronos.get_lease(lease.id)
        assert ended.state == "released", ended
        assert chronos.leases() == []

    run(scenario())


@pytest.mark.slow
def test_kernel_crash_is_auto_restarted_within_the_rest_of_the_lease(spec_8g: str) -> None:
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config

    async def scenario() -> None:
        km = AsyncIOLoopKernelManager(kernel_name="gpu-8g",
                                      config=Config({"KernelRestarter": {"time_to_dead": 0.3}}))
        await km.start_kernel()
        restarts: list[str] = []
        km.add_restart_callback(lambda: restarts.append("restart"), "restart")
        try:
            prov = km.provisioner
            old = chronos.get_lease(prov.lease_id)
            old_pid = prov.pid
            os.kill(old_pid, signal.SIGKILL)  # a crash: the holder dies with no warning
            await wait_for_async(lambda: restarts == ["restart"] and prov.pid != old_pid, timeout=20,
                                 what="the auto-restarter to start a new kernel")
            # The new lease is taken before the new kernel starts, and bound to it once it runs.
            await wait_for_async(lambda: prov.lease_id != old.id and chronos.get_lease(prov.lease_id).pid == prov.pid,
                                 timeout=10, what="the restarted kernel to hold its new lease")
            assert chronos.get_lease(old.id).state == "revoked"
            new = chronos.get_lease(prov.lease_id)
            assert new.state == "active" and new.pid == prov.pid
            assert new.memory_bytes == old.memory_bytes and new.devices == old.devices
            assert new.expires_at is not None and old.expires_at is not None
            assert abs(new.expires_at - old.expires_at) < 5, "only the rest of the old lease's time"
            assert (await kernel_env(km))["lease"] == new.id
        finally:
            await km.shutdown_kernel()
        assert chronos.leases() == []

    run(scenario())


# --------------------------------------------------------------------------- the end of a lease


@pytest.mark.slow
def test_expiry_ends_the_kernel_and_auto_restart_does_not_bring_it_back(jupyter_dirs: Path) -> None:
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config

    spec_dir = install_kernel("short", "4G", "3s", prefix=jupyter_dirs)
    add_config(spec_dir, check_interval=0.2)

    async def scenario() -> None:
        config = Config({"KernelRestarter": {"time_to_dead": 0.3}})
        km = AsyncIOLoopKernelManager(kernel_name="short", config=config)
        await km.start_kernel()
        events: list[str] = []
        km.add_restart_callback(lambda: events.append("restart"), "restart")
        km.add_restart_callback(lambda: events.append("dead"), "dead")
        prov = km.provisioner
        lease_id, pid = prov.lease_id, prov.pid
        try:
            await wait_for_async(lambda: events == ["dead"], timeout=20, what="the kernel to be reported dead")
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            assert chronos.get_lease(lease_id).state == "expired"
            expected = f"lease {lease_id} has expired; start a new kernel to take a new lease"
            assert prov.ended_message == expected
            # Four restarter periods: nothing comes back. A fixed wait: the restarter, the one thing
            # that could start the kernel again, has been stopped, so it makes no polls to count, and
            # the watchdog that ended the kernel is done.
            await asyncio.sleep(1.2)
            assert events == ["dead"]
            assert not await km.is_alive()
            with pytest.raises(KernelLeaseEnded) as info:
                await km.restart_kernel()
            assert str(info.value) == f"lease {lease_id} has expired; start a new kernel to take a new lease"
            assert isinstance(info.value, UnavailableError)
        finally:
            await km.shutdown_kernel(now=True)
        assert chronos.leases() == []

    run(scenario())


@pytest.mark.slow
def test_interrupt_policy_keeps_the_kernel_but_not_the_lease(jupyter_dirs: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = install_kernel("short-int", "4G", "2s", on_expiry="interrupt", prefix=jupyter_dirs)
    add_config(spec_dir, check_interval=0.2)

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="short-int")
        await km.start_kernel()
        try:
            lease_id = km.provisioner.lease_id
            await wait_for_async(lambda: km.provisioner.ended_message is not None, timeout=15,
                                 what="the lease to end")
            assert await km.is_alive(), "interrupt leaves the kernel running"
            assert chronos.get_lease(lease_id).state == "expired"
            with pytest.raises(KernelLeaseEnded, match=f"lease {lease_id} has expired"):
                await km.restart_kernel()
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())


# --------------------------------------------------------------------------- no capacity


@pytest.mark.usefixtures("both_modes")
def test_no_capacity_fails_at_once_with_a_clear_message(spec_8g: str) -> None:
    from jupyter_client.manager import AsyncKernelManager

    blocker = chronos.reserve("80G", "1h", gpus=2, bind=False)

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="gpu-8g")
        with pytest.raises(KernelLeaseUnavailable) as info:
            await km.start_kernel()
        message = str(info.value)
        assert message.startswith("no GPU capacity for this kernel (8 GiB for 1h)\nnot enough free memory")
        # JupyterLab's dialog shows it in <pre>: what happened first, then short lines
        assert message.endswith("\ntry again later, or choose a smaller kernel")
        assert all(len(line) <= 76 for line in message.splitlines()), message
        assert info.value.status_code == 503 and info.value.log_message == message
        assert not km.has_kernel

    run(scenario())
    assert [x.id for x in chronos.leases(all=True)] == [blocker.id]


@pytest.mark.slow
@pytest.mark.usefixtures("both_modes")
def test_waiting_start_is_granted_when_capacity_frees_without_blocking_the_loop(jupyter_dirs: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    install_kernel("gpu-wait", "8G", "1h", wait="60s", prefix=jupyter_dirs)
    blocker = chronos.reserve("80G", "1h", gpus=2, bind=False)

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="gpu-wait")
        start = asyncio.create_task(km.start_kernel())
        # The loop keeps running other work while the start waits: this wait runs on it, beside the start.
        queued = await wait_for_async(lambda: [x for x in chronos.leases() if x.state == "queued"], timeout=30,
                                      interval=0.05, what="the waiting start to queue its request")
        assert len(queued) == 1 and not start.done()
        await asyncio.to_thread(chronos.release, blocker.id)
        await asyncio.wait_for(start, 60)
        try:
            lease = chronos.get_lease(km.provisioner.lease_id)
            assert lease.id == queued[0].id and lease.state == "active"
            assert lease.pid == km.provisioner.pid
        finally:
            await km.shutdown_kernel()
        assert chronos.get_lease(lease.id).state == "released"

    run(scenario())


@pytest.mark.usefixtures("both_modes")
def test_cancelled_waiting_start_withdraws_its_request(jupyter_dirs: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    install_kernel("gpu-wait", "8G", "1h", wait=True, prefix=jupyter_dirs)
    chronos.reserve("80G", "1h", gpus=2, bind=False)

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="gpu-wait")
        start = asyncio.create_task(km.start_kernel())
        await wait_for_async(lambda: any(x.state == "queued" for x in chronos.leases()), timeout=10,
                             what="queueing")
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await wait_for_async(lambda: not any(x.state == "queued" for x in chronos.leases()), timeout=10,
                             what="the queued request to be withdrawn")

    run(scenario())
    states = sorted(x.state for x in chronos.leases(all=True))
    assert states == ["active", "withdrawn"]


# --------------------------------------------------------------------------- settings


def test_kernelspec_config_overrides_admin_defaults(jupyter_dirs: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory
    from traitlets.config import Config

    install_kernel("gpu-2", "2G", "30m", gpus=2, wait="5m", on_expiry="kill", prefix=jupyter_dirs)
    spec = KernelSpecManager().get_kernel_spec("gpu-2")
    config = Config({"ChronosProvisioner": {"memory": "6G", "priority": "high", "check_interval": 2.0}})
    km = AsyncKernelManager(kernel_name="gpu-2", config=config)
    prov = KernelProvisionerFactory.instance().create_provisioner_instance("k1", spec, parent=km)
    assert isinstance(prov, ChronosProvisioner)
    settings = (prov.memory, prov.duration, prov.gpus, prov.queue_wait, prov.on_expiry)
    assert settings == ("2G", "30m", 2, "5m", "kill")
    assert prov.priority == "high" and prov.check_interval == 2.0  # admin defaults where the spec is silent


def test_missing_memory_is_a_clear_error(jupyter_dirs: Path) -> None:
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = Path(install_kernel("no-memory", "1G", "1h", prefix=jupyter_dirs))
    doc = json.loads((spec_dir / "kernel.json").read_text())
    doc["metadata"]["kernel_provisioner"]["config"] = {"duration": "1h"}
    (spec_dir / "kernel.json").write_text(json.dumps(doc))

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="no-memory")
        with pytest.raises(KernelLeaseInvalid, match=r"needs a memory size\nset \"memory\"") as info:
            await km.start_kernel()
        assert isinstance(info.value, InvalidRequestError) and info.value.status_code == 400

    run(scenario())
    assert chronos.leases(all=True) == []


# --------------------------------------------------------------------------- persistence and dead servers


@pytest.mark.slow
def test_provisioner_info_carries_the_lease_to_a_new_server(spec_8g: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="gpu-8g")
        await km.start_kernel()
        try:
            info = await km.provisioner.get_provisioner_info()
            lease_id = km.provisioner.lease_id
            assert info["chronos_lease_id"] == lease_id
            # a later server process rebuilds the provisioner from what was stored
            stored = dict(info)
            spec = KernelSpecManager().get_kernel_spec("gpu-8g")
            revived = ChronosProvisioner(kernel_id=km.kernel_id, kernel_spec=spec)
            await revived.load_provisioner_info(stored)
            assert revived.lease_id == lease_id and revived.pid == km.provisioner.pid
            assert revived.lease is not None and revived.lease.state == "active"
            await revived.cleanup(restart=False)
            assert chronos.get_lease(lease_id).state == "released"
        finally:
            await km.shutdown_kernel()

    run(scenario())


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():
        km = AsyncKernelManager(kernel_name="gpu-8g")
        await km.start_kernel()
        print(km.provisioner.lease_id, km.provisioner.pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_killed_server_leaves_a_lease_reclaimed_through_its_dead_kernel(spec_8g: str, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        lease_id, kernel_pid = server.stdout.readline().split()
        lease = chronos.get_lease(lease_id)
        assert lease.state == "active" and lease.pid == int(kernel_pid)
        server.kill()  # no shutdown, no cleanup
        server.wait(10)
        # the orphaned kernel notices its parent is gone and exits; the lease goes with it
        wait_for(lambda: _exited(int(kernel_pid)), timeout=20, interval=0.2, what="the orphaned kernel to exit")
        ended = chronos.get_lease(lease_id)
        assert ended.state == "revoked", ended
        assert ended.end_reason == f"holder process {kernel_pid} exited"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


EXITING_HOST = textwrap.dedent(
    """
    import asyncio, subprocess, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():
        km = AsyncKernelManager(kernel_name="gpu-8g")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        out = []
        code = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(600)'], start_new_session=True).pid)")
        await kc.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else ""))
        kc.stop_channels()
        print(km.provisioner.lease_id, km.provisioner.pid, "".join(out).strip(), flush=True)
        # and the host exits, its kernel never shut down

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_host_that_exits_without_shutting_its_kernel_down_still_ends_it_and_releases(spec_8g: str,
                                                                                        tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(EXITING_HOST)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lease_id, kernel_pid, child_pid = done.stdout.split()
    for pid in (int(kernel_pid), int(child_pid)):
        wait_for(lambda p=pid: _exited(p), timeout=20, interval=0.1, what=f"process {pid} to end")  # type: ignore[misc]
    assert chronos.get_lease(lease_id).state == "released"


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def _no_stray_kernels() -> Iterator[None]:
    """Every kernel a test starts is gone when it ends."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield

    def stray() -> list[int]:
        return [p.pid for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(lambda: not stray(), timeout=10, interval=0.1, what=lambda: f"no kernels left running: {stray()}")


@pytest.mark.slow
def test_lease_released_from_the_cli_ends_the_kernel(spec_8g: str) -> None:
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config

    from tests.conftest import run_cli

    add_config(spec_8g, check_interval=0.2)

    async def scenario() -> None:
        km = AsyncIOLoopKernelManager(kernel_name="gpu-8g", config=Config({"KernelRestarter": {"time_to_dead": 0.3}}))
        await km.start_kernel()
        events: list[str] = []
        km.add_restart_callback(lambda: events.append("restart"), "restart")
        km.add_restart_callback(lambda: events.append("dead"), "dead")
        lease_id = km.provisioner.lease_id
        try:
            done = await asyncio.to_thread(run_cli, "release", lease_id)
            assert done.returncode == 0, done.stderr
            await wait_for_async(lambda: events == ["dead"], timeout=20, what="the kernel to be reported dead")
            assert km.provisioner.ended_message == (
                f"lease {lease_id} was released; start a new kernel to take a new lease"
            )
            # Three restarter periods: nothing comes back. A fixed wait: the restarter has been stopped and
            # the watchdog is done, so nothing that could start the kernel again makes polls to count.
            await asyncio.sleep(1.0)
            assert events == ["dead"] and not await km.is_alive()
        finally:
            await km.shutdown_kernel(now=True)

    run(scenario())

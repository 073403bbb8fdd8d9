"""The %chronos magics in a real IPython shell, in a terminal ``ipython`` process and in a real kernel."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

import chronos
import chronos_jupyter
from chronos_jupyter.magics import CellFailed
from tests.waiting import wait_for

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    """A real InteractiveShell with the extension loaded; unloaded and leases released afterwards."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chronos_jupyter")
    yield ip
    lease = chronos_jupyter.current_lease()
    ip.run_line_magic("unload_ext", "chronos_jupyter")
    if lease is not None and lease.state in ("active", "queued"):
        lease.release()
    for key in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CHRONOS_LEASE_ID",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUPY_GPU_MEMORY_LIMIT",
                "PYTORCH_CUDA_ALLOC_CONF", "TF_FORCE_GPU_ALLOW_GROWTH"):
        os.environ.pop(key, None)


def run(ip: InteractiveShell, source: str) -> tuple[Any, CapturedIO]:
    with capture_output() as captured:
        result = ip.run_cell(source, store_history=False)
    return result, captured


def usage_error(ip: InteractiveShell, source: str) -> str:
    """Run ``source``, require a UsageError shown as one line without a traceback, return its message."""
    result, captured = run(ip, source)
    assert isinstance(result.error_in_exec, UsageError), (result.error_in_exec, captured.stdout)
    assert "Traceback" not in captured.stderr and "Traceback" not in captured.stdout
    lines = [line for line in captured.stderr.splitlines() if line.strip()]
    assert lines == [f"UsageError: {result.error_in_exec}"], captured.stderr
    return str(result.error_in_exec)


def own_active() -> list[chronos.Lease]:
    return [lease for lease in chronos.leases() if lease.state == "active"]


# -- the extension ---------------------------------------------------------------------------


def test_help_lists_every_command(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%chronos help")
    assert result.success
    for command in ("reserve", "status", "list", "release", "extend", "stats", "%%chronos"):
        assert command in captured.stdout


def test_unload_removes_the_magics(shell: InteractiveShell) -> None:
    shell.run_line_magic("unload_ext", "chronos_jupyter")
    assert "chronos" not in shell.magics_manager.magics["line"]
    assert "chronos" not in shell.magics_manager.magics["cell"]
    shell.run_line_magic("load_ext", "chronos_jupyter")
    assert "chronos" in shell.magics_manager.magics["line"]
    assert "chronos" in shell.magics_manager.magics["cell"]


# -- reserve / status / list / extend / release ----------------------------------------------


def test_reserve_binds_a_lease_to_the_kernel_and_shows_the_widget(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%chronos reserve 1G 10m --label demo")
    assert result.success, result.error_in_exec
    [lease] = own_active()
    assert lease.pid == os.getpid()
    assert lease.memory_bytes == 1 << 30
    assert lease.label == "demo"
    assert 590 <= lease.remaining <= 600
    # CUDA was never initialised here, so the kernel now sees only the lease's GPU.
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(lease.device_uuids)
    assert os.environ["CHRONOS_LEASE_ID"] == lease.id
    [shown] = captured.outputs
    assert WIDGET_MIME in shown.data
    assert f"Chronos lease {lease.id}" in shown.data["text/plain"]
    assert "left (ends" in shown.data["text/plain"]
    assert lease.id in shown.data["text/html"]
    assert "CUDA_VISIBLE_DEVICES=" in captured.stdout
    current = chronos_jupyter.current_lease()
    assert current is not None and current.id == lease.id


def test_reserve_on_chosen_devices(shell: InteractiveShell) -> None:
    result, _ = run(shell, "%chronos reserve 2G 5m --gpu 1")
    assert result.success, result.error_in_exec
    assert [lease.devices for lease in own_active()] == [(1,)]
    run(shell, "%chronos release")
    result, _ = run(shell, "%chronos reserve 2G 5m --gpus 2 --priority high")
    assert result.success, result.error_in_exec
    [lease] = own_active()
    assert lease.devices == (0, 1)
    assert lease.priority == "high"
    run(shell, "%chronos release")
    result, _ = run(shell, "%chronos reserve 2G 5m --prefer 1")
    assert result.success, result.error_in_exec
    assert [lease.devices for lease in own_active()] == [(1,)]


def test_reserve_leaves_the_priority_to_the_configured_default(shell: InteractiveShell) -> None:
    Path(os.environ["CHRONOS_USER_CONFIG"]).write_text('[defaults]\npriority = "low"\n')
    from chronos.api import reset_default_engine

    reset_default_engine()
    result, _ = run(shell, "%chronos reserve 1G 5m")
    assert result.success, result.error_in_exec
    assert [lease.priority for lease in own_active()] == ["low"]


def test_status_list_extend_release(shell: InteractiveShell) -> None:
    run(shell, "%chronos reserve 1G 10m")
    [lease] = own_active()

    result, captured = run(shell, "%chronos status")
    assert result.success
    assert f"Chronos lease {lease.id}" in captured.outputs[0].data["text/plain"]

    result, captured = run(shell, "%chronos list")
    assert result.success
    rows = captured.stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "OWNER", "GPU"]
    assert rows[1].split()[0] == lease.id and "active" in rows[1]
    assert any(line.startswith("GPU") and "AVAILABLE" in line for line in rows)

    before = chronos.get_lease(lease.id).expires_at
    assert before is not None
    result, captured = run(shell, "%chronos extend 30m")
    assert result.success, result.error_in_exec
    after = chronos.get_lease(lease.id).expires_at
    assert after is not None and after - before == pytest.approx(1800, abs=1)
    assert "now ends at" in captured.stdout

    result, captured = run(shell, "%chronos release")
    assert result.success, result.error_in_exec
    assert chronos.get_lease(lease.id).state == "released"
    assert f"lease {lease.id} released" in captured.stdout
    # What the lease put in the environment is gone with it.
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "CHRONOS_LEASE_ID" not in os.environ
    assert chronos_jupyter._magics is not None
    widget = chronos_jupyter._magics.widget
    assert widget is not None and widget.view.state == "released"
    assert "released at" in widget.countdown.value
    assert widget.release_button.disabled


def test_status_without_a_lease_shows_the_gpus(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%chronos status")
    assert result.success
    assert "holds no lease" in captured.stdout
    assert "%chronos reserve" in captured.stdout
    assert "Chronos Simulated GPU" in captured.stdout


def test_release_and_extend_by_id(shell: InteractiveShell) -> None:
    other = chronos.reserve("1G", "10m", bind=False)
    result, _ = run(shell, f"%chronos extend {other.id} 5m")
    assert result.success, result.error_in_exec
    assert chronos.get_lease(other.id).remaining > 14 * 60
    result, _ = run(shell, f"%chronos release {other.id}")
    assert result.success, result.error_in_exec
    assert chronos.get_lease(other.id).state == "released"


def test_stats_reports_the_ledger(shell: InteractiveShell) -> None:
    run(shell, "%chronos reserve 1G 10m")
    run(shell, "%chronos release")
    run(shell, "%chronos reserve 2G 10m --gpu 1")
    result, captured = run(shell, "%chronos stats")
    assert result.success, result.error_in_exec
    lines = captured.stdout.splitlines()
    assert lines[0].split()[0] == "USER"
    user_row = lines[1].split()
    assert user_row[4:7] == ["2/2", "1", "0"]  # leases today/this week, active, queued: as chronos stats shows them
    gpu_rows = {line.split()[0]: line for line in lines if line[:1].isdigit()}
    assert "2 GiB" in gpu_rows["1"] and gpu_rows["0"].split()[1:3] == ["0", "GiB"]


def test_suggest_gives_a_magic_to_type(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%chronos suggest")
    assert result.success, result.error_in_exec
    first = captured.stdout.splitlines()[0]
    assert first.startswith("%chronos reserve ")
    # What it suggests can be typed as it is.
    result, _ = run(shell, first)
    assert result.success, result.error_in_exec
    assert len(own_active()) == 1


# -- the cell magic --------------------------------------------------------------------------


def test_cell_runs_under_a_lease_released_when_it_ends(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%%chronos 2G 5m\nimport chronos\n"
                                  "inside = [(l.id, l.label, l.state, l.pid) for l in chronos.leases()]\n"
                                  "print('cell ran')")
    assert result.success, result.error_in_exec
    assert "cell ran" in captured.stdout
    [(lease_id, label, state, pid)] = shell.user_ns["inside"]
    assert (label, state, pid) == ("cell", "active", os.getpid())
    assert chronos.get_lease(lease_id).state == "released"
    assert own_active() == []
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_cell_lease_released_after_an_exception(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%%chronos 1G 5m\nimport chronos\n"
                                  "seen = [l.id for l in chronos.leases()]\n1 / 0")
    assert isinstance(result.error_in_exec, CellFailed)
    [lease_id] = shell.user_ns["seen"]
    assert chronos.get_lease(lease_id).state == "released"
    # The cell's own traceback once, then one line from chronos.
    assert captured.stdout.count("ZeroDivisionError") + captured.stderr.count("ZeroDivisionError") >= 1
    assert f"its lease {lease_id} was released" in captured.stdout + captured.stderr


def test_cell_lease_released_after_an_interrupt(shell: InteractiveShell) -> None:
    result, captured = run(shell, "%%chronos 1G 5m\nimport chronos\n"
                                  "seen = [l.id for l in chronos.leases()]\nraise KeyboardInterrupt")
    assert isinstance(result.error_in_exec, CellFailed)
    [lease_id] = shell.user_ns["seen"]
    assert chronos.get_lease(lease_id).state == "released"
    assert "was interrupted" in captured.stdout + captured.stderr


def test_cell_lease_beside_a_kernel_lease_restores_its_environment(shell: InteractiveShell) -> None:
    run(shell, "%chronos reserve 1G 10m --gpu 0")
    [kernel_lease] = own_active()
    kernel_limit = os.environ["CUPY_GPU_MEMORY_LIMIT"]
    result, _ = run(shell, "%%chronos 4G 5m\nimport os\ninside = os.environ['CUPY_GPU_MEMORY_LIMIT']")
    assert result.success, result.error_in_exec
    assert int(shell.user_ns["inside"]) > int(kernel_limit)  # the cell ran under its own, larger lease
    assert os.environ["CUPY_GPU_MEMORY_LIMIT"] == kernel_limit
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(kernel_lease.device_uuids)
    assert os.environ["CHRONOS_LEASE_ID"] == kernel_lease.id
    assert [lease.id for lease in own_active()] == [kernel_lease.id]


# -- mistakes become one-line UsageErrors ----------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("%chronos frobnicate", "unknown command 'frobnicate'"),
    ("%chronos reserve", "%chronos reserve 8G 2h"),
    ("%chronos reserve 1G 10m --gpu x", "--gpu 0,1"),
    ("%chronos reserve 1G 10m --gpu 0 --gpus 2", "not both"),
    ("%chronos reserve 1G 10m --prefer first", "--prefer 0,1"),
    ("%chronos reserve 1G 10m --bogus", "unrecognized arguments: --bogus"),
    ("%chronos reserve 1G 10m --wait soon", "--wait 10m"),
    ("%chronos reserve 12 10m", "12G"),
    ("%chronos reserve 1G forever", "2h"),
    ("%chronos reserve 1G 10m --priority urgent", "low, normal, high"),
    ("%chronos reserve 500G 10m", "500"),
    ("%chronos release", "%chronos reserve 8G 2h"),
    ("%chronos extend", "%chronos extend 30m"),
    ("%chronos extend 30m", "%chronos reserve 8G 2h"),
    ("%chronos status nosuchlease", "nosuchlease"),
    ("%chronos reserve '1G", "%chronos help"),
    ("%%chronos\nprint(1)", "%%chronos 8G 2h"),
])
def test_mistakes_are_one_line_usage_errors(shell: InteractiveShell, source: str, expected: str) -> None:
    message = usage_error(shell, source)
    assert expected in message
    assert "\n" not in message


def test_a_second_reserve_says_what_to_do(shell: InteractiveShell) -> None:
    run(shell, "%chronos reserve 1G 10m")
    message = usage_error(shell, "%chronos reserve 1G 10m")
    assert "%chronos release" in message
    assert len(own_active()) == 1


def test_unavailable_is_a_usage_error_not_a_traceback(shell: InteractiveShell) -> None:
    big = chronos.reserve("79G", "10m", device=0, bind=False)
    also = chronos.reserve("79G", "10m", device=1, bind=False)
    try:
        message = usage_error(shell, "%chronos reserve 8G 10m")
        assert message
    finally:
        big.release()
        also.release()


def test_wait_queues_until_memory_is_free(shell: InteractiveShell) -> None:
    big = chronos.reserve("79G", "10m", device=0, bind=False)
    also = chronos.reserve("79G", "10m", device=1, bind=False)
    try:
        result, captured = run(shell, "%chronos reserve 8G 10m --wait 1s")
        assert isinstance(result.error_in_exec, UsageError)
        assert "gave up after waiting" in str(result.error_in_exec)
        assert "chronos: position 1" in captured.stdout
        assert [lease.id for lease in own_active()] == sorted([big.id, also.id], key=int)
        assert [lease.state for lease in chronos.leases()].count("queued") == 0  # withdrawn
    finally:
        big.release()
        also.release()
    result, captured = run(shell, "%chronos reserve 8G 10m --wait 5s")
    assert result.success, result.error_in_exec
    assert "waiting in the queue" in captured.stdout


# -- the kernel's own lease (set by the provisioner) -----------------------------------------


def test_status_shows_the_kernel_lease_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    outer = chronos.reserve("2G", "20m", bind=False, label="kernel")
    monkeypatch.setenv("CHRONOS_LEASE_ID", outer.id)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chronos_jupyter")
    try:
        result, captured = run(ip, "%chronos status")
        assert result.success, result.error_in_exec
        assert f"Chronos lease {outer.id} (kernel)" in captured.outputs[0].data["text/plain"]
        message = usage_error(ip, "%chronos reserve 1G 10m")
        assert outer.id in message and "%chronos status" in message
        result, _ = run(ip, "%chronos extend 10m")
        assert result.success, result.error_in_exec
        assert chronos.get_lease(outer.id).remaining > 25 * 60
    finally:
        ip.run_line_magic("unload_ext", "chronos_jupyter")
        outer.release()


# -- terminal IPython, loaded from the config --------------------------------------------------


def test_terminal_ipython_loads_from_config_and_prints_text() -> None:
    """``c.InteractiveShellApp.extensions`` loads it; a terminal shows the widget's text form."""
    source = "%chronos reserve 1G 10m\nimport chronos\nprint('held', [l.id for l in chronos.leases()])\n"
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "--HistoryManager.enabled=False",
         "--InteractiveShellApp.extensions=['chronos_jupyter']", "--quick", "--simple-prompt"],
        input=source, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Chronos lease 1: GPU 0, active" in proc.stdout
    assert "left (ends" in proc.stdout
    assert "held ['1']" in proc.stdout
    assert "VBox" not in proc.stdout
    # The lease was bound to the ipython process, which has exited: it is no longer active.
    assert chronos.get_lease("1").state != "active"


# -- a real kernel through jupyter_client ----------------------------------------------------


class Kernel:
    """A real IPython kernel started through jupyter_client, with this test's environment."""

    def __init__(self, kernel_name: str = "python3") -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=kernel_name)
        self.km.start_kernel(env=dict(os.environ))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        provisioner = self.km.provisioner
        assert provisioner is not None
        return int(provisioner.pid)  # type: ignore[attr-defined]

    def execute(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run ``code``; return the execute_reply content and the iopub messages it caused."""
        msg_id = self.kc.execute(code)
        outputs: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no idle status within {timeout}s for {code!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            outputs.append(msg)
        while True:  # skip replies to earlier requests (kernel_info from wait_for_ready)
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], outputs

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def text_of(outputs: list[dict[str, Any]]) -> str:
    parts = []
    for msg in outputs:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            parts.append(content["text"])
        elif msg["msg_type"] in ("display_data", "execute_result"):
            parts.append(content["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            parts.append("\n".join(content["traceback"]))
    return "\n".join(parts)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        reply, _ = k.execute("%load_ext chronos_jupyter")
        assert reply["status"] == "ok"
        yield k
    finally:
        k.stop()


@pytest.mark.slow
def test_kernel_reserve_status_extend_release(kernel: Kernel) -> None:
    reply, outputs = kernel.execute("%chronos reserve 1G 5m")
    assert reply["status"] == "ok", text_of(outputs)
    [lease] = chronos.leases()
    assert lease.pid == kernel.pid  # bound to the kernel process, not to this test
    displays = [m for m in outputs if m["msg_type"] == "display_data"]
    assert len(displays) == 1
    assert WIDGET_MIME in displays[0]["content"]["data"]
    comm_opens = [m for m in outputs if m["msg_type"] == "comm_open"]
    assert comm_opens, "the widget models reach the front end"

    # Between cells the widget's thread moves the countdown by itself, through comm messages.
    countdowns: set[str] = set()
    kinds: set[str] = set()

    def three_countdowns() -> bool:  # reads one message a call, waiting up to a second for it
        try:
            msg = kernel.kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            return False
        kinds.add(msg["msg_type"])
        if msg["msg_type"] == "comm_msg":
            value = msg["content"]["data"].get("state", {}).get("value", "")
            if isinstance(value, str) and "left (ends" in value:
                countdowns.add(value)
        return len(countdowns) >= 3

    wait_for(three_countdowns, timeout=15, interval=0, what=lambda: f"three countdowns, seen {countdowns}")
    assert kinds == {"comm_msg"}  # the thread only sets traits: no output lands in any cell

    reply, outputs = kernel.execute("%chronos status")
    assert reply["status"] == "ok"
    assert f"Chronos lease {lease.id}" in text_of(outputs)

    reply, outputs = kernel.execute("%chronos extend 30m")
    assert reply["status"] == "ok", text_of(outputs)
    assert chronos.get_lease(lease.id).remaining > 30 * 60

    reply, outputs = kernel.execute("%chronos release")
    assert reply["status"] == "ok", text_of(outputs)
    assert chronos.get_lease(lease.id).state == "released"


@pytest.mark.slow
def test_kernel_lease_ends_with_the_kernel(kernel: Kernel) -> None:
    reply, _ = kernel.execute("%chronos reserve 1G 10m")
    assert reply["status"] == "ok"
    [lease] = chronos.leases()
    kernel.km.shutdown_kernel(now=True)
    assert chronos.get_lease(lease.id).state in ("revoked", "released")
    assert chronos.leases() == []


@pytest.mark.slow
def test_kernel_cell_lease_released_after_an_exception(kernel: Kernel) -> None:
    reply, outputs = kernel.execute("%%chronos 1G 5m\nimport chronos\nseen = chronos.leases()[0].id\n1/0")
    assert reply["status"] == "error"
    errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
    assert [e["ename"] for e in errors] == ["ZeroDivisionError", "CellFailed"]
    assert errors[1]["traceback"] == [errors[1]["evalue"]]
    reply, outputs = kernel.execute("print(seen)")
    lease_id = text_of(outputs).strip()
    assert chronos.get_lease(lease_id).state == "released"


@pytest.mark.slow
def test_kernel_usage_error_has_no_traceback(kernel: Kernel) -> None:
    reply, outputs = kernel.execute("%chronos reserve 1G 10m --gpu x")
    assert reply["status"] == "error"
    assert reply["ename"] == "UsageError"
    assert "--gpu 0,1" in reply["evalue"]
    shown = text_of(outputs)
    assert "Traceback" not in shown
    assert "UsageError" in shown and "--gpu 0,1" in shown
    assert len([line for line in shown.splitlines() if line.strip()]) == 1
    assert chronos.leases() == []


@pytest.mark.slow
def test_kernel_watchdog_interrupts_a_cell_over_the_cap(kernel: Kernel) -> None:
    reply, outputs = kernel.execute("%chronos reserve 1G 10m")
    assert reply["status"] == "ok", text_of(outputs)
    [lease] = chronos.leases()
    # The kernel claims 2 GiB of its simulated GPU, over the 1 GiB cap, and keeps working.
    code = (
        "from chronos.devices import simulated\n"
        f"simulated.allocate({lease.devices[0]}, '2G')\n"
        "import time\n"
        "for _ in range(600):\n"
        "    time.sleep(0.1)\n"
    )
    started = time.monotonic()
    reply, outputs = kernel.execute(code, timeout=60)
    assert reply["status"] == "error"
    assert reply["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 30  # interrupted after the grace period, not at the loop's end
    reply, outputs = kernel.execute(f"simulated.free({lease.devices[0]})\nprint('still here')")
    assert "still here" in text_of(outputs)  # the kernel survives; only the cell was stopped
    assert chronos.get_lease(lease.id).state == "active"


@pytest.mark.slow
def test_kernel_stopped_at_the_end_of_its_lease(kernel: Kernel) -> None:
    """With the default on_expiry (terminate) the watchdog stops the kernel when its lease ends."""
    reply, outputs = kernel.execute("%chronos reserve 1G 3s")
    assert reply["status"] == "ok", text_of(outputs)
    [lease] = chronos.leases()
    wait_for(lambda: not kernel.km.is_alive(), timeout=30, interval=0.2, what="the watchdog to stop the kernel")
    assert chronos.get_lease(lease.id).state == "expired"


@pytest.mark.slow
def test_kernel_started_inside_a_lease_by_the_provisioner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel from a Chronos kernelspec: %chronos status shows its lease; reserve points there."""
    from chronos_jupyter.kernelspec import install_kernel

    install_kernel("chronos-test", "2G", "20m", prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    k = Kernel("chronos-test")
    try:
        [lease] = chronos.leases()
        assert lease.pid == k.pid
        reply, outputs = k.execute("%load_ext chronos_jupyter\n%chronos status")
        assert reply["status"] == "ok", text_of(outputs)
        assert f"Chronos lease {lease.id}" in text_of(outputs)
        assert "2 GiB" in text_of(outputs)
        reply, outputs = k.execute("%chronos reserve 1G 10m")
        assert reply["status"] == "error"
        assert f"already runs inside lease {lease.id}" in reply["evalue"]
        reply, outputs = k.execute("%chronos extend 10m")
        assert reply["status"] == "ok", text_of(outputs)
        assert chronos.get_lease(lease.id).remaining > 25 * 60
        assert len(chronos.leases()) == 1
    finally:
        k.stop()
    assert chronos.get_lease(lease.id).state != "active"


# -- on a real GPU, with PyTorch where it is installed ------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_kernel_sees_only_its_gpu_and_is_capped(kernel: Kernel) -> None:
    pytest.importorskip("torch")
    reply, outputs = kernel.execute("%chronos reserve 4G 10m")
    assert reply["status"] == "ok", text_of(outputs)
    code = (
        "import torch\n"
        "print('devices', torch.cuda.device_count())\n"
        "fits = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    torch.empty(6 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "    print('not capped')\n"
        "except torch.cuda.OutOfMemoryError:\n"
        "    print('capped')\n"
    )
    reply, outputs = kernel.execute(code, timeout=120)
    assert reply["status"] == "ok", text_of(outputs)
    shown = text_of(outputs)
    assert "devices 1" in shown
    assert "capped" in shown and "not capped" not in shown


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_reserve_after_cuda_started_warns(kernel: Kernel) -> None:
    pytest.importorskip("torch")
    reply, outputs = kernel.execute("import torch\ntorch.zeros(1, device='cuda')\nprint(torch.cuda.is_initialized())")
    assert "True" in text_of(outputs)
    reply, outputs = kernel.execute("%chronos reserve 1G 10m\nimport os\nprint(os.environ.get('CUDA_VISIBLE_DEVICES'))")
    assert reply["status"] == "ok", text_of(outputs)
    shown = text_of(outputs)
    assert "torch has already initialised CUDA" in shown and "restart the kernel" in shown
    assert "None" in shown  # the variable is left alone: it could not take effect any more

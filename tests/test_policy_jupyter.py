"""The lab policies in the Jupyter layer: %chronos claim, idle since in the widget, idle rules per kernelspec."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import chronos
import chronos_jupyter
from chronos.model import IdleNotice, OnIdle
from chronos_jupyter.kernelspec import kernel_json, main
from chronos_jupyter.provisioner import ChronosProvisioner
from chronos_jupyter.widgets import lease_view, render_text

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chronos_jupyter")
    yield ip
    lease = chronos_jupyter.current_lease()
    ip.run_line_magic("unload_ext", "chronos_jupyter")
    if lease is not None and lease.state in ("active", "queued"):
        lease.release()
    for key in list(os.environ):
        if key in ("CUDA_VISIBLE_DEVICES", "CHRONOS_LEASE_ID") or key.startswith(("XLA_", "CUPY_", "PYTORCH_CUDA")):
            os.environ.pop(key, None)


def test_claim_makes_a_booking_this_kernels_lease(shell: InteractiveShell) -> None:
    booking = chronos.book("4G", "30m", "now", label="lab session")
    with capture_output() as captured:
        result = shell.run_cell(f"%chronos claim {booking.id}", store_history=False)
    assert result.error_in_exec is None, captured.stderr
    lease = chronos_jupyter.current_lease()
    assert lease is not None and lease.id == booking.id and lease.state == "active"
    assert lease.pid == os.getpid()  # bound to the kernel, as %chronos reserve binds
    assert os.environ["CUDA_VISIBLE_DEVICES"] == lease.device_uuids[0]
    assert any(WIDGET_MIME in o.data for o in captured.outputs)
    with capture_output() as captured:
        again = shell.run_cell(f"%chronos claim {booking.id}", store_history=False)
    assert again.error_in_exec is not None and "already holds lease" in str(again.error_in_exec)


def test_claim_of_a_booking_to_come_is_a_usage_error(shell: InteractiveShell) -> None:
    later = chronos.book("4G", "30m", "+2h")
    with capture_output() as captured:
        result = shell.run_cell(f"%chronos claim {later.id}", store_history=False)
    assert "claim it then" in str(result.error_in_exec) and "Traceback" not in captured.stderr
    with capture_output():
        missing = shell.run_cell("%chronos claim", store_history=False)
    assert "say which booking" in str(missing.error_in_exec)


def test_the_widget_says_idle_since_and_when_the_policy_acts() -> None:
    lease = chronos.reserve("1G", "1h", bind=False)
    record = lease.record
    start = record.started_at or 0.0
    idle = chronos.Lease(replace(record, idle_since=start, idle_warning=IdleNotice(start, OnIdle.RELEASE, start + 600)),
                         lease.engine)
    view = lease_view(idle)
    assert view.idle_since == record.started_at
    assert "idle since" in view.time_text and "unless the GPU is used or the lease extended" in view.time_text
    assert "idle since" in render_text(view)
    assert lease_view(lease).idle_since is None


def test_kernelspecs_carry_their_own_idle_rule(tmp_path: object) -> None:
    doc = kernel_json(memory="8G", duration="2h", display_name="x", idle_after="20m", on_idle="terminate")
    config = doc["metadata"]["kernel_provisioner"]["config"]
    assert config["idle_after"] == "20m" and config["on_idle"] == "terminate"
    assert "idle_after" not in kernel_json(memory="8G", duration="2h", display_name="x")["metadata"][
        "kernel_provisioner"]["config"]
    assert main(["install-kernel", "--name", "g", "--memory", "8G", "--on-idle", "release",
                 "--prefix", str(tmp_path)]) == 2  # --on-idle needs --idle-after
    provisioner = ChronosProvisioner(memory="8G", duration="2h", idle_after="20m", on_idle="terminate")
    spec = provisioner.request()
    assert spec.idle_after_s == 1200 and spec.on_idle == OnIdle.TERMINATE

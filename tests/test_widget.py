"""The lease widget against real leases, real processes and the simulated GPU backend."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import chronos
from chronos.devices import simulated
from chronos.units import format_clock
from chronos_jupyter.widgets import (
    CRITICAL_S,
    WARNING_S,
    LeaseWidget,
    lease_view,
    render_html,
    render_text,
)
from tests.waiting import wait_for

GiB = 1 << 30


@pytest.fixture
def lease() -> Iterator[chronos.Lease]:
    held = chronos.reserve("4G", "2h", bind=True, label="train")
    yield held
    if held.refresh().state == "active":
        held.release()
    simulated.free(held.devices[0])


# -- the facts -------------------------------------------------------------------------------


def test_levels_follow_the_time_left(lease: chronos.Lease) -> None:
    assert lease.expires_at is not None
    end = lease.expires_at
    assert lease_view(lease, now=end - 3600).level == "ok"
    assert lease_view(lease, now=end - WARNING_S + 1).level == "warning"
    assert lease_view(lease, now=end - CRITICAL_S + 1).level == "critical"
    past = lease_view(lease, now=end + 1)
    assert past.level == "ended" and past.remaining_s == 0
    assert past.time_text.startswith("expired at ")


def test_text_and_html_carry_the_same_facts(lease: chronos.Lease) -> None:
    view = lease_view(lease, used_bytes=GiB)
    text = render_text(view)
    assert f"Chronos lease {lease.id} (train): GPU {lease.devices[0]}, active" in text
    assert "1 GiB used of 4 GiB" in text
    clock = format_clock(lease.expires_at)
    assert f"(ends {clock}" in text
    page = render_html(view)
    for fact in (lease.id, "train", "1 GiB used of 4 GiB", f"(ends {clock}"):
        assert fact in page
    assert "width:25.0%" in page  # the bar: a quarter of the cap
    soon = render_text(lease_view(lease, used_bytes=5 * GiB, now=(lease.expires_at or 0) - 30))
    assert "ending soon" in soon and "OVER THE CAP" in soon


def _used(lease: chronos.Lease) -> int:
    return sum(n or 0 for n in lease.usage().values())


@pytest.mark.usefixtures("both_modes")
def test_memory_used_counts_the_holder_tree_only(lease: chronos.Lease) -> None:
    """The holder and its descendants count, on the lease's devices only; its parent does not."""
    spawn_grandchild = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", spawn_grandchild], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    grandchild = int(holder.stdout.readline())
    device, other = lease.devices[0], 1 - lease.devices[0]
    try:
        lease.bind(holder.pid)
        assert _used(lease) == 0
        simulated.allocate(device, GiB, pid=holder.pid)
        simulated.allocate(device, 2 * GiB, pid=grandchild)
        simulated.allocate(device, 8 * GiB, pid=os.getpid())  # the holder's parent: not the lease's
        simulated.allocate(other, 4 * GiB, pid=holder.pid)  # another device: not the lease's
        assert _used(lease) == 3 * GiB
    finally:
        for pid in (holder.pid, grandchild, os.getpid()):
            simulated.free(device, pid=pid)
        simulated.free(other, pid=holder.pid)
        os.kill(grandchild, 9)
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_unbound_lease_counts_its_owners_processes() -> None:
    """With no holder, the owner's only unbound lease is given the owner's GPU processes."""
    unbound = chronos.reserve("4G", "10m", bind=False)
    try:
        assert _used(unbound) == 0
        simulated.allocate(unbound.devices[0], GiB)
        assert _used(unbound) == GiB
        assert "1 GiB used of 4 GiB" in lease_view(unbound, _used(unbound)).memory_text
    finally:
        simulated.free(unbound.devices[0])
        unbound.release()


def test_hidden_use_is_unknown() -> None:
    view = lease_view(chronos.reserve("1G", "10m", bind=False), None)
    assert view.used_bytes is None and "use unknown" in view.memory_text


# -- the live widget -------------------------------------------------------------------------


@pytest.mark.usefixtures("both_modes")
def test_widget_traits_follow_the_lease(lease: chronos.Lease) -> None:
    widget = LeaseWidget(lease, start=False)
    try:
        assert f"<code>{lease.id}</code>" in widget.title.value
        assert "left (ends" in widget.countdown.value
        assert widget.memory_bar.max == 4 * GiB
        assert widget.memory_bar.value == 0
        simulated.allocate(lease.devices[0], 3 * GiB)
        widget.update()
        assert widget.memory_bar.value == 3 * GiB
        assert "3 GiB used of 4 GiB" in widget.memory_label.value
        simulated.allocate(lease.devices[0], 5 * GiB)
        widget.update()
        assert widget.memory_bar.bar_style == "danger"
        assert "over the cap" in widget.memory_label.value
        assert widget.time_bar.bar_style == "success"
        assert 0.99 < widget.time_bar.value <= 1.0
        assert "chronos-active" in widget.box._dom_classes
        chronos.release(lease.id)
        view = widget.update()
        assert view.ended
        assert "released at" in widget.countdown.value
        assert widget.release_button.disabled and widget.extend_button.disabled
        assert "chronos-ended" in widget.box._dom_classes
        assert widget.time_bar.value == 0
    finally:
        widget.close()


def test_widget_warns_near_the_end() -> None:
    short = chronos.reserve("1G", "50s", bind=True)
    widget = LeaseWidget(short, start=False)
    try:
        assert widget.view.level == "critical"
        assert widget.time_bar.bar_style == "danger"
        assert "<b>" in widget.countdown.value
        assert "ending soon" in repr(widget)
    finally:
        widget.close()
        short.release()


def test_thread_moves_the_countdown_and_stops_at_the_end() -> None:
    short = chronos.reserve("1G", "3s", bind=True)
    widget = LeaseWidget(short, interval=0.2)
    try:
        first = widget.countdown.value
        assert widget.running
        wait_for(lambda: widget.countdown.value != first, timeout=5, what="the countdown to move")
        # The lease expires by itself; the thread shows it and then stops.
        wait_for(lambda: widget.view.ended, timeout=10, what="the widget to show the lease ended")
        assert "expired" in widget.countdown.value
        wait_for(lambda: not widget.running, timeout=5, what="the widget's thread to stop")
        assert chronos.get_lease(short.id).state == "expired"
    finally:
        widget.close()


@pytest.mark.usefixtures("both_modes")
def test_buttons_release_and_extend(lease: chronos.Lease) -> None:
    widget = LeaseWidget(lease, start=False, extend_step="15m")
    try:
        before = chronos.get_lease(lease.id).expires_at
        assert before is not None
        widget.extend_button.click()
        after = chronos.get_lease(lease.id).expires_at
        assert after is not None and after - before == pytest.approx(900, abs=1)
        assert "extended by 15m" in widget.message.value
        widget.release_button.click()
        assert chronos.get_lease(lease.id).state == "released"
        assert widget.view.ended
    finally:
        widget.close()


@pytest.mark.usefixtures("both_modes")
def test_button_errors_show_in_the_widget(lease: chronos.Lease) -> None:
    def refuse(_step: str) -> None:
        raise chronos.NotAllowedError("extension refused: the policy allows at most 2h")

    widget = LeaseWidget(lease, start=False, extend=refuse)
    try:
        widget.extend_button.click()
        assert "extension refused" in widget.message.value
        assert chronos.get_lease(lease.id).state == "active"
    finally:
        widget.close()


def test_display_forms(lease: chronos.Lease) -> None:
    widget = LeaseWidget(lease, start=False)
    try:
        bundle = widget._repr_mimebundle_()
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.box.model_id
        assert bundle["text/plain"] == repr(widget) == render_text(widget.view)
        assert bundle["text/html"] == widget._repr_html_()
        from IPython.lib.pretty import pretty

        assert pretty(widget) == repr(widget)
    finally:
        widget.close()


def test_release_that_stops_the_kernel_asks_first(lease: chronos.Lease) -> None:
    """A kernel's own lease: the first click says what will happen, the second releases."""
    widget = LeaseWidget(lease, start=False, confirm_release="Releasing lease stops this kernel. Click again.")
    widget.release_button.click()
    assert lease.refresh().state == "active"
    assert widget.message.value == "Releasing lease stops this kernel. Click again."
    assert widget.release_button.description == "Release and stop kernel"
    widget.release_button.click()
    assert lease.refresh().state == "released"
    assert widget.release_button.disabled


def test_an_ended_lease_shows_as_ended_with_no_live_buttons(lease: chronos.Lease) -> None:
    widget = LeaseWidget(lease, start=True, interval=0.05)
    widget.show_ended("lease ended: this kernel is being stopped")
    assert widget.release_button.disabled and widget.extend_button.disabled
    assert "chronos-ended" in widget.box._dom_classes and "chronos-active" not in widget.box._dom_classes
    assert "this kernel is being stopped" in widget.countdown.value
    if widget._thread is not None:
        widget._thread.join(5)
    assert not widget.running
    widget.close()

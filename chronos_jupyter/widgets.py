"""The live lease widget: time left, GPU memory used against the cap, Release and Extend.

Only standard ipywidgets are used (no custom JavaScript), so the widget renders in
JupyterLab, Notebook 7 and VS Code alike. A background thread refreshes it about once
a second and only ever sets widget traits: it never displays anything, so output never
lands in whichever cell happens to be running. Front ends without a widget manager
(terminal IPython, static HTML) get a text or HTML rendering of the same facts.
"""

from __future__ import annotations

import contextlib
import html
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import chronos
from chronos import threads
from chronos.model import LeaseState
from chronos.status import used_total
from chronos.text import plain
from chronos.units import format_bytes, format_clock, format_duration

__all__ = [
    "CRITICAL_S",
    "WARNING_S",
    "LeaseView",
    "LeaseWidget",
    "lease_view",
    "render_html",
    "render_text",
]

#: Under this many seconds left the widget turns amber.
WARNING_S = 600.0
#: Under this many seconds left the widget turns red.
CRITICAL_S = 60.0

_ENDED_WORDS = {
    LeaseState.RELEASED: "released",
    LeaseState.EXPIRED: "expired",
    LeaseState.REVOKED: "ended: its holder process exited",
    LeaseState.WITHDRAWN: "withdrawn from the queue",
}
#: What the widget shows a lease as: its colour and bar style follow.
Level = Literal["queued", "ok", "warning", "critical", "ended"]


@dataclass(frozen=True)
class LeaseView:
    """What the widget shows at one instant, computed once and rendered three ways."""

    lease_id: str
    devices: tuple[int, ...]
    state: LeaseState
    label: str | None
    priority: str
    remaining_s: float
    duration_s: float
    expires_at: float | None
    ended_at: float | None
    cap_bytes: int
    used_bytes: int | None
    level: Level
    #: Since when the lease's processes used no GPU time (the idle policy's view), if they did not.
    idle_since: float | None = None
    #: When the idle policy will end the lease, after its warning.
    idle_action_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.level == "ended"

    @property
    def devices_text(self) -> str:
        if not self.devices:
            return "no GPU yet"
        noun = "GPU" if len(self.devices) == 1 else "GPUs"
        return f"{noun} {', '.join(str(d) for d in self.devices)}"

    @property
    def time_text(self) -> str:
        """The countdown line, e.g. ``1h 12m left (ends 14:32:05)``."""
        if self.level == "queued":
            return f"queued for {format_duration(self.duration_s)}"
        if self.ended:
            word = _ENDED_WORDS.get(self.state, self.state)
            if self.state == LeaseState.ACTIVE:  # past its end, not yet reclaimed by the ledger
                word = "expired"
            when = self.ended_at if self.ended_at is not None else self.expires_at
            return f"{word} at {_clock(when)}" if when is not None else word
        text = f"{format_duration(self.remaining_s)} left (ends {_clock(self.expires_at)})"
        if self.idle_since is not None:
            text += f" · {self.idle_text}"
        return text

    @property
    def idle_text(self) -> str:
        """``idle since 14:02``, with when the idle policy acts once it has warned."""
        if self.idle_since is None:
            return ""
        text = f"idle since {format_clock(self.idle_since)}"
        if self.idle_action_at is not None:
            text += f"; ends at {format_clock(self.idle_action_at)} unless the GPU is used or the lease extended"
        return text

    @property
    def memory_text(self) -> str:
        cap = format_bytes(self.cap_bytes)
        if len(self.devices) > 1:
            cap = f"{cap} ({format_bytes(self.cap_bytes // len(self.devices))} x {len(self.devices)})"
        if self.used_bytes is None:
            return f"cap {cap}; use unknown (no holder process)"
        return f"{format_bytes(self.used_bytes)} used of {cap}"

    @property
    def over_cap(self) -> bool:
        return self.used_bytes is not None and self.used_bytes > self.cap_bytes


def _clock(epoch: float | None) -> str:
    return format_clock(epoch, seconds=True)


def lease_view(lease: chronos.Lease, used_bytes: int | None = None, now: float | None = None) -> LeaseView:
    """The facts to show for ``lease`` at ``now`` (default: the current time)."""
    now = time.time() if now is None else now
    level: Level
    if lease.state == LeaseState.QUEUED or lease.expires_at is None:
        remaining = lease.duration_s
        level = "queued" if lease.state == LeaseState.QUEUED else "ended"
    else:
        remaining = max(0.0, lease.expires_at - now) if lease.state == LeaseState.ACTIVE else 0.0
        if lease.state != LeaseState.ACTIVE or remaining <= 0:
            level = "ended"
        elif remaining < CRITICAL_S:
            level = "critical"
        elif remaining < WARNING_S:
            level = "warning"
        else:
            level = "ok"
    return LeaseView(
        lease_id=lease.id,
        devices=tuple(lease.devices),
        state=lease.state,
        label=plain(lease.label) if lease.label else None,  # escaped once for every renderer
        priority=lease.priority,
        remaining_s=remaining,
        duration_s=lease.duration_s,
        expires_at=lease.expires_at,
        ended_at=lease.ended_at,
        cap_bytes=lease.memory_bytes * max(1, len(lease.devices)),
        used_bytes=used_bytes,
        level=level,
        idle_since=lease.idle_since if level not in ("ended", "queued") else None,
        idle_action_at=lease.idle_warning.action_at if lease.idle_warning is not None and level != "ended" else None,
    )


def render_text(view: LeaseView) -> str:
    """A few plain lines for terminals and logs."""
    title = f"Chronos lease {view.lease_id}"
    if view.label:
        title += f" ({view.label})"
    lines = [f"{title}: {view.devices_text}, {view.state}", f"  time:   {view.time_text}"]
    memory = view.memory_text
    if view.over_cap:
        memory += "  OVER THE CAP"
    lines.append(f"  memory: {memory}")
    if view.level in ("warning", "critical"):
        lines.append("  ending soon: save your work or type %chronos extend 30m")
    return "\n".join(lines)


_COLOURS = {
    "ok": "#2e7d32", "queued": "#1565c0", "warning": "#ef6c00", "critical": "#c62828", "ended": "#616161",
}


def render_html(view: LeaseView) -> str:
    """A static HTML card with the same facts, for front ends without a widget manager."""
    colour = _COLOURS[view.level]
    esc = html.escape
    label = f" <i>{esc(view.label)}</i>" if view.label else ""
    pct = 0.0
    if view.used_bytes is not None and view.cap_bytes:
        pct = min(100.0, 100.0 * view.used_bytes / view.cap_bytes)
    warning = ""
    if view.level in ("warning", "critical"):
        warning = "<div><b>Ending soon:</b> save your work or type <code>%chronos extend 30m</code>.</div>"
    return (
        f'<div class="chronos-lease" style="border-left:4px solid {colour};padding:4px 8px;'
        'font-family:sans-serif">'
        f"<div><b>Chronos lease</b> <code>{esc(view.lease_id)}</code>{label} &middot; "
        f"{esc(view.devices_text)} &middot; {esc(view.state)}</div>"
        f'<div style="color:{colour}">{esc(view.time_text)}</div>'
        f"<div>{esc(view.memory_text)}</div>"
        f'<div style="background:#e0e0e0;width:240px;height:8px">'
        f'<div style="background:{colour};width:{pct:.1f}%;height:8px"></div></div>'
        f"{warning}</div>"
    )


class LeaseWidget:
    """A live view of one lease, with Release and Extend buttons.

    Display it like any object (``display(widget)`` or as a cell's last expression).
    ``release`` and ``extend`` override what the buttons do (the ``%chronos`` magic
    passes its own, so its bookkeeping stays right); by default they act on the lease. With
    ``confirm_release`` (a kernel's own lease, whose release stops the kernel) the first click on
    Release only shows that text and turns the button into "Release and stop kernel".
    """

    def __init__(
        self,
        lease: chronos.Lease,
        *,
        interval: float = 1.0,
        extend_step: str = "30m",
        release: Callable[[], object] | None = None,
        extend: Callable[[str], object] | None = None,
        confirm_release: str | None = None,
        start: bool = True,
    ) -> None:
        import ipywidgets as w

        self.lease_id = lease.id
        self.interval = interval
        self.extend_step = extend_step
        self._lease = lease
        self._release_fn = release
        self._extend_fn = extend
        self._confirm_release = confirm_release
        self._armed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._message_text = ""
        self.updates = 0
        self.view = lease_view(lease)

        self.title = w.HTML()
        self.countdown = w.HTML()
        self.countdown.add_class("chronos-countdown")
        bar_style = {"description_width": "90px"}
        self.time_bar = w.FloatProgress(min=0.0, max=1.0, value=0.0, description="time left",
                                        style=bar_style, layout=w.Layout(width="380px"))
        self.memory_bar = w.FloatProgress(min=0.0, max=1.0, value=0.0, description="GPU memory",
                                          style=bar_style, layout=w.Layout(width="380px"))
        self.memory_label = w.HTML()
        self.memory_label.add_class("chronos-memory")
        self.release_button = w.Button(description="Release", button_style="danger", icon="stop",
                                       tooltip="End the lease now (answers between cells)")
        self.extend_button = w.Button(description=f"Extend {extend_step}", icon="clock-o",
                                      tooltip=f"Add {extend_step} to the lease (answers between cells)")
        self.message = w.HTML()
        self.release_button.on_click(lambda _b: self._on_release())
        self.extend_button.on_click(lambda _b: self._on_extend())
        self.box = w.VBox([
            self.title,
            self.countdown,
            self.time_bar,
            w.HBox([self.memory_bar, self.memory_label]),
            w.HBox([self.release_button, self.extend_button]),
            self.message,
        ])
        self.box.add_class("chronos-lease")
        self.update()
        if start:
            self.start()

    # -- refreshing ----------------------------------------------------------------------
    def refresh_view(self) -> LeaseView:
        """Read the lease and its memory use again (the figure the watchdog enforces); no widget is touched."""
        lease = self._lease
        with contextlib.suppress(chronos.ChronosError):
            lease.refresh()
        used: int | None = self.view.used_bytes
        if lease.state == LeaseState.ACTIVE:
            try:
                used = used_total(lease.usage())
            except chronos.ChronosError:
                used = None
        return lease_view(lease, used)

    def update(self) -> LeaseView:
        """Refresh the facts and set the widget's traits to match."""
        with self._lock:
            view = self.refresh_view()
            self._apply(view)
            self.view = view
            self.updates += 1
            return view

    def _apply(self, view: LeaseView) -> None:
        colour = _COLOURS[view.level]
        label = f" <i>{html.escape(view.label)}</i>" if view.label else ""
        self.title.value = (
            f"<b>Chronos lease</b> <code>{html.escape(view.lease_id)}</code>{label} &middot; "
            f"{html.escape(view.devices_text)} &middot; {html.escape(view.state)}"
        )
        bold = ("<b>", "</b>") if view.level in ("warning", "critical") else ("", "")
        self.countdown.value = (
            f'<span style="color:{colour}">{bold[0]}{html.escape(view.time_text)}{bold[1]}</span>'
        )
        styles = {"ok": "success", "queued": "info", "warning": "warning", "critical": "danger", "ended": ""}
        self.time_bar.bar_style = styles[view.level]
        self.time_bar.value = 0.0 if view.ended else min(1.0, view.remaining_s / max(view.duration_s, 1e-9))
        self.memory_bar.max = float(max(view.cap_bytes, 1))
        self.memory_bar.value = float(min(view.used_bytes or 0, view.cap_bytes))
        self.memory_bar.bar_style = "danger" if view.over_cap else ("" if view.ended else "info")
        memory = html.escape(view.memory_text)
        self.memory_label.value = f"<b>{memory} - over the cap</b>" if view.over_cap else memory
        self.release_button.disabled = view.ended
        self.extend_button.disabled = view.ended or view.level == "queued"
        if view.ended:
            self.box.remove_class("chronos-active")
            self.box.add_class("chronos-ended")
        else:
            self.box.add_class("chronos-active")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                view = self.update()
            except Exception as exc:  # keep the thread alive; show why the view is stale
                self.notify(f"could not refresh: {exc}")
                continue
            if view.ended:
                break

    def start(self) -> None:
        """Start the ~1 Hz refresh thread (a daemon; it stops once the lease has ended)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"chronos-widget-{self.lease_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (the widget keeps its last state)."""
        self._stop.set()
        threads.join(self._thread, timeout=5)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop refreshing and close the widget models."""
        self.stop()
        for widget in self._all_widgets():
            widget.close()

    def _all_widgets(self) -> list[Any]:
        found: list[Any] = []
        pending: list[Any] = [self.box]
        while pending:
            widget = pending.pop()
            found.append(widget)
            pending.extend(getattr(widget, "children", ()))
        return found

    def show_ended(self, text: str) -> None:
        """The lease is over for this kernel (or the kernel is being stopped for it): say so, no buttons.

        Called before the kernel goes, so the front end keeps an ended widget, not a frozen countdown.
        """
        self._stop.set()
        with self._lock:
            self.countdown.value = f'<span style="color:{_COLOURS["ended"]}">{html.escape(text)}</span>'
            self.time_bar.value = 0.0
            self.time_bar.bar_style = ""
            self.release_button.disabled = True
            self.extend_button.disabled = True
            self.box.remove_class("chronos-active")
            self.box.add_class("chronos-ended")
        self.notify(text)

    # -- buttons (the kernel handles them between cells) ---------------------------------
    def notify(self, text: str) -> None:
        """Show one line under the lease (button results, watchdog events); safe from any thread."""
        self._message_text = text
        self.message.value = html.escape(text)

    def _on_release(self) -> None:
        if self._confirm_release is not None and not self._armed:
            # Releasing this lease stops the kernel: say so, and act only on a second click.
            self._armed = True
            self.release_button.description = "Release and stop kernel"
            self.notify(self._confirm_release)
            return
        try:
            if self._release_fn is not None:
                self._release_fn()
            else:
                self._lease.release()
        except chronos.ChronosError as exc:
            self.notify(str(exc))
        else:
            self.notify("released")
        self.update()

    def _on_extend(self) -> None:
        try:
            if self._extend_fn is not None:
                self._extend_fn(self.extend_step)
            else:
                self._lease.extend(self.extend_step)
        except chronos.ChronosError as exc:
            self.notify(str(exc))
        else:
            self.notify(f"extended by {self.extend_step}")
        self.update()

    # -- display -------------------------------------------------------------------------
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = dict(self.box._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/plain"] = render_text(self.view)
        bundle["text/html"] = render_html(self.view)
        return bundle

    def _repr_html_(self) -> str:
        return render_html(self.view)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(render_text(self.view))

    def __repr__(self) -> str:
        return render_text(self.view)

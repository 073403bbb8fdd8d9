"""``%chronos`` and ``%%chronos``: GPU leases from a notebook.

A lease taken with ``%chronos reserve`` is bound to the kernel process, so it ends when
the kernel dies; its caps are applied inside the kernel, a watchdog thread keeps an eye
on it, and a live widget shows it. ``%%chronos 4G 10m`` runs one cell under a lease that
is released when the cell ends, however it ends. Every mistake becomes a one-line
UsageError that says what to type instead; notebooks never see a traceback from here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display as _display

from chronos import api, settings, text
from chronos.enforce.activation import Activation
from chronos.enforce.watchdog import WatchdogEvent
from chronos.engine import WaitUpdate
from chronos.errors import ChronosError, as_chronos_error, with_hint
from chronos.lease import Lease
from chronos.model import Action, LeaseState
from chronos.request import RequestSpec, swapped_extend
from chronos.units import format_bytes, format_clock, format_duration
from chronos_jupyter.magic_words import RESERVE_USAGE, request_of, reserve_parser, split_words
from chronos_jupyter.notices import KERNEL_RELEASE, KERNEL_RELEASE_CONFIRM, KernelNotices, for_kernel
from chronos_jupyter.widgets import LeaseWidget

__all__ = ["HELP", "CellFailed", "ChronosMagics"]

display = cast(Callable[[object], None], _display)  # IPython's display() carries no annotations

HELP = f"""\
Chronos: time-limited, memory-capped GPU leases.

  {RESERVE_USAGE}
        take a lease for this kernel, e.g. %chronos reserve 8G 2h
  %chronos claim BOOKING       claim a booking of yours in its window, as this kernel's lease
  %chronos status [LEASE]      show this kernel's lease (or LEASE), live (also: %chronos show LEASE)
  %chronos list                the leases on this machine, and its GPUs
  %chronos extend [LEASE] DURATION
                               add time, e.g. %chronos extend 30m
  %chronos release [LEASE]     end this kernel's lease (or LEASE) now
  %chronos release --stop-kernel
                               end the lease of a kernel started inside one, which stops the kernel
  %chronos stats               usage so far: leases, GPU-hours, peak memory
  %chronos suggest             how much to ask for, for how long, and where
  %chronos help                this text

  %%chronos MEMORY [DURATION] [options]
        first line of a cell: run that cell under its own lease, released when it ends

MEMORY: 8G, 512M, 8GiB, 50%, or a bare fraction of each GPU (0.5; 1 is all of it).
DURATION: 2h, 90m, 1h30m, 45s (default 1h).
The widget's Release and Extend buttons answer between cells (the kernel is busy during one)."""

#: What the in-kernel watchdog does when the kernel's processes use more than the cap.
IN_KERNEL_OVERUSE = Action.INTERRUPT

_COMMANDS = ("reserve", "claim", "status", "show", "list", "release", "extend", "stats", "suggest", "help")


class CellFailed(Exception):
    """Marks a ``%%chronos`` cell whose body failed, without printing a second traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def _render_traceback_(self) -> list[str]:
        return [self.text]


def _queue_reporter() -> Callable[[WaitUpdate], None]:
    """Print the request's place in the queue whenever it changes (called in the waiting thread)."""
    last: list[tuple[int | None, str | None]] = []

    def report(update: WaitUpdate) -> None:
        start = _clock(update.estimated_start) if update.estimated_start else None
        if last and last[-1] == (update.position, start):
            return
        last.append((update.position, start))
        place = f"position {update.position}" if update.position is not None else "queued"
        when = f", expected to start about {start}" if start else ""
        print(f"chronos: {place}{when}", flush=True)

    return report


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        stream = sys.stderr if note.startswith("warning") else sys.stdout
        print(f"chronos: {note}", file=stream)


@contextmanager
def _core_errors() -> Iterator[None]:
    """Turn an error from the core (or the machine under it) into IPython's one-line UsageError."""
    try:
        yield
    except Exception as exc:  # a Chronos error, or a full disk or damaged ledger under it
        known = as_chronos_error(exc)
        if known is None:
            raise
        raise UsageError(text.plain(with_hint(known))) from None


@magics_class
class ChronosMagics(Magics):
    """The ``%chronos`` line magic and the ``%%chronos`` cell magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.lease: Lease | None = None
        self.widget: LeaseWidget | None = None
        self._activation: Activation | None = None
        self._widgets: list[LeaseWidget] = []
        # A kernel launched by the Chronos provisioner already runs inside this lease.
        self._env_error: str | None = None
        try:
            self.kernel_lease_id: str | None = settings.lease_id_from_env()
        except ChronosError as exc:  # said at every %chronos, never taken for "no lease"
            self.kernel_lease_id, self._env_error = None, str(exc)
        self.notices: KernelNotices | None = None
        if self.kernel_lease_id:
            self.notices = for_kernel(shell, self.kernel_lease_id, self._kernel_notice, self._kernel_lease_over)

    def _kernel_widgets(self) -> list[LeaseWidget]:
        return [w for w in self._widgets if w.lease_id == self.kernel_lease_id]

    def _kernel_notice(self, text: str) -> None:
        for widget in self._kernel_widgets():
            widget.notify(text)

    def _kernel_lease_over(self, text: str) -> None:
        for widget in self._kernel_widgets():
            widget.show_ended(text)

    # -- entry point ---------------------------------------------------------------------
    @line_cell_magic
    def chronos(self, line: str, cell: str | None = None) -> Any:
        """GPU leases: %chronos help lists the commands; %%chronos 4G 10m runs a cell under a lease."""
        if self._env_error is not None:
            raise UsageError(self._env_error)
        if cell is not None:
            return self._cell(line, cell)
        words = split_words(line)
        if not words:
            print(HELP)
            return None
        command, rest = words[0], words[1:]
        if command in ("-h", "--help"):
            command = "help"
        if command not in _COMMANDS:
            raise UsageError(f"unknown command {command!r}: type one of {', '.join(_COMMANDS)} (%chronos help)")
        handler = getattr(self, f"_cmd_{command}")
        with _core_errors():
            return handler(rest)

    # -- lease bookkeeping ---------------------------------------------------------------
    def current(self) -> Lease | None:
        """This kernel's lease: the one reserved here while it lasts, else the provisioner's."""
        if self.lease is not None:
            with contextlib.suppress(ChronosError):
                self.lease.refresh()
            if self.lease.state.live:
                return self.lease
        if self.kernel_lease_id:
            try:
                return api.get_lease(self.kernel_lease_id)
            except ChronosError:
                return None
        return self.lease

    def _target(self, lease_id: str | None, action: str) -> Lease:
        if lease_id:
            return api.get_lease(lease_id)
        lease = self.current()
        if lease is None:
            raise UsageError(
                f"this kernel holds no lease to {action}: type %chronos reserve 8G 2h, "
                f"or %chronos {action} LEASE_ID (see %chronos list)"
            )
        return lease

    def _release_current(self) -> None:
        """End the kernel's own lease and undo what it changed here (used by the widget too)."""
        if self.lease is not None:
            self.lease.release()
        self._deactivate()

    def _extend_current(self, duration: str) -> None:
        lease = self.current()
        if lease is None:
            raise UsageError("this kernel holds no lease to extend: type %chronos reserve 8G 2h")
        lease.extend(duration)

    def _deactivate(self) -> None:
        if self._activation is not None:
            self._activation.stop()
            self._activation = None

    def _show(self, lease: Lease, **kwargs: Any) -> LeaseWidget:
        widget = LeaseWidget(lease, **kwargs)
        self._widgets = [w for w in self._widgets if w.running]
        self._widgets.append(widget)
        display(widget)
        return widget

    def _on_watchdog_event(self, event: WatchdogEvent) -> None:
        """Called from the watchdog's thread: show the event in the lease's widget, never display()."""
        for widget in reversed(self._widgets):
            if widget.lease_id == event.lease_id:
                widget.notify(event.message)
                return
        print(f"chronos: {event.message}", file=sys.stderr)

    def _activate(self, lease: Lease) -> Activation:
        return Activation(lease, on_overuse=IN_KERNEL_OVERUSE, on_event=self._on_watchdog_event).start()

    def shutdown(self) -> None:
        """Stop every thread this extension started; leases are left as they are."""
        if self.notices is not None:
            self.notices.stop()
            self.notices = None
        for widget in self._widgets:
            widget.stop()
        self._widgets.clear()
        if self._activation is not None and self._activation.watchdog is not None:
            self._activation.watchdog.stop()
            self._activation.watchdog = None

    def _reserve(self, spec: RequestSpec) -> Lease:
        try:
            return api.default_engine().submit(spec, bind=True,
                                               on_wait=_queue_reporter() if spec.wait_s is not None else None)
        except KeyboardInterrupt:
            raise UsageError("stopped waiting: the request was withdrawn from the queue") from None

    # -- line commands -------------------------------------------------------------------
    def _cmd_help(self, rest: list[str]) -> None:
        print(HELP)

    def _cmd_reserve(self, rest: list[str]) -> None:
        spec = request_of(reserve_parser().parse_args(rest), RESERVE_USAGE)
        held = self.current()
        if held is not None and held.state.live:
            if held.id == self.kernel_lease_id:
                raise UsageError(
                    f"this kernel already runs inside lease {held.id} from its kernel launcher: "
                    "type %chronos status (or %chronos extend 30m)"
                )
            raise UsageError(
                f"this kernel already holds lease {held.id}: type %chronos release first, "
                "or %chronos extend 30m to keep it longer"
            )
        if spec.wait_s is not None:
            print(f"chronos: waiting in the queue for {spec.memory}; interrupt the kernel to give up", flush=True)
        lease = self._reserve(spec)
        self.lease = lease
        self._activation = self._activate(lease)
        self.widget = self._show(lease, release=self._release_current, extend=self._extend_current)
        _print_notes(self._activation.notes)

    def _cmd_claim(self, rest: list[str]) -> None:
        if len(rest) != 1:
            raise UsageError("say which booking, e.g. %chronos claim 12 (see chronos bookings)")
        held = self.current()
        if held is not None and held.state.live:
            raise UsageError(f"this kernel already holds lease {held.id}: type %chronos release first")
        lease = api.claim(rest[0], bind=True)
        self.lease = lease
        self._activation = self._activate(lease)
        self.widget = self._show(lease, release=self._release_current, extend=self._extend_current)
        _print_notes(self._activation.notes)

    def _cmd_status(self, rest: list[str]) -> None:
        if len(rest) > 1:
            raise UsageError("type %chronos status, or %chronos status LEASE_ID")
        if rest:
            lease = api.get_lease(rest[0])
        else:
            found = self.current()
            if found is None:
                print("This kernel holds no lease: type %chronos reserve 8G 2h to take one.")
                self._print_devices()
                return
            lease = found
        if self.widget is not None and self.widget.lease_id == lease.id and self.widget.running:
            display(self.widget)
            return
        if self.lease is not None and lease.id == self.lease.id:
            self.widget = self._show(lease, release=self._release_current, extend=self._extend_current)
        elif lease.id == self.kernel_lease_id:
            self._show(lease, confirm_release=KERNEL_RELEASE_CONFIRM.format(id=lease.id))
        else:
            self._show(lease)

    def _cmd_show(self, rest: list[str]) -> None:
        """``chronos show ID``'s verb: the same as ``status``."""
        self._cmd_status(rest)

    def _cmd_list(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos list takes no arguments")
        leases = api.leases()
        if not leases:
            print("No active or queued leases.")
        else:
            queue = {e.lease_id: (e.position, e.estimated_start) for e in api.queue()} \
                if any(lease.state == LeaseState.QUEUED for lease in leases) else {}
            print(text.table(text.LEASE_COLUMNS, text.lease_rows([lease.record for lease in leases], queue)))
        print()
        self._print_devices()

    def _print_devices(self) -> None:
        rows = [[str(d.index), d.name, format_bytes(d.memory_total_bytes), format_bytes(d.memory_reserved_bytes),
                 format_bytes(d.memory_available_bytes), str(d.active_leases)] for d in api.gpus()]
        print(text.table(["GPU", "NAME", "TOTAL", "RESERVED", "AVAILABLE", "LEASES"], rows))

    def _cmd_release(self, rest: list[str]) -> None:
        stop_kernel = "--stop-kernel" in rest
        rest = [word for word in rest if word != "--stop-kernel"]
        if len(rest) > 1:
            raise UsageError("type %chronos release, or %chronos release LEASE_ID")
        lease = self._target(rest[0] if rest else None, "release")
        own = self.kernel_lease_id is not None and lease.id == self.kernel_lease_id and (
            self.lease is None or self.lease.id != lease.id)
        if stop_kernel and not own:
            raise UsageError(f"--stop-kernel is for the lease this kernel was started in; lease {lease.id} is not: "
                             f"type %chronos release {lease.id}")
        if own and not stop_kernel:
            raise UsageError(KERNEL_RELEASE.format(id=lease.id))
        if own:
            print(f"chronos: releasing lease {lease.id}: this kernel is stopped now, and its variables are lost",
                  flush=True)
            lease.release()
            return
        if self.lease is not None and lease.id == self.lease.id:
            self._release_current()
        else:
            lease.release()
        if self.widget is not None and self.widget.lease_id == lease.id:
            self.widget.update()
        print(f"chronos: lease {lease.id} released")

    def _cmd_extend(self, rest: list[str]) -> None:
        if not rest or len(rest) > 2:
            raise UsageError("say how much longer, e.g. %chronos extend 30m (or: %chronos extend LEASE 30m)")
        swapped = swapped_extend(*rest) if len(rest) == 2 else None
        if swapped is not None:
            raise UsageError(f"{rest[0]!r} is a duration, not a lease id: the lease comes first, "
                             f"%chronos extend {swapped[0]} {swapped[1]}")
        lease = self._target(rest[0] if len(rest) > 1 else None, "extend")
        lease.extend(rest[-1])
        if self.widget is not None and self.widget.lease_id == lease.id:
            self.widget.update()
        print(f"chronos: lease {lease.id} now ends at {_clock(lease.expires_at)} "
              f"({format_duration(lease.remaining)} left)")

    def _cmd_stats(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos stats takes no arguments")
        figures = api.detailed_stats()
        users = text.usage_rows(figures.users)
        print(text.table(text.USAGE_COLUMNS, users) if users else "No leases in the last week.")
        print()
        rows = [[str(d.index), format_bytes(d.memory_reserved_bytes), format_bytes(d.memory_used_in_leases_bytes),
                 format_bytes(d.memory_available_bytes), str(d.active_leases), str(d.queued)]
                for d in figures.devices]
        print(text.table(["GPU", "RESERVED", "USED IN LEASES", "AVAILABLE", "LEASES", "QUEUED"], rows))

    def _cmd_suggest(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos suggest takes no arguments")
        advice = api.suggest()
        command = advice.command
        if command.startswith("chronos reserve"):
            command = "%" + command
        where = f"GPU {advice.device}" if advice.device is not None else "no GPU yet"
        when = "now" if advice.fits_now else f"at about {_clock(advice.estimated_start)}"
        print(command)
        print(f"  {format_bytes(advice.memory_bytes)} for {format_duration(advice.duration_s)} on {where}, "
              f"starting {when}")
        for reason in advice.reasons:
            print(f"  - {reason}")

    # -- the cell magic ------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> None:
        usage = RESERVE_USAGE.replace("%chronos reserve", "%%chronos")
        spec = request_of(reserve_parser(usage).parse_args(split_words(line)), usage, label="cell")
        with _core_errors():
            lease = self._reserve(spec)
        activation: Activation | None = None
        widget: LeaseWidget | None = None
        result: Any = None
        try:
            activation = self._activate(lease)
            widget = self._show(lease, release=lambda: None, extend=lambda _d: None)
            widget.release_button.layout.display = "none"
            widget.extend_button.layout.display = "none"
            _print_notes(activation.notes)
            shell: Any = self.shell  # InteractiveShell.run_cell carries no annotations
            result = shell.run_cell(cell, store_history=False)
        finally:
            if activation is not None:
                activation.stop()
            try:
                lease.release()
            finally:
                if widget is not None:
                    widget.stop()
                    widget.update()
                own = self._activation
                if own is not None and self.lease is not None and self.lease.state == LeaseState.ACTIVE:
                    _print_notes(own.reapply())
        error = None if result is None else (result.error_before_exec or result.error_in_exec)
        if error is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            what = "was interrupted" if interrupted else f"raised {type(error).__name__}"
            raise CellFailed(f"chronos: the cell {what}; its lease {lease.id} was released")


def _clock(epoch: float | None) -> str:
    return format_clock(epoch, seconds=True) if epoch is not None else "?"

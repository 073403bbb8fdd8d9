"""``%chronos`` and ``%%chronos``: GPU leases from a notebook.

A lease taken with ``%chronos reserve`` is bound to the kernel process, so it ends when
the kernel dies; its caps are applied inside the kernel, a watchdog thread keeps an eye
on it, and a live widget shows it. ``%%chronos 4G 10m`` runs one cell under a lease that
is released when the cell ends, however it ends. Every mistake becomes a one-line
UsageError that says what to type instead; notebooks never see a traceback from here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

import chronos
from chronos import Lease
from chronos.api import devices as gpu_status  # ``chronos.devices`` is also the name of a subpackage
from chronos.units import format_bytes, format_duration, parse_duration
from chronos_jupyter.widgets import LeaseWidget

__all__ = ["HELP", "CellFailed", "ChronosMagics"]

RESERVE_USAGE = (
    "%chronos reserve MEMORY [DURATION] [--gpu I[,I]] [--gpus N] [--prefer I[,I]] "
    "[--priority low|normal|high] [--wait [TIMEOUT]] [--label TEXT]"
)

HELP = f"""\
Chronos: time-limited, memory-capped GPU leases.

  {RESERVE_USAGE}
        take a lease for this kernel, e.g. %chronos reserve 8G 2h
  %chronos status [LEASE]      show this kernel's lease (or LEASE), live
  %chronos list                the leases on this machine, and its GPUs
  %chronos extend DURATION [LEASE]
                               add time, e.g. %chronos extend 30m
  %chronos release [LEASE]     end this kernel's lease (or LEASE) now
  %chronos stats               usage so far: leases, GPU-hours, peak memory
  %chronos suggest             how much to ask for, for how long, and where
  %chronos help                this text

  %%chronos MEMORY [DURATION] [options]
        first line of a cell: run that cell under its own lease, released when it ends

MEMORY: 8G, 512M, 8GiB, 50% or 0.5 of a GPU.  DURATION: 2h, 90m, 1h30m, 45s (default 1h).
The widget's Release and Extend buttons answer between cells (the kernel is busy during one)."""

#: What the in-kernel watchdog does when the kernel's processes use more than the cap.
IN_KERNEL_OVERUSE_POLICY = "interrupt"

_COMMANDS = ("reserve", "status", "list", "release", "extend", "stats", "suggest", "help")



class CellFailed(Exception):
    """Marks a ``%%chronos`` cell whose body failed, without printing a second traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def _render_traceback_(self) -> list[str]:
        return [self.text]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one UsageError line with the usage to type."""

    def __init__(self, usage: str, **kwargs: Any) -> None:
        super().__init__(prog="%chronos", usage=usage, add_help=False, allow_abbrev=False, **kwargs)
        self.hint = usage

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; type: {self.hint}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError((message or "").strip() or f"type: {self.hint}")


def _reserve_parser(usage: str = RESERVE_USAGE) -> _Parser:
    parser = _Parser(usage)
    parser.add_argument("memory", nargs="?")
    parser.add_argument("duration", nargs="?")
    parser.add_argument("--gpu", dest="device")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--prefer")
    parser.add_argument("--priority")
    parser.add_argument("--wait", nargs="?", const=True, default=False)
    parser.add_argument("--label")
    return parser


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot read {line!r} ({exc}); type %chronos help") from None


def _indices(option: str, text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise UsageError(f"{option} takes device indices, e.g. {option} 0 or {option} 0,1 (got {text!r})")
    return indices


def _reserve_kwargs(args: argparse.Namespace, usage: str) -> dict[str, Any]:
    if args.memory is None:
        raise UsageError(f"say how much GPU memory and for how long, e.g. {usage.split(' MEMORY')[0]} 8G 2h")
    kwargs: dict[str, Any] = {"label": args.label}
    if args.priority is not None:  # otherwise the configured default applies
        kwargs["priority"] = args.priority
    if args.device is not None:
        devices = _indices("--gpu", args.device)
        kwargs["device"] = devices[0] if len(devices) == 1 else devices
    if args.prefer is not None:
        kwargs["prefer"] = _indices("--prefer", args.prefer)
    if args.gpus is not None:
        if args.device is not None:
            raise UsageError("give either --gpu I[,I] (which GPUs) or --gpus N (how many), not both")
        kwargs["gpus"] = args.gpus
    if args.wait is True:
        kwargs["wait"] = True
    elif args.wait:
        try:
            kwargs["wait"] = parse_duration(args.wait)
        except chronos.ChronosError as exc:
            raise UsageError(f"--wait takes a timeout such as --wait 10m ({exc})") from None
    return kwargs


def _queue_reporter() -> Callable[[chronos.WaitUpdate], None]:
    """Print the request's place in the queue whenever it changes (called in the waiting thread)."""
    last: list[tuple[int | None, str | None]] = []

    def report(update: chronos.WaitUpdate) -> None:
        start = _clock(update.estimated_start) if update.estimated_start else None
        if last and last[-1] == (update.position, start):
            return
        last.append((update.position, start))
        place = f"position {update.position}" if update.position is not None else "queued"
        when = f", expected to start about {start}" if start else ""
        print(f"chronos: {place}{when}", flush=True)

    return report


def _cuda_initialised() -> str | None:
    """The framework that has already initialised CUDA in this process, if any."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                return "torch"
        except Exception:  # a broken or partial torch import says nothing about CUDA
            return None
    return None


class _Activation:
    """What applying a lease changed in this process, so it can be undone."""

    def __init__(self) -> None:
        self.saved_env: dict[str, str | None] = {}
        self.watchdog: Any = None
        self.notes: list[str] = []

    def set_env(self, key: str, value: str) -> None:
        if key not in self.saved_env:
            self.saved_env[key] = os.environ.get(key)
        os.environ[key] = value

    def restore_env(self) -> None:
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved_env.clear()


def _activate(lease: Lease, on_event: Callable[[Any], None] | None = None) -> _Activation:
    """Make ``lease`` true in this process: environment, framework caps, watchdog."""
    act = _Activation()
    additions = lease.env({})
    for key, value in sorted(additions.items()):
        if key == "CUDA_VISIBLE_DEVICES":
            framework = _cuda_initialised()
            if framework is not None:
                act.notes.append(
                    f"warning: {framework} has already initialised CUDA in this kernel, so it still "
                    f"sees every GPU; restart the kernel and run %chronos reserve before using the GPU "
                    f"(the lease is GPU {', '.join(map(str, lease.devices))})"
                )
                continue
        act.set_env(key, value)
    if "CUDA_VISIBLE_DEVICES" in act.saved_env:
        act.notes.append(f"caps: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (GPU "
                         f"{', '.join(map(str, lease.devices))} only, for this kernel and its children)")
    try:
        capped = lease.apply_caps()
    except chronos.ChronosError as exc:
        act.notes.append(f"warning: caps not applied: {exc}")
    else:
        act.notes.extend(_summarise_caps(capped))
    act.watchdog, note = _start_watchdog(lease, on_event)
    if note:
        act.notes.append(note)
    return act


def _summarise_caps(capped: list[str]) -> list[str]:
    """apply_caps' lines, with the ones about frameworks not yet imported folded into one."""
    now = [line for line in capped if "for a later" not in line]
    later = sorted({line.split(":", 1)[0] for line in capped if "for a later import" in line})
    notes = [f"caps: {line}" for line in now]
    if later:
        notes.append(f"caps: {', '.join(later)} will be capped when imported (limits set in the environment)")
    return notes


def _start_watchdog(lease: Lease, on_event: Callable[[Any], None] | None) -> tuple[Any, str | None]:
    """Start the lease's watchdog as a daemon thread in this kernel.

    Over the cap, the running cell gets a KeyboardInterrupt (``interrupt``) rather than the
    kernel being killed; at the lease's end the machine's ``on_expiry`` policy applies, as it
    does for kernels started by the provisioner.
    """
    try:
        from chronos.enforce.watchdog import Watchdog
    except ImportError:
        return None, "note: this chronos has no watchdog; the lease is held to its caps and end time only"
    try:
        dog = Watchdog(lease, on_overuse=IN_KERNEL_OVERUSE_POLICY, on_event=on_event)
        return dog.start(), None
    except chronos.ChronosError as exc:
        return None, f"warning: watchdog not started: {exc}"


def _stop_watchdog(handle: Any) -> None:
    if handle is None:
        return
    stop = getattr(handle, "stop", None)
    if callable(stop):
        stop()


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        stream = sys.stderr if note.startswith("warning") else sys.stdout
        print(f"chronos: {note}", file=stream)


@contextmanager
def _core_errors() -> Iterator[None]:
    """Turn an error from the core into IPython's one-line UsageError."""
    try:
        yield
    except chronos.ChronosError as exc:
        raise UsageError(str(exc)) from None


@magics_class
class ChronosMagics(Magics):
    """The ``%chronos`` line magic and the ``%%chronos`` cell magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.lease: Lease | None = None
        self.widget: LeaseWidget | None = None
        self._activation: _Activation | None = None
        self._widgets: list[LeaseWidget] = []
        # A kernel launched by the Chronos provisioner already runs inside this lease.
        self.kernel_lease_id: str | None = os.environ.get("CHRONOS_LEASE_ID") or None

    # -- entry point ---------------------------------------------------------------------
    @line_cell_magic
    def chronos(self, line: str, cell: str | None = None) -> Any:
        """GPU leases: %chronos help lists the commands; %%chronos 4G 10m runs a cell under a lease."""
        if cell is not None:
            return self._cell(line, cell)
        words = _split(line)
        if not words:
            print(HELP)
            return None
        command, rest = words[0], words[1:]
        if command in ("-h", "--help"):
            command = "help"
        if command not in _COMMANDS:
            raise UsageError(
                f"unknown command {command!r}: type one of {', '.join(_COMMANDS)} (%chronos help)"
            )
        handler = getattr(self, f"_cmd_{command}")
        with _core_errors():
            return handler(rest)

    # -- lease bookkeeping ---------------------------------------------------------------
    def current(self) -> Lease | None:
        """This kernel's lease: the one reserved here while it lasts, else the provisioner's."""
        if self.lease is not None:
            try:
                self.lease.refresh()
            except chronos.ChronosError:
                pass
            if self.lease.state in ("active", "queued"):
                return self.lease
        if self.kernel_lease_id:
            try:
                return chronos.get_lease(self.kernel_lease_id)
            except chronos.ChronosError:
                return None
        return self.lease

    def _target(self, lease_id: str | None, action: str) -> Lease:
        if lease_id:
            return chronos.get_lease(lease_id)
        lease = self.current()
        if lease is None:
            raise UsageError(
                f"this kernel holds no lease to {action}: type %chronos reserve 8G 2h, "
                f"or %chronos {action} LEASE_ID (see %chronos list)"
            )
        return lease

    def _release_current(self) -> None:
        """End the kernel's own lease and undo what it changed here (used by the widget too)."""
        lease = self.lease
        if lease is not None:
            lease.release()
        self._deactivate()

    def _extend_current(self, duration: str) -> None:
        lease = self.current()
        if lease is None:
            raise UsageError("this kernel holds no lease to extend: type %chronos reserve 8G 2h")
        lease.extend(duration)

    def _deactivate(self) -> None:
        if self._activation is not None:
            _stop_watchdog(self._activation.watchdog)
            self._activation.restore_env()
            self._activation = None

    def _show(self, lease: Lease, **kwargs: Any) -> LeaseWidget:
        widget = LeaseWidget(lease, **kwargs)
        self._widgets = [w for w in self._widgets if w.running]
        self._widgets.append(widget)
        display(widget)
        return widget

    def _on_watchdog_event(self, event: Any) -> None:
        """Called from the watchdog's thread: show the event in the lease's widget, never display()."""
        message = str(getattr(event, "message", event))
        lease_id = getattr(event, "lease_id", None)
        for widget in reversed(self._widgets):
            if widget.lease_id == lease_id:
                widget.notify(message)
                return
        print(f"chronos: {message}", file=sys.stderr)

    def shutdown(self) -> None:
        """Stop every thread this extension started; leases are left as they are."""
        for widget in self._widgets:
            widget.stop()
        self._widgets.clear()
        if self._activation is not None:
            _stop_watchdog(self._activation.watchdog)
            self._activation.watchdog = None

    # -- line commands -------------------------------------------------------------------
    def _cmd_help(self, rest: list[str]) -> None:
        print(HELP)

    def _cmd_reserve(self, rest: list[str]) -> None:
        args = _reserve_parser().parse_args(rest)
        kwargs = _reserve_kwargs(args, RESERVE_USAGE)
        held = self.current()
        if held is not None and held.state in ("active", "queued"):
            if held.id == self.kernel_lease_id:
                raise UsageError(
                    f"this kernel already runs inside lease {held.id} from its kernel launcher: "
                    "type %chronos status (or %chronos extend 30m)"
                )
            raise UsageError(
                f"this kernel already holds lease {held.id}: type %chronos release first, "
                "or %chronos extend 30m to keep it longer"
            )
        if kwargs.get("wait"):
            print(f"chronos: waiting in the queue for {args.memory}; interrupt the kernel to give up",
                  flush=True)
            kwargs["on_wait"] = _queue_reporter()
        try:
            lease = chronos.reserve(args.memory, args.duration, bind=True, **kwargs)
        except KeyboardInterrupt:
            raise UsageError("stopped waiting: the request was withdrawn from the queue") from None
        self.lease = lease
        self._activation = _activate(lease, self._on_watchdog_event)
        self.widget = self._show(lease, release=self._release_current, extend=self._extend_current)
        _print_notes(self._activation.notes)

    def _cmd_status(self, rest: list[str]) -> None:
        if len(rest) > 1:
            raise UsageError("type %chronos status, or %chronos status LEASE_ID")
        if rest:
            lease = chronos.get_lease(rest[0])
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
        own = self.lease is not None and lease.id == self.lease.id
        if own:
            self.widget = self._show(lease, release=self._release_current, extend=self._extend_current)
        else:
            self._show(lease)

    def _cmd_list(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos list takes no arguments")
        leases = chronos.leases()
        if not leases:
            print("No active or queued leases.")
        else:
            rows = [("LEASE", "USER", "GPU", "MEMORY", "STATE", "LEFT", "LABEL")]
            for lease in leases:
                left = format_duration(lease.remaining) if lease.state in ("active", "queued") else "-"
                rows.append((
                    lease.id,
                    lease.owner,
                    ",".join(map(str, lease.devices)) or "-",
                    format_bytes(lease.memory_bytes),
                    lease.state,
                    left,
                    lease.label or "",
                ))
            print(_table(rows))
        print()
        self._print_devices()

    def _print_devices(self) -> None:
        rows: list[tuple[str, ...]] = [("GPU", "NAME", "TOTAL", "LEASED", "AVAILABLE", "LEASES")]
        for dev in gpu_status():
            active = getattr(dev, "active_leases", 0)
            count = len(active) if isinstance(active, (list, tuple, set)) else active
            rows.append((
                str(dev.index),
                dev.name,
                format_bytes(dev.memory_total_bytes),
                format_bytes(getattr(dev, "memory_reserved_bytes", 0)),
                format_bytes(getattr(dev, "memory_available_bytes", 0)),
                str(count),
            ))
        print(_table(rows))

    def _cmd_release(self, rest: list[str]) -> None:
        if len(rest) > 1:
            raise UsageError("type %chronos release, or %chronos release LEASE_ID")
        lease = self._target(rest[0] if rest else None, "release")
        if self.lease is not None and lease.id == self.lease.id:
            self._release_current()
        else:
            lease.release()
        if self.widget is not None and self.widget.lease_id == lease.id:
            self.widget.update()
        print(f"chronos: lease {lease.id} released")

    def _cmd_extend(self, rest: list[str]) -> None:
        if not rest or len(rest) > 2:
            raise UsageError("say how much longer, e.g. %chronos extend 30m (or: %chronos extend 30m LEASE)")
        lease = self._target(rest[1] if len(rest) > 1 else None, "extend")
        lease.extend(rest[0])
        if self.widget is not None and self.widget.lease_id == lease.id:
            self.widget.update()
        print(f"chronos: lease {lease.id} now ends at {_clock(lease.expires_at)} "
              f"({format_duration(lease.remaining)} left)")

    def _cmd_stats(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos stats takes no arguments")
        try:
            from chronos import stats as chronos_stats
        except ImportError:  # an older core: figures from the leases alone
            print(_stats_text(chronos.leases(all=True)))
            return
        figures = chronos_stats.detailed()
        rows: list[tuple[str, ...]] = [
            ("USER", "GPU-HOURS (DAY)", "GPU-HOURS (WEEK)", "LEASES (WEEK)", "ACTIVE", "QUEUED", "PEAK/CAP")
        ]
        for user in figures.users:
            peak = "-" if user.peak_to_cap_percent is None else f"{user.peak_to_cap_percent:.0f}%"
            rows.append((user.user, f"{user.gpu_hours_day:.2f}", f"{user.gpu_hours_week:.2f}",
                         str(user.leases_week), str(user.active), str(user.queued), peak))
        print(_table(rows) if len(rows) > 1 else "No leases in the last week.")
        print()
        rows = [("GPU", "RESERVED", "USED IN LEASES", "AVAILABLE", "LEASES", "QUEUED")]
        for dev in figures.devices:
            rows.append((str(dev.index), format_bytes(dev.memory_reserved_bytes),
                         format_bytes(dev.memory_used_in_leases_bytes), format_bytes(dev.memory_available_bytes),
                         str(dev.active_leases), str(dev.queued)))
        print(_table(rows))

    def _cmd_suggest(self, rest: list[str]) -> None:
        if rest:
            raise UsageError("%chronos suggest takes no arguments")
        try:
            from chronos import suggest
        except ImportError:
            raise UsageError("this chronos has no suggest: type %chronos list to see what is free") from None
        advice = suggest()
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
        args = _reserve_parser(usage).parse_args(_split(line))
        kwargs = _reserve_kwargs(args, usage)
        if args.label is None:
            kwargs["label"] = "cell"
        with _core_errors():
            try:
                lease = chronos.reserve(args.memory, args.duration, bind=True, **kwargs)
            except KeyboardInterrupt:
                raise UsageError("stopped waiting: the request was withdrawn from the queue") from None
        activation: _Activation | None = None
        widget: LeaseWidget | None = None
        result: Any = None
        try:
            activation = _activate(lease, self._on_watchdog_event)
            widget = self._show(lease, release=lambda: None, extend=lambda _d: None)
            widget.release_button.layout.display = "none"
            widget.extend_button.layout.display = "none"
            _print_notes(activation.notes)
            assert self.shell is not None
            result = self.shell.run_cell(cell, store_history=False)
        finally:
            if activation is not None:
                _stop_watchdog(activation.watchdog)
                activation.restore_env()
            try:
                lease.release()
            finally:
                if widget is not None:
                    widget.stop()
                    widget.update()
                if self._activation is not None and self.lease is not None and self.lease.state == "active":
                    self._reapply_own_caps()
        error = None if result is None else (result.error_before_exec or result.error_in_exec)
        if error is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            what = "was interrupted" if interrupted else f"raised {type(error).__name__}"
            raise CellFailed(f"chronos: the cell {what}; its lease {lease.id} was released")

    def _reapply_own_caps(self) -> None:
        """After a cell lease, put the kernel's own lease's caps back in force."""
        assert self.lease is not None and self._activation is not None
        for key, value in self.lease.env({}).items():
            if key in self._activation.saved_env:
                os.environ[key] = value
        try:
            self.lease.apply_caps()
        except chronos.ChronosError as exc:
            print(f"chronos: warning: could not re-apply caps of lease {self.lease.id}: {exc}",
                  file=sys.stderr)


def _clock(epoch: float | None) -> str:
    return "?" if epoch is None else time.strftime("%H:%M:%S", time.localtime(epoch))


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines)


def _stats_text(leases: list[Lease]) -> str:
    """Usage from the ledger's leases: counts by state, GPU-hours, peak memory."""
    by_state: dict[str, int] = {}
    gpu_seconds = 0.0
    peak = 0
    for lease in leases:
        by_state[lease.state] = by_state.get(lease.state, 0) + 1
        gpu_seconds += lease.gpu_seconds or 0.0
        peak = max(peak, lease.peak_memory_bytes or 0)
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none"
    return "\n".join([
        f"leases:     {len(leases)} ({states})",
        f"GPU time:   {gpu_seconds / 3600:.2f} GPU-hours",
        f"peak memory {format_bytes(peak)}",
    ])

"""``chronos run``: a command as the holder of a lease.

The wrapper takes a lease bound to itself, starts the command with the lease's environment (the
cooperative caps, plus the MPS limit where an MPS daemon runs), enforces the lease with the
watchdog in a thread, forwards signals to the command, and releases the lease when the command
exits. Its exit status is the command's (128+N when a signal ended it, as shells report it).

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the wrapper are passed to
the command. The command stays in the wrapper's process group, so a terminal's Ctrl-C or Ctrl-\\
already reaches it; those two are therefore not forwarded a second time while the wrapper's group
holds the terminal. Should the wrapper itself be killed, the command gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) and the lease, bound to the dead wrapper, is reclaimed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from chronos.enforce import mps
from chronos.enforce.watchdog import (
    DEFAULT_GRACE_S,
    DEFAULT_KILL_WAIT_S,
    DEFAULT_RATE_HZ,
    DEFAULT_WARN_AT,
    ExpiryWarning,
    IdleWarning,
    LedgerTroubleEvent,
    OveruseEvent,
    SignalEvent,
    UnkillableEvent,
    Watchdog,
    WatchdogEvent,
)
from chronos.errors import ChronosError, InvalidRequestError
from chronos.lease import Lease
from chronos.model import Action
from chronos.ops import EngineOps
from chronos.request import MAX_LABEL
from chronos.text import plain
from chronos.units import format_bytes, format_duration, parse_duration

__all__ = ["FORWARDED_SIGNALS", "RunResult", "run", "shell_status"]

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1
NO_COMMAND = "no command given: write it after --, e.g. chronos run 8G 1h -- python train.py"
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


@dataclass(frozen=True)
class RunResult:
    """How a command run under a lease ended.

    ``exit_code`` is what a shell would report (128+N for signal N); ``reason`` says why Chronos
    ended the command, None when it ended by itself.
    """

    exit_code: int
    returncode: int | None
    lease_id: str | None
    reason: str | None
    peak_memory_bytes: int
    gpu_seconds: float
    wall_s: float
    memory_bytes: int = 0
    devices: tuple[int, ...] = ()
    events: tuple[WatchdogEvent, ...] = field(default=(), repr=False)

    @property
    def signal_name(self) -> str | None:
        """The signal that ended the command, if one did."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def shell_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it: 128+N for a process ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _death_signal_hook() -> Callable[[], None] | None:
    """A preexec hook asking the kernel to send SIGTERM to the command if the wrapper dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the wrapper died before prctl took effect
            os._exit(EXIT_NOT_EXECUTABLE)

    return hook


def _holds_terminal() -> bool:
    """True when this process's group is the terminal's foreground group (Ctrl-C reaches it all)."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except (AttributeError, OSError, ValueError):
            continue
    return False


class _Forwarder:
    """Signal handlers that pass signals on to the child (installed only in the main thread)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in FORWARDED_SIGNALS:
            with contextlib.suppress(OSError, ValueError):
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if signum in _TERMINAL_SIGNALS and _holds_terminal():
            return  # the terminal sent it to the whole foreground group, the command included
        child = self.child
        if child is None:
            self.pending.append(signum)
            return
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def started(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        for signum in self.pending:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        self.pending.clear()


def _default_printer(stream: TextIO) -> Callable[[WatchdogEvent], None]:
    def show(event: WatchdogEvent) -> None:
        if isinstance(event, (ExpiryWarning, IdleWarning, UnkillableEvent, LedgerTroubleEvent)) or (
            isinstance(event, OveruseEvent) and event.action == Action.WARN
        ):
            stream.write(f"chronos: {event.message}\n")
            stream.flush()

    return show


#: The longest grace period or kill wait: past a day it would never act within a lease.
_LONGEST_PAUSE_S = 86400.0


def _pause(value: float | str, name: str) -> float:
    """``--grace`` or ``--kill-wait``: zero, or a duration of at most a day (NaN, infinity refused)."""
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0:
        return 0.0
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value < 0:
        raise InvalidRequestError(f"{name} must be 0 seconds or more, got {value!r}")
    return parse_duration(value, longest=_LONGEST_PAUSE_S, what=name)


def run(
    command: Sequence[str],
    memory: str | int | float,
    duration: str | int | float | None = None,
    *,
    gpus: int | None = None,
    device: int | str | Sequence[int] | None = None,
    priority: str | None = None,
    wait: bool | float | str | None = False,
    on_expiry: Action | str | None = None,
    on_overuse: Action | str = Action.TERMINATE,
    grace: float = DEFAULT_GRACE_S,
    kill_wait: float = DEFAULT_KILL_WAIT_S,
    rate_hz: float = DEFAULT_RATE_HZ,
    warn_at: Sequence[float] = DEFAULT_WARN_AT,
    label: str | None = None,
    env: Mapping[str, str] | None = None,
    on_event: Callable[[WatchdogEvent], None] | None = None,
    engine: EngineOps | None = None,
    stderr: TextIO | None = sys.stderr,
    booking: str | int | None = None,
) -> RunResult:
    """Run ``command`` inside a new lease of ``memory`` per device for ``duration``; see the module doc.

    With ``booking``, the command runs in that booking of the caller's instead, claimed now (``memory``,
    ``duration`` and the placement options are then not used).

    ``stderr`` receives the one-line reason when Chronos ends the command, expiry warnings and
    the closing summary (None: silent). ``on_event`` replaces the default printing of events.
    ``engine`` defaults to the process's default engine.
    """
    argv = [str(a) for a in command]
    if not argv or not argv[0]:
        raise InvalidRequestError(NO_COMMAND)
    overuse = Action.parse(on_overuse, "--on-overuse")
    expiry = Action.parse(on_expiry, "--on-expiry") if on_expiry is not None else None
    grace, kill_wait = (_pause(value, name) for value, name in ((grace, "--grace"), (kill_wait, "--kill-wait")))
    if engine is None:
        from chronos.api import default_engine

        engine = default_engine()
    if on_event is None and stderr is not None:
        on_event = _default_printer(stderr)

    forwarder = _Forwarder()
    forwarder.install()
    started = time.monotonic()
    try:
        if booking is not None:
            lease = engine.claim(str(booking), bind=True)
        else:
            lease = engine.reserve(
                memory, duration, device=device, gpus=gpus, priority=priority,
                label=label or plain(os.path.basename(argv[0]))[:MAX_LABEL], bind=True, wait=wait,
            )
        try:
            return _run_leased(argv, lease, engine, forwarder, started, env, expiry, overuse,
                               grace, kill_wait, rate_hz, warn_at, on_event, stderr)
        finally:
            try:
                lease.release()
            except ChronosError as exc:
                if stderr is not None:  # bound to this process: the next operation ends it once this exits
                    stderr.write(f"chronos: could not release lease {lease.id} ({exc}); it ends as soon as the "
                                 "ledger can be written, since its holder (this process) has exited\n")
                    stderr.flush()
    finally:
        forwarder.restore()


def _run_leased(argv: list[str], lease: Lease, engine: EngineOps, forwarder: _Forwarder, started: float,
                env: Mapping[str, str] | None, on_expiry: Action | None, on_overuse: Action, grace: float,
                kill_wait: float, rate_hz: float, warn_at: Sequence[float],
                on_event: Callable[[WatchdogEvent], None] | None, stderr: TextIO | None) -> RunResult:
    child_env = lease.env(dict(os.environ if env is None else env))
    child_env = mps.mps_env(child_env, len(lease.devices), lease.memory_bytes)
    try:
        child = subprocess.Popen(argv, env=child_env, preexec_fn=_death_signal_hook())
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
        what = "command not found" if code == EXIT_NOT_FOUND else "command cannot be run"
        reason = f"{what}: {argv[0]}"
        if stderr is not None:
            stderr.write(f"chronos: {reason}\n")
        return RunResult(code, None, lease.id, reason, 0, 0.0, time.monotonic() - started,
                         lease.memory_bytes, tuple(lease.devices))
    forwarder.started(child)
    watchdog = Watchdog(
        lease, engine=engine, pid=child.pid, rate_hz=rate_hz, grace_s=grace, kill_wait_s=kill_wait,
        on_overuse=on_overuse, on_expiry=on_expiry,
        on_release=on_expiry or engine.on_expiry,
        warn_at=warn_at, on_event=on_event,
    ).start()
    try:
        returncode = child.wait()
    except KeyboardInterrupt:  # only where handlers could not be installed (not the main thread)
        child.send_signal(signal.SIGINT)
        returncode = child.wait()
    watchdog.stop()
    if watchdog.trouble is not None:
        _record_late(engine, lease, watchdog, stderr)
    acted = any(isinstance(e, SignalEvent) for e in watchdog.events)
    ended_by: str | None = watchdog.end_reason if acted else None
    result = RunResult(
        exit_code=shell_status(returncode), returncode=returncode, lease_id=lease.id, reason=ended_by,
        peak_memory_bytes=watchdog.peak_bytes, gpu_seconds=watchdog.gpu_seconds,
        wall_s=time.monotonic() - started, memory_bytes=lease.memory_bytes, devices=tuple(lease.devices),
        events=tuple(watchdog.events),
    )
    if stderr is not None:
        if ended_by:
            how = f" ({result.signal_name})" if result.signal_name else ""
            stderr.write(f"chronos: ended the command{how}: {ended_by}\n")
        gpus_text = ",".join(map(str, result.devices))
        stderr.write(
            f"chronos: lease {lease.id} on GPU {gpus_text}: peak {format_bytes(result.peak_memory_bytes)} "
            f"of {format_bytes(lease.memory_bytes)}, GPU time {result.gpu_seconds:.1f}s "
            f"in {format_duration(max(1.0, result.wall_s))}\n"
        )
        stderr.flush()
    return result


def _record_late(engine: EngineOps, lease: Lease, watchdog: Watchdog, stderr: TextIO | None) -> None:
    """The figures the watchdog could not store, stored now with the ledger's full wait, or said to be lost."""
    peak = format_bytes(watchdog.peak_bytes)
    if stderr is not None:
        stderr.write(f"chronos: lease {lease.id}: recording its usage (peak {peak}) once the ledger can be "
                     f"written ({watchdog.trouble})\n")
        stderr.flush()
    try:
        engine.record_usage(lease.id, watchdog.peak_bytes, round(watchdog.gpu_seconds, 3), note=watchdog.trouble)
    except ChronosError as exc:
        if stderr is not None:
            stderr.write(f"chronos: lease {lease.id}: its usage (peak {peak}) was not recorded: {exc}\n")
    else:
        if stderr is not None:
            stderr.write(f"chronos: lease {lease.id}: usage recorded\n")

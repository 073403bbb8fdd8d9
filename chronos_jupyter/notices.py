"""Inside a kernel started by the Chronos provisioner: its lease's warnings and end, in the notebook.

The provisioner's watchdog runs in the user's server, whose log nobody reads; the notebook shows only
what the kernel itself sends. So the provisioner starts each IPython kernel with this extension
(``--ext chronos_jupyter`` and ``--ChronosNotices.*`` settings), and the kernel tells its user:

* before the end (``warn_before``, and a minute before) and when the end comes, a line on stderr:
  in the running cell, or at the top of the next cell's output when the kernel was idle, and in the
  lease widget where one is shown (every front end shows a cell's output; widgets need a manager);
* when the lease ends or is released from outside and the kernel is stopped for it (SIGTERM), what
  happened, and the widget turns to "ended" before the kernel goes;
* in a kernel started for the same notebook after its last one ended with its lease, the first cell
  is not run: it says that this is a new kernel with a new lease and the old variables are gone.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from chronos import api
from chronos.errors import ChronosError
from chronos.lease import Lease
from chronos.model import Action, LeaseState
from chronos.units import format_clock, format_duration

__all__ = [
    "CONFIG_SECTION", "KERNEL_RELEASE", "KERNEL_RELEASE_CONFIRM", "KernelNotices", "NewKernel", "end_text",
    "for_kernel", "kernel_args", "refuse_first_cell",
]

#: The traitlets config section the provisioner writes on the kernel's command line.
CONFIG_SECTION = "ChronosNotices"
#: Seconds before the end at which "ends now" is said (the watchdog acts at the end itself).
_NOW_S = 2.0

#: ``%chronos release`` of the kernel's own lease, refused: releasing it would stop the kernel.
KERNEL_RELEASE = (
    "lease {id} is this kernel's own (its kernel launcher took it), and releasing it stops this kernel "
    "and loses its variables: to give the GPU back, shut the kernel down (Kernel > Shut Down Kernel), "
    "or type %chronos release --stop-kernel"
)
#: The widget's first click on Release of the kernel's own lease.
KERNEL_RELEASE_CONFIRM = (
    "Releasing lease {id} stops this kernel and loses its variables. Click again to release it and stop the "
    "kernel, or shut the kernel down yourself."
)

_pending_refusal: list[str] = []


class NewKernel(Exception):
    """The first cell of a kernel that replaced one whose lease ended: shown as its text alone."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def refuse_first_cell() -> None:
    """Called by the first cell's code (see :meth:`KernelNotices._first_cell`)."""
    if _pending_refusal:
        raise NewKernel(_pending_refusal.pop())


def _clock(epoch: float | None) -> str:
    return format_clock(epoch, seconds=True) if epoch is not None else "now"


def end_text(lease: Lease, action: Action | str) -> str:
    """What ending (or having ended) means for this kernel, in one line."""
    if lease.state == LeaseState.RELEASED:
        what = f"lease {lease.id} was released at {_clock(lease.ended_at)}"
    elif lease.state == LeaseState.REVOKED:
        what = f"lease {lease.id} ended at {_clock(lease.ended_at)} ({lease.end_reason or 'revoked'})"
    elif lease.state == LeaseState.ACTIVE and lease.expires_at is not None and lease.expires_at > time.time():
        what = f"lease {lease.id} ends now ({_clock(lease.expires_at)})"
    else:
        what = f"lease {lease.id} has expired ({_clock(lease.ended_at or lease.expires_at)})"
    action = Action.parse(str(action), "on-expiry action")
    if action in (Action.TERMINATE, Action.KILL):
        then = "this kernel is being stopped and its variables are lost; start a new kernel to take a new lease"
    elif action == Action.INTERRUPT:
        then = "the running cell is interrupted and this kernel goes on without a GPU lease"
    else:
        then = "this kernel goes on without a GPU lease; start a new kernel to take a new one"
    return f"chronos: {what}: {then}"


class KernelNotices:
    """Follows the kernel's own lease and says in the notebook what is about to happen to it."""

    def __init__(self, shell: Any, lease_id: str, *, warn_before: tuple[float, ...] = (600.0, 60.0),
                 on_end: str = "terminate", replaces: str = "", interval: float = 1.0,
                 on_notice: Callable[[str], None] | None = None,
                 on_end_seen: Callable[[str], None] | None = None, waited: str = "") -> None:
        self.shell = shell
        self.lease_id = lease_id
        self.warn_before = tuple(sorted((w for w in warn_before if w > 0), reverse=True))
        self.on_end = Action.parse(on_end or "terminate", "on-expiry action")
        self.interval = interval
        self.on_notice = on_notice
        self.on_end_seen = on_end_seen
        self.said: list[str] = []
        self._pending: list[str] = []
        self._warned: set[float] = set()
        self._ended = False
        self._in_cell = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_term: Any = None
        if waited:
            self._pending.append(f"chronos: this kernel waited {waited} in the queue for its lease {lease_id}")
        if replaces:
            _pending_refusal.append(
                f"chronos: this is a new kernel, with a new lease: the notebook's previous kernel ended with "
                f"its lease {replaces}, and its variables are gone. This cell was not run: run it again to "
                "go on in the new kernel (%chronos status shows the new lease)."
            )

    # -- life ------------------------------------------------------------------------------
    def start(self) -> KernelNotices:
        events = self.shell.events
        events.register("pre_run_cell", self._pre_run_cell)
        events.register("post_run_cell", self._post_run_cell)
        if _pending_refusal:
            self.shell.input_transformers_post.append(self._first_cell)
        if threading.current_thread() is threading.main_thread():
            self._previous_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._thread = threading.Thread(target=self._run, name="chronos-kernel-notices", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("pre_run_cell", self._pre_run_cell)
            self.shell.events.unregister("post_run_cell", self._post_run_cell)
        if self._previous_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.poll()
            except Exception:  # a failed read must not end the notices for good
                wait = self.interval
            if self._ended:
                return
            self._stop.wait(wait)

    # -- what to say ------------------------------------------------------------------------
    def poll(self) -> float:
        """Look at the lease once; say what is due; return how long to wait before looking again."""
        try:
            lease = api.get_lease(self.lease_id)
        except ChronosError:
            return self.interval
        if lease.state != LeaseState.ACTIVE:
            self._end(lease)
            return self.interval
        if lease.expires_at is None:
            return self.interval
        left = lease.expires_at - time.time()
        for mark in self.warn_before:
            if mark >= lease.duration_s:
                continue  # the lease was born inside this warning's window: nothing to warn of yet
            if left <= mark and mark not in self._warned:
                self._warned.update(m for m in self.warn_before if m >= mark)
                if left > _NOW_S:
                    self.say(f"chronos: lease {lease.id} ends in {format_duration(left)}, at "
                             f"{_clock(lease.expires_at)}: save your work, or type %chronos extend 30m")
                break
        if left <= _NOW_S:
            self._end(lease)
            return self.interval
        self._warned -= {m for m in self.warn_before if left > m + 1}  # extended: warn again later
        return max(0.05, min(self.interval, left - _NOW_S))

    def _end(self, lease: Lease) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        text = end_text(lease, self.on_end)
        self.say(text)
        if self.on_end_seen is not None:
            with contextlib.suppress(Exception):
                self.on_end_seen(text)

    def say(self, text: str) -> None:
        """One line for the user: now if a cell runs, else at the top of the next cell; and in the widget."""
        self.said.append(text)
        if self.on_notice is not None:
            with contextlib.suppress(Exception):
                self.on_notice(text)
        with self._lock:
            if not self._in_cell:
                self._pending.append(text)
                return
        print(text, file=sys.stderr, flush=True)

    # -- hooks -------------------------------------------------------------------------------
    def _pre_run_cell(self, *_args: Any) -> None:
        with self._lock:
            self._in_cell = True
            pending, self._pending = self._pending, []
        for text in pending:
            print(text, file=sys.stderr, flush=True)

    def _post_run_cell(self, *_args: Any) -> None:
        with self._lock:
            self._in_cell = False
        if not _pending_refusal and self._first_cell in self.shell.input_transformers_post:
            self.shell.input_transformers_post.remove(self._first_cell)

    def _first_cell(self, lines: list[str]) -> list[str]:
        # IPython transforms a cell more than once (ipykernel asks first whether it should run
        # async): the refusal is taken when the replaced code runs, and the hook leaves after it.
        if not _pending_refusal:
            return lines
        return ["__import__('chronos_jupyter.notices', fromlist=['_']).refuse_first_cell()\n"]

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Stopped for the lease: say why, let the widget show it ended, then go as SIGTERM would."""
        try:
            lease = api.get_lease(self.lease_id)
        except ChronosError:
            lease = None
        near_end = lease is not None and (
            lease.state != LeaseState.ACTIVE or lease.expires_at is None
            or lease.expires_at - time.time() <= _NOW_S + 1)
        if lease is not None and near_end:
            with self._lock:
                already = self._ended
                self._ended = True
                self._in_cell = True
            text = end_text(lease, Action.TERMINATE)
            if not already:
                self.say(text)
            if self.on_end_seen is not None:
                with contextlib.suppress(Exception):
                    self.on_end_seen(text)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
                time.sleep(0.3)  # the IOPub thread sends what was just written
        previous = self._previous_term
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def for_kernel(shell: Any, lease_id: str, on_notice: Callable[[str], None],
               on_end_seen: Callable[[str], None]) -> KernelNotices | None:
    """Start the notices for the kernel's own lease, with the provisioner's settings from the config.

    Only in a kernel the provisioner started (its command line carries the settings): elsewhere a
    ``CHRONOS_LEASE_ID`` in the environment gets no thread and no SIGTERM handler.
    """
    config = getattr(shell, "config", None)
    if config is None or CONFIG_SECTION not in config:
        return None
    settings = dict(config.get(CONFIG_SECTION, {}) or {})
    try:
        warn = tuple(float(x) for x in str(settings.get("warn_before", "600,60")).split(",") if x.strip())
        return KernelNotices(
            shell, lease_id, warn_before=warn, on_end=str(settings.get("on_end", "") or "terminate"),
            replaces=str(settings.get("replaces", "") or ""), on_notice=on_notice, on_end_seen=on_end_seen,
            waited=str(settings.get("waited", "") or ""),
        ).start()
    except (ChronosError, TypeError, ValueError) as exc:
        print(f"chronos: the kernel lease's notices are off: {exc}", file=sys.stderr)
        return None


def kernel_args(cmd: list[str], *, warn_before: tuple[float, ...], on_end: str, replaces: str = "",
                waited: str = "") -> list[str]:
    """An IPython kernel's command line, with the Chronos extension and these notices' settings added."""
    if not any(part in ("ipykernel_launcher", "ipykernel") or part.endswith("ipykernel_launcher.py") for part in cmd):
        return cmd  # another language's kernel: its notices stay in the server's log
    extra = ["--ext=chronos_jupyter", f"--{CONFIG_SECTION}.warn_before={','.join(map(str, warn_before))}",
             f"--{CONFIG_SECTION}.on_end={on_end}"]
    if replaces:
        extra.append(f"--{CONFIG_SECTION}.replaces={replaces}")
    if waited:
        extra.append(f"--{CONFIG_SECTION}.waited={waited}")
    return [*cmd, *extra]

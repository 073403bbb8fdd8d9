"""ChronosProvisioner: every Jupyter kernel started from a chronos kernelspec runs inside its own lease.

A kernel.json selects it with ``metadata.kernel_provisioner = {"provisioner_name": "chronos",
"config": {"memory": "8G", "duration": "2h"}}``; each key is also a trait (provisioner_settings).

Life of a kernel:

* start: take the lease (waiting in the queue when ``wait`` is set), give the kernel the lease's
  environment (CUDA_VISIBLE_DEVICES, framework caps, CHRONOS_LEASE_ID) and, for IPython, the
  notices extension (:mod:`chronos_jupyter.notices`); launch it, and bind the lease to its pid;
* restart: the lease is held by the server while the old kernel stops and bound to the new kernel
  once it runs; a restart whose lease is over fails with a message naming the lease;
* end of the lease: ``on_expiry`` decides (terminate by default); auto-restart is stopped first
  so the kernel stays down, and the server is told the kernel is dead;
* shutdown or culling: ``cleanup(restart=False)`` ends what is left of the kernel's processes (those
  it started included) and releases the lease; so does the server's exit, whatever the signal
  (:mod:`chronos_jupyter.teardown`).

Nothing here blocks the server's event loop: every Chronos call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from typing import Any, ClassVar, TypeVar

import chronos
from chronos import procs
from chronos.api import default_engine
from chronos.enforce.watchdog import (
    ExpiryWarning,
    IdleWarning,
    LeaseEndedEvent,
    LedgerTroubleEvent,
    OveruseEvent,
    UnkillableEvent,
    Watchdog,
    WatchdogEvent,
)
from chronos.errors import ChronosError, InvalidRequestError, UnavailableError
from chronos.lease import Lease
from chronos.model import Action, LeaseState
from chronos.request import RequestSpec, parse_request
from chronos.units import check_duration, format_bytes, format_clock, format_duration, parse_duration
from chronos_jupyter.kernel_errors import (
    KernelLeaseEnded,
    KernelLeaseError,
    KernelLeaseInvalid,
    KernelLeaseRefused,
    KernelLeaseUnavailable,
    dialog,
    log_refusals_in_one_line,
    surface,
)
from chronos_jupyter.notices import kernel_args
from chronos_jupyter.provisioner_settings import ProvisionerSettings
from chronos_jupyter.server_hooks import client_gone
from chronos_jupyter.teardown import (
    at_exit_unless_done,
    end_kernel,
    end_processes,
    install_stop_signals,
    kernel_processes,
    track,
    untrack,
)
from chronos_jupyter.threads import Cancelled, in_background, in_daemon_thread, in_thread

EXPIRED, REVOKED = LeaseState.EXPIRED, LeaseState.REVOKED

__all__ = [
    "ChronosProvisioner",
    "KernelLeaseEnded",
    "KernelLeaseError",
    "KernelLeaseInvalid",
    "KernelLeaseRefused",
    "KernelLeaseUnavailable",
    "kernel_label",
]

T = TypeVar("T")

def _queue_text(lease_id: str, position: int | None, when: str | None) -> str:
    place = f"number {position} in line" if position is not None else "queued"
    return f"request {lease_id}, {place}" + (f", expected to start about {when}" if when else "")


#: Notebooks (session names) whose kernel was stopped at its lease's end -> that lease: see notices.
_ended_sessions: dict[str, str] = {}


def kernel_label(kernel_name: str | None, kernel_id: str | None) -> str:
    """The label of a kernel's lease, ``jupyter <kernelspec name> <kernel id>`` (queued or granted)."""
    return f"jupyter {kernel_name or 'kernel'} {kernel_id or ''}".strip()[:190]


# --------------------------------------------------------------------------- the provisioner
class ChronosProvisioner(ProvisionerSettings):
    """A local kernel launched inside a Chronos GPU lease (entry point name ``chronos``)."""

    _lease: Lease | None = None
    _lease_id: str | None = None
    _watch_task: asyncio.Task[None] | None = None
    _ending = False
    watchdog: Watchdog | None = None
    _held_by_server = False
    ended_message: str | None = None
    session_path: str | None = None
    _starting: ClassVar[weakref.WeakSet[ChronosProvisioner]] = weakref.WeakSet()
    _tree: tuple[tuple[int, float], ...] = ()
    _session: str | None = None
    _queue_note = ""
    _waited = ""
    _kernel_pgid: int | None = None

    @classmethod
    def starting(cls) -> list[ChronosProvisioner]:
        """Provisioners here whose kernel waits for its first lease; ``session_path`` names its notebook."""
        return list(cls._starting)

    # -- the lease ------------------------------------------------------------------------
    @property
    def lease(self) -> Lease | None:
        """The kernel's lease as last read (None before the first start)."""
        return self._lease

    @property
    def lease_id(self) -> str | None:
        return self._lease.id if self._lease is not None else self._lease_id

    def _describe(self) -> str:
        spec = self.request()
        count = f"{spec.count} GPUs x " if spec.count > 1 else ""
        assert spec.duration_s is not None
        return f"{count}{spec.memory} for {format_duration(spec.duration_s)}"

    def _label(self) -> str:
        return kernel_label(getattr(self.parent, "kernel_name", None), self.kernel_id)

    def warning_marks(self) -> tuple[float, ...]:
        """Seconds before the lease's end at which the kernel is warned: ``warn_before``, and a minute."""
        return tuple(sorted({m for m in (self._seconds(self.warn_before, 600.0), 60.0) if m > 0}, reverse=True))

    def request(self) -> RequestSpec:
        """The lease each kernel asks for, read from the settings by the core's one request parser."""
        if self.memory in ("", None):
            raise KernelLeaseInvalid(dialog(
                "the chronos kernel provisioner needs a memory size",
                "set \"memory\" (e.g. \"8G\") in the kernelspec's metadata.kernel_provisioner.config, "
                "or c.ChronosProvisioner.memory"))
        try:
            if self.warn_before not in (0, "0"):  # 0: only the last minute's warning
                parse_duration(self.warn_before, what="warn_before")
            check_duration(self.check_interval, shortest=0.05, longest=60.0, what="check_interval")
            device = self.device if self.device not in (None, "", []) else None  # GPU 0 is a choice, not "any"
            return parse_request(self.memory, self.duration, device=device, gpus=self.gpus,
                                 priority=self.priority, wait=self.queue_wait, label=self._label(),
                                 idle_after=self.idle_after or None, on_idle=self.on_idle)
        except InvalidRequestError as exc:
            raise KernelLeaseInvalid(dialog(f"kernelspec {self._kernel_name()!r} has a bad Chronos setting",
                                            str(exc))) from None

    def _kernel_name(self) -> str:
        return str(getattr(self.parent, "kernel_name", None) or "?")

    async def _take_lease(self) -> Lease:
        request = self.request()
        server_pid = os.getpid()
        gone = client_gone.get()  # set when the HTTP client starting this kernel goes away
        said: list[tuple[int | None, str | None]] = []
        queued: list[str] = []
        granted = threading.Event()  # the lease came: a client going away now no longer ends it

        def reserve(cancel: threading.Event) -> Lease:
            def on_wait(update: chronos.WaitUpdate) -> None:
                if not queued:
                    queued.append(update.lease_id)
                if cancel.is_set() or (gone is not None and gone.is_set()):
                    raise Cancelled(update.lease_id)
                when = format_clock(update.estimated_start, seconds=True) if update.estimated_start else None
                if not said or said[-1] != (update.position, when):
                    said.append((update.position, when))
                    self._queue_note = _queue_text(update.lease_id, update.position, when)
                    self.log.info("Chronos: kernel %s waits in the queue: %s", self.kernel_id, self._queue_note)

            try:
                lease = default_engine().submit(request, bind=server_pid, on_wait=on_wait)
                granted.set()
                return lease
            except ChronosError:
                if queued and (cancel.is_set() or (gone is not None and gone.is_set())):
                    raise Cancelled(queued[0]) from None  # withdrawn by withdraw() below
                raise

        def withdraw() -> None:  # the start was given up: the queued request goes now, not at its next look
            if queued:
                default_engine().release(queued[0])

        def client_left() -> None:  # only a request still waiting goes; a granted kernel start carries on
            if not granted.is_set():
                withdraw()

        if gone is not None:
            gone.then(lambda: in_background(client_left))
        waited = at_exit_unless_done(withdraw)

        def given_up() -> None:  # the start was cancelled: withdrawn now (and at exit, should this not finish)
            withdraw()
            waited()

        def late(granted: Lease) -> None:  # granted just as the start was given up
            granted.release()
            waited()

        if request.wait_s is not None:
            self.log.info("Chronos: kernel %s waits in the queue for %s", self.kernel_id, self._describe())
        began = time.monotonic()
        try:
            lease = await in_daemon_thread(reserve, interrupt=given_up, discard=late)
        except Cancelled as stopped:
            waited()
            self.log.warning("Chronos: the client starting kernel %s went away; its queued request %s was "
                             "withdrawn", self.kernel_id, stopped)
            raise KernelLeaseUnavailable(dialog(f"the start of this kernel ({self._describe()}) was given up",
                                                "its client went away; its queued request was withdrawn")) from None
        except ChronosError as exc:
            waited()
            if isinstance(exc, UnavailableError):
                raise KernelLeaseUnavailable(dialog(
                    f"no GPU capacity for this kernel ({self._describe()})",
                    f"{exc}{' (' + self._queue_note + ')' if self._queue_note else ''}",
                    "try again later, or choose a smaller kernel")) from None
            raise surface(exc, dialog("cannot start this kernel", str(exc))) from None
        waited()
        if said:
            self._waited = f"{format_duration(time.monotonic() - began)} ({said[0][0] or '?'} in line at first)"
        self.log.info(
            "Chronos: kernel %s holds lease %s (%s on GPU %s, until %s)", self.kernel_id, lease.id,
            format_bytes(lease.memory_bytes), ",".join(map(str, lease.devices)),
            format_clock(lease.expires_at, seconds=True),
        )
        return lease

    async def _lease_for_restart(self, lease_id: str) -> Lease:
        """The lease a restarted kernel runs in: the same one while it is active."""
        try:
            lease = await in_thread(chronos.get_lease, lease_id)
        except ChronosError as exc:
            await self._give_up()
            raise surface(exc, dialog("cannot restart this kernel", str(exc))) from None
        if lease.active:
            return lease
        now = time.time()
        if lease.state == REVOKED and lease.expires_at is not None and lease.expires_at - now > 1:
            # The kernel died on its own (a crash) and took the lease with it; take the rest of its
            # time again so that auto-restart works as it does without Chronos.
            remaining = lease.expires_at - now
            try:
                fresh = await in_thread(
                    chronos.reserve, lease.memory_bytes, remaining, gpus=len(lease.devices) or None,
                    prefer=list(lease.devices), priority=lease.priority, label=self._label(),
                    bind=os.getpid(), idle_after=self.idle_after or None, on_idle=self.on_idle,
                )
            except ChronosError as exc:
                await self._give_up()
                raise KernelLeaseEnded(dialog(
                    f"lease {lease.id} ended when its kernel exited, and its GPU memory is no longer free",
                    str(exc), "start a new kernel to take a new lease")) from None
            self.log.warning(
                "Chronos: lease %s ended when kernel %s exited; the restarted kernel holds lease %s until %s",
                lease.id, self.kernel_id, fresh.id,
                format_clock(fresh.expires_at, seconds=True),
            )
            return fresh
        await self._give_up()
        raise KernelLeaseEnded(self._ended_text(lease)) from None

    @staticmethod
    def _ended_text(lease: Lease) -> str:
        if lease.state == EXPIRED:
            what = "has expired"
        elif lease.state == REVOKED:
            what = f"has ended ({lease.end_reason or 'its holder exited'})"
        else:
            what = f"was {lease.state}" + (f" ({lease.end_reason})" if lease.end_reason else "")
        return f"lease {lease.id} {what}; start a new kernel to take a new lease"

    async def _give_up(self) -> None:
        """Make a refused restart final: no more auto-restarts, and the server learns the kernel is dead."""
        km = self.parent
        if km is None:
            return
        with contextlib.suppress(Exception):
            km.stop_restarter()
        restarter = getattr(km, "_restarter", None)
        callbacks = list(restarter.callbacks.get("dead", [])) if restarter is not None else []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                self.log.exception("Chronos: a 'dead' callback of kernel %s failed", self.kernel_id)

    async def _hold_by_server(self) -> None:
        """Before the kernel stops for a restart, make the server the holder so the lease survives."""
        lease = self._lease
        if lease is None or self._held_by_server or not lease.active:
            return
        try:
            await in_thread(lease.bind, os.getpid())
            self._held_by_server = True
        except ChronosError as exc:
            self.log.warning("Chronos: could not hold lease %s across the restart: %s", lease.id, exc)

    # -- provisioner hooks ----------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Take the lease (or, on a restart, check it), then build the kernel's environment."""
        first = self._lease is None and self._lease_id is None
        if first:
            install_stop_signals(self.log)
            log_refusals_in_one_line(self.log)
            self.session_path = str((kwargs.get("env") or {}).get("JPY_SESSION_NAME") or "")[:4096] or None
            self._starting.add(self)
            try:
                lease = await self._take_lease()
            finally:
                self._starting.discard(self)
        else:
            lease = await self._lease_for_restart(self.lease_id or "")
        self._lease, self._lease_id = lease, lease.id
        self._held_by_server = True
        try:
            kwargs = await super().pre_launch(**kwargs)
            env = await in_thread(lease.env, kwargs.get("env"))
        except BaseException:
            if first:
                await self._release_quietly()
            raise
        env["CHRONOS_LEASE_ID"] = lease.id
        kwargs["env"] = env
        self._session = str(env.get("JPY_SESSION_NAME") or "") or None
        replaces = _ended_sessions.pop(self._session, "") if first and self._session else ""
        if replaces:
            self.log.warning("Chronos: kernel %s replaces the kernel of %s whose lease %s ended; its first cell "
                             "says so and is not run", self.kernel_id, self._session, replaces)
        kwargs["cmd"] = self._with_notices(list(kwargs.get("cmd") or []), replaces)
        return kwargs

    def _with_notices(self, cmd: list[str], replaces: str) -> list[str]:
        return kernel_args(cmd, warn_before=self.warning_marks(), on_end=self.on_expiry or default_engine().on_expiry,
                           replaces=replaces, waited=self._waited)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Launch, then bind the lease to the kernel's pid: its death ends the lease."""
        info = await super().launch_kernel(cmd, **kwargs)
        lease = self._lease
        assert lease is not None and self.pid is not None
        self._kernel_pgid = self.pgid
        track(self)
        try:
            await in_thread(lease.bind, self.pid)
            self._held_by_server = False
        except ChronosError as exc:
            await self.kill()
            await self.wait()
            raise surface(exc, dialog("kernel stopped", str(exc))) from None
        return info

    async def post_launch(self, **kwargs: Any) -> None:
        await super().post_launch(**kwargs)
        self._start_watch()

    async def send_signal(self, signum: int) -> None:
        # A shutdown (or restart) begins with an interrupt while the kernel still runs: hold the lease
        # by the server now, before the kernel (its holder) exits.
        if getattr(self.parent, "shutting_down", False):
            await self._hold_by_server()
            self._note_tree()
        await super().send_signal(signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        if restart:
            await self._hold_by_server()
        else:
            self._note_tree()
        await super().shutdown_requested(restart=restart)

    def _note_tree(self) -> None:
        """Remember the kernel's processes while it runs: once it exits, its children lose their parent."""
        if self.pid is not None:
            tree = {(pid, started) for pid in procs.descendants(self.pid)
                    if (started := procs.start_time(pid)) is not None}
            self._tree = tuple(sorted(tree | set(self._tree)))

    async def terminate(self, restart: bool = False) -> None:
        if restart:
            await self._hold_by_server()
        await super().terminate(restart=restart)

    async def kill(self, restart: bool = False) -> None:
        if restart:
            await self._hold_by_server()
        await super().kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        """Unless the kernel is about to be restarted: end its processes, then release the lease."""
        self._stop_watch()
        if not restart:
            await self._end_kernel_processes()
            await self._release_quietly()
            untrack(self)
        await super().cleanup(restart=restart)

    def _shutdown_wait(self) -> float:
        return self.get_shutdown_wait_time(float(getattr(self.parent, "shutdown_wait_time", 5.0)))

    async def _end_kernel_processes(self) -> None:
        """Processes the kernel started must not keep GPU memory once its lease is given back."""
        targets = await in_thread(kernel_processes, self.lease_id, self._kernel_pgid or self.pgid, self._tree)
        self._tree = ()
        if targets:
            await self._hold_by_server()  # so that ending its holder does not end the lease as revoked
            self.log.info("Chronos: kernel %s left %d process(es) running (%s); ending them",
                          self.kernel_id, len(targets), ", ".join(str(pid) for pid, _ in targets))
            await in_thread(end_processes, targets, self._shutdown_wait())

    def end_at_exit(self) -> None:
        """The server is exiting with this kernel still up: end the kernel's tree and release its lease."""
        known = list(self._tree)
        if self.pid is not None and (started := procs.start_time(self.pid)) is not None:
            known.append((self.pid, started))
        end_kernel(self.lease_id, self._kernel_pgid, known, min(self._shutdown_wait(), 3.0))

    async def _release_quietly(self) -> None:
        lease_id = self.lease_id
        if lease_id is None:
            return
        try:
            released = await in_thread(chronos.release, lease_id)
            self._lease = released
            self.log.info("Chronos: kernel %s released lease %s", self.kernel_id, lease_id)
        except ChronosError as exc:
            self.log.warning("Chronos: could not release lease %s: %s", lease_id, exc)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Keep the lease id with the rest of the kernel's state (server restarts, HA setups)."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info["chronos_lease_id"] = self.lease_id
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        lease_id = provisioner_info.get("chronos_lease_id")
        self._lease_id = str(lease_id) if lease_id is not None else None
        self._lease = None
        if self._lease_id is not None:
            with contextlib.suppress(ChronosError):
                self._lease = await in_thread(chronos.get_lease, self._lease_id)

    # -- the end of the lease ---------------------------------------------------------------
    def _start_watch(self) -> None:
        self._stop_watch()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - provisioners always run in a loop
            return
        self._watch_task = loop.create_task(self._watch(), name=f"chronos-watch-{self.kernel_id}")

    def _stop_watch(self) -> None:
        task = self._watch_task
        self._watch_task = None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    async def _watch(self) -> None:
        """Host the watchdog for this kernel; once it has ended the kernel, keep it down."""
        lease, pid = self._lease, self.pid
        if lease is None or pid is None:
            return
        kill_wait = self._shutdown_wait()
        warn_at = self.warning_marks()
        # The same action for a lease released by someone else (`chronos release`) as for its end.
        policy = self.on_expiry or default_engine().on_expiry
        self._ending = False
        try:
            dog = await in_thread(
                Watchdog, lease, pid=pid, rate_hz=1.0 / max(0.05, self.check_interval),
                on_overuse=self.on_overuse, on_expiry=policy, on_release=policy,
                kill_wait_s=kill_wait, warn_at=warn_at, on_event=self._on_watchdog_event,
            )
        except ChronosError as exc:
            self.log.warning("Chronos: no watchdog for kernel %s: %s", self.kernel_id, exc)
            return
        self.watchdog = dog
        await dog.run_async()
        if self._ending:
            await self._after_end()

    @staticmethod
    def _seconds(value: str | int | float, fallback: float) -> float:
        try:
            return parse_duration(value)
        except InvalidRequestError:
            return fallback

    def _on_watchdog_event(self, event: WatchdogEvent) -> None:
        """Watchdog events, on the event loop: log them, and stop auto-restart when the lease is over."""
        if isinstance(event, LeaseEndedEvent):
            if event.state == REVOKED:
                return  # the kernel itself exited: the restarter decides what comes next
            self.ended_message = (
                f"lease {event.lease_id} {'has expired' if event.state == EXPIRED else 'was ' + event.state}"
                "; start a new kernel to take a new lease"
            )
            self.log.warning("Chronos: %s (kernel %s, on_expiry=%s)", self.ended_message, self.kernel_id,
                             event.action)
            if event.action in (Action.TERMINATE, Action.KILL):
                self._ending = True
                if self._session:
                    _ended_sessions[self._session] = event.lease_id
                km = self.parent
                if km is not None:
                    with contextlib.suppress(Exception):
                        km.stop_restarter()  # the kernel must stay down
        elif isinstance(event, (ExpiryWarning, IdleWarning, OveruseEvent, UnkillableEvent, LedgerTroubleEvent)):
            self.log.warning("Chronos: kernel %s: %s", self.kernel_id, event.message)
        else:
            self.log.info("Chronos: kernel %s: %s", self.kernel_id, event.message)

    async def _after_end(self) -> None:
        """The watchdog ended the kernel for its lease: reap it, free its resources, report it dead."""
        if await self.poll() is None:
            self.log.warning("Chronos: kernel %s outlived its lease's end", self.kernel_id)
            return
        await self.wait()
        # Free what the kernel held (its ports, its connection file) but leave the manager usable:
        # the server may still ask it to restart or shut down, and must get a clear answer.
        await self.cleanup(restart=False)
        if self.parent is not None:
            with contextlib.suppress(Exception):
                self.parent.cleanup_connection_file()
        await self._give_up()

"""The service's client: the engine interface (:class:`chronos.ops.EngineOps`) over the socket.

Every lease operation is one request to ``chronos serve``, which decides it with the kernel's word
for who asks; this side never opens a ledger. What is about this process only (its environment and
framework caps, its watchdog) is done here, with figures the service gives.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from chronos import accounting, scheduler
from chronos import settings as settings_module
from chronos.accounting import DeviceStatus
from chronos.config import Config
from chronos.devices import Backend, backend_for
from chronos.enforce import caps
from chronos.errors import NotAllowedError, UnavailableError
from chronos.lease import Lease
from chronos.ledger import Event  # noqa: TID251 - the audit log's record type only, no ledger access
from chronos.limits import Limits
from chronos.model import Action, LeaseRecord, Priority, WaitUpdate
from chronos.policy.report import Report
from chronos.request import FOREVER, RequestSpec, parse_request
from chronos.service import codec
from chronos.service.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_ROWS,
    VERSION,
    ProtocolError,
    dump,
    error_from_wire,
    read_message,
)
from chronos.settings import Settings
from chronos.units import MemorySpec

__all__ = ["DEFAULT_SOCKET", "ServiceEngine", "request_to_wire"]


class _Identified(Protocol):
    @property
    def id(self) -> Any: ...


#: A row of history as the client reads it: a lease or an audit line.
_Row = TypeVar("_Row", bound=_Identified)

DEFAULT_SOCKET = Path("/run/chronos/chronos.sock")
#: How long an answer may take (a write waits at most the ledger's busy timeout); a queued request
#: gets a progress line every second (:data:`chronos.service.server.WAIT_HEARTBEAT_S`) however long it waits.
REPLY_TIMEOUT_S = 120.0
WAIT_LINE_TIMEOUT_S = 60.0


def request_to_wire(spec: RequestSpec) -> dict[str, Any]:
    """A parsed request as the protocol's ``request`` object (the service parses it again, its own way)."""
    memory: int | float = spec.memory.nbytes if spec.memory.nbytes is not None else float(spec.memory.fraction or 0)
    wait: float | str | None = "forever" if spec.wait_s == FOREVER else spec.wait_s
    return {
        "memory": memory, "duration": spec.duration_s, "device": list(spec.devices) if spec.devices else None,
        "gpus": spec.gpus, "prefer": list(spec.prefer) or None,
        "priority": str(spec.priority) if spec.priority is not None else None, "wait": wait, "label": spec.label,
        "idle_after": spec.idle_after_s, "on_idle": str(spec.on_idle) if spec.on_idle is not None else None,
    }


def _bind(bind: bool | int) -> bool | int:
    """This process is named by the kernel (its pid in the service's namespace), never by number."""
    return True if bind is not True and bind is not False and bind == os.getpid() else bind


class _Connection:
    """One socket to the service, used by one thread of one process."""

    def __init__(self, path: Path) -> None:
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")
        self.next_id = 0

    def usable(self) -> bool:
        """Still open, in the process that opened it, with nothing unread (the service closes idle sockets)."""
        if self.pid != os.getpid():
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class ServiceEngine:
    """An engine whose every lease operation is served by ``chronos serve`` at ``path``."""

    def __init__(self, path: str | Path = DEFAULT_SOCKET, *, settings: Settings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings or settings_module.current()
        self._local = threading.local()
        self._backend: Backend | None = None
        self._hello: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._open: list[_Connection] = []

    # -- the wire -------------------------------------------------------------------------
    def _connect(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.usable():
            return conn
        if conn is not None:
            conn.close()
        try:
            conn = _Connection(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UnavailableError(
                f"the Chronos service is not running at {self.path}: start it with "
                f"`chronos serve --socket {self.path}` (or `systemctl start chronos`), or ask your administrator"
            ) from None
        except PermissionError:
            raise NotAllowedError(f"may not connect to the Chronos service at {self.path}: ask your administrator "
                                  "to make the socket reachable for every user") from None
        except OSError as exc:
            raise UnavailableError(f"cannot reach the Chronos service at {self.path}: {exc.strerror or exc}") from None
        self._local.conn = conn
        with self._lock:
            self._open = [c for c in self._open if c.pid == os.getpid()] + [conn]
        return conn

    def call(self, op: str, args: Mapping[str, Any] | None = None, *,
             on_wait: Callable[[dict[str, Any]], None] | None = None, waits: bool = False) -> Any:
        """Send one request and return its result; a refusal raises the error the service raised."""
        conn = self._connect()
        conn.next_id += 1
        message = {"v": VERSION, "id": conn.next_id, "op": op, "args": dict(args or {})}
        try:
            conn.sock.settimeout(WAIT_LINE_TIMEOUT_S if waits else REPLY_TIMEOUT_S)
            conn.sock.sendall(dump(message))
            while True:
                line = conn.reader.readline(MAX_MESSAGE_BYTES + 1)
                if not line:
                    raise ConnectionResetError(errno.ECONNRESET, "closed")
                reply = read_message(line)
                if "wait" in reply:
                    if on_wait is not None:
                        on_wait(reply["wait"])
                    continue
                break
        except (OSError, ProtocolError) as exc:
            conn.close()
            self._local.conn = None
            raise UnavailableError(
                f"the Chronos service at {self.path} went away during {op} ({exc}); "
                "`chronos list` shows whether it was done"
            ) from None
        except BaseException:  # Ctrl-C mid-request: the service sees the socket close (a queued wait withdraws)
            conn.close()
            self._local.conn = None
            raise
        if reply.get("ok"):
            return reply.get("result")
        raise error_from_wire(reply.get("error"))

    def _lease(self, data: Any) -> Lease:
        lease: Lease = codec.decode(Lease, data, self)
        return lease

    def _pages(self, op: str, args: dict[str, Any], cursor: str, limit: int | None,
               decode: Callable[[Any], list[_Row]]) -> list[_Row]:
        """Every row of a history request (``limit`` at most), a page at a time: an answer holds at most
        :data:`MAX_ROWS`, and the next page starts after the last row's id (the ``cursor`` argument)."""
        found: list[_Row] = []
        while True:
            want = MAX_ROWS if not limit else min(MAX_ROWS, limit - len(found))
            page = decode(self.call(op, {**args, "limit": want}))
            found.extend(page)
            if len(page) < want or (limit and len(found) >= limit):
                return found
            args = {**args, cursor: page[-1].id}

    def _leases(self, data: Any) -> list[Lease]:
        found: list[Lease] = codec.decode(list[Lease], data, self)
        return found

    def hello(self) -> dict[str, Any]:
        """The service's greeting: protocol version, ledger name, and who it takes this process for."""
        found: dict[str, Any] = self.call("hello")
        self._hello = found
        return found

    # -- plumbing -------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def on_expiry(self) -> Action:
        return self.settings.config.on_expiry

    @property
    def backend(self) -> Backend:
        """This process's view of the GPUs (for its own watchdog); the service decides with its own."""
        if self._backend is None:
            self._backend = backend_for(self.settings)
        return self._backend

    @property
    def ledger_id(self) -> str:
        hello = self._hello or self.hello()
        return str(hello["ledger"])

    def close(self) -> None:
        with self._lock:
            for conn in self._open:
                if conn.pid == os.getpid():
                    conn.close()
            self._open.clear()
        self._local = threading.local()

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled lease finds a client of the same service (a fresh connection, in its own process).
        return (ServiceEngine, (str(self.path),))

    # -- operations -----------------------------------------------------------------------
    def reserve(
        self,
        memory: str | int | float | MemorySpec,
        duration: str | int | float | None = None,
        *,
        device: int | str | Sequence[int] | None = None,
        gpus: int | None = None,
        prefer: int | str | Sequence[int] | None = None,
        priority: Priority | str | None = None,
        label: str | None = None,
        user: str | None = None,
        bind: bool | int = True,
        wait: bool | float | str | None = False,
        on_wait: Callable[[WaitUpdate], None] | None = None,
        idle_after: str | int | float | None = None,
        on_idle: str | None = None,
    ) -> Lease:
        spec = parse_request(memory, duration, device=device, gpus=gpus, prefer=prefer, priority=priority,
                             wait=wait, label=label, idle_after=idle_after, on_idle=on_idle)
        return self.submit(spec, user=user, bind=bind, on_wait=on_wait)

    def submit(self, spec: RequestSpec, *, user: str | None = None, bind: bool | int = True,
               on_wait: Callable[[WaitUpdate], None] | None = None) -> Lease:
        def progress(data: dict[str, Any]) -> None:
            if on_wait is not None:
                on_wait(codec.decode(WaitUpdate, data))

        args = {"request": request_to_wire(spec), "user": user, "bind": _bind(bind)}
        return self._lease(self.call("reserve", args, on_wait=progress, waits=spec.wait_s is not None))

    def forecast(self, spec: RequestSpec, *, user: str | None = None) -> scheduler.Decision:
        decision: scheduler.Decision = codec.decode(
            scheduler.Decision, self.call("forecast", {"request": request_to_wire(spec), "user": user}))
        return decision

    def snapshot(self) -> tuple[scheduler.Snapshot, list[Lease]]:
        found: tuple[scheduler.Snapshot, list[Lease]] = codec.decode(
            tuple[scheduler.Snapshot, list[Lease]], self.call("snapshot"), self)
        return found

    def release(self, lease_id: str) -> Lease:
        return self._lease(self.call("release", {"lease_id": str(lease_id)}))

    def extend(self, lease_id: str, duration: str | int | float) -> Lease:
        return self._lease(self.call("extend", {"lease_id": str(lease_id), "duration": duration}))

    def bind(self, lease_id: str, pid: int | None) -> Lease:
        return self._lease(self.call("bind", {"lease_id": str(lease_id), "pid": _bind(pid) if pid else None}))

    def get(self, lease_id: str) -> Lease:
        return self._lease(self.call("get", {"lease_id": str(lease_id)}))

    def book(self, memory: str | int | float | MemorySpec, duration: str | int | float | None, at: str | float, *,
             device: int | str | Sequence[int] | None = None, gpus: int | None = None, label: str | None = None,
             user: str | None = None) -> Lease:
        spec = parse_request(memory, duration, device=device, gpus=gpus, label=label)
        return self._lease(self.call("book", {"request": request_to_wire(spec), "at": at, "user": user}))

    def claim(self, booking_id: str, *, bind: bool | int = True) -> Lease:
        return self._lease(self.call("claim", {"booking_id": str(booking_id), "bind": _bind(bind)}))

    def bookings(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
                 after: str | None = None) -> list[Lease]:
        args: dict[str, Any] = {"all": all, "user": user, "after": after}
        if not all:
            return self._leases(self.call("bookings", args))
        return self._pages("bookings", args, "after", limit, self._leases)

    def leases(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
               before: str | int | None = None, ended_since: float | None = None) -> list[Lease]:
        args: dict[str, Any] = {"all": all, "user": user, "limit": limit,
                                "before": None if before is None else str(before), "ended_since": ended_since}
        if not all and ended_since is None:
            return self._leases(self.call("leases", args))
        return self._pages("leases", args, "before", limit, self._leases)

    def active_records(self) -> list[LeaseRecord]:
        found: list[LeaseRecord] = codec.decode(list[LeaseRecord], self.call("active_records"))
        return found

    def devices(self) -> list[DeviceStatus]:
        found: list[DeviceStatus] = codec.decode(list[DeviceStatus], self.call("devices"))
        return found

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float, *, note: str | None = None) -> None:
        self.call("record_usage", {"lease_id": str(lease_id), "peak_bytes": int(peak_bytes),
                                   "gpu_seconds": float(gpu_seconds), "note": note})

    def events(self, *, since: float | None = None, lease_id: str | None = None, after: int | None = None,
               limit: int | None = None) -> list[Event]:
        def lines(data: Any) -> list[Event]:
            found: list[Event] = codec.decode(list[Event], data)
            return found

        return self._pages("events", {"since": since, "lease_id": lease_id, "after": after}, "after", limit, lines)

    def report(self, *, since: float, by: str = "user") -> Report:
        found: Report = codec.decode(Report, self.call("report", {"since": since, "by": by}))
        return found

    def metrics(self) -> str:
        return str(self.call("metrics"))

    def limits_for(self, user: str | None = None) -> Limits:
        found: Limits = codec.decode(Limits, self.call("limits_for", {"user": user}))
        return found

    # -- a lease in this process ----------------------------------------------------------
    def membership(self, leases: Sequence[LeaseRecord],
                   roots: dict[str, tuple[int, float | None]] | None = None) -> accounting.Membership:
        return accounting.Membership(leases, roots, ledger=self.ledger_id)

    def _totals(self) -> dict[str, int]:
        return {d.uuid: d.memory_total_bytes for d in self.devices()}

    def lease_env(self, record: LeaseRecord, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return caps.lease_env(record, self._totals(), base, self.settings.context_reserve_bytes, self.ledger_id)

    def apply_caps(self, record: LeaseRecord) -> list[str]:
        return caps.apply_caps(record, self._totals(), reserve_bytes=self.settings.context_reserve_bytes,
                               ledger=self.ledger_id)

    def lease_usage(self, record: LeaseRecord) -> dict[int, int | None]:
        found: dict[int, int | None] = codec.decode(dict[int, int | None],
                                                    self.call("lease_usage", {"lease_id": record.id}))
        return found

    def activate(self, lease: Lease, **options: Any) -> AbstractContextManager[Any]:
        from chronos.enforce.activation import Activation

        return Activation(lease, **options)

"""Each operation of the protocol: its arguments checked, then the engine asked as the caller.

The caller is a :class:`Peer`, the uid, gid and pid the kernel gave for the socket (SO_PEERCRED);
nothing in a request says who is asking. Every engine call runs as that user and for that process
(:func:`chronos.identity.acting_as`, :func:`chronos.procs.acting_for`), so the engine's own rules
(owner or admin, limits) decide exactly as they do in embedded mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from chronos import identity, procs
from chronos.engine import Engine
from chronos.errors import InvalidRequestError, NotAllowedError
from chronos.identity import User, is_admin
from chronos.lease import Lease
from chronos.model import WaitUpdate
from chronos.request import RequestSpec, parse_request
from chronos.service import codec
from chronos.service.protocol import MAX_ROWS, VERSION, ProtocolError
from chronos.service.rates import WriteRates
from chronos.service.reports import ReportChildren
from chronos.text import plain

__all__ = ["OPS", "RATED_OPS", "WAITING_OPS", "WRITE_OPS", "Call", "Peer", "handle", "undo_grant"]


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel says (pid in the service's namespace)."""

    uid: int
    gid: int
    pid: int
    started: float


@dataclass
class Call:
    """One request being served: its peer, its arguments, and how to report progress."""

    engine: Engine
    peer: Peer
    args: Mapping[str, Any]
    progress: Callable[[WaitUpdate], None] | None = None
    #: A lease this request granted, released again if its answer cannot be delivered.
    granted: str | None = None
    #: The process a lease was just granted or bound to (the holder watch watches it from now on).
    holder: tuple[int, float | None] | None = None
    #: Where reports are built: the service's child processes (:mod:`chronos.service.reports`); None: here.
    reports: ReportChildren | None = None
    #: Whether the client has gone away (a long read then stops).
    gone: Callable[[], bool] = lambda: False
    #: How fast each user may write (:mod:`chronos.service.rates`); None: no limit.
    rates: WriteRates | None = None

    def took(self, lease: Lease, *, granted: bool) -> Any:
        """Note what a grant or bind did, and the lease's wire form."""
        if granted:
            self.granted = lease.id
        if lease.pid is not None:
            self.holder = (lease.pid, lease.pid_start)
        return codec.encode(lease)

    def arg(self, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
        """Argument ``name``, of one of ``kinds`` (or null); anything else is bad input."""
        value = self.args.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in kinds:
            raise ProtocolError(f"argument {name!r} must be {_names(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise ProtocolError(f"argument {name!r} must be {_names(kinds)}, not {type(value).__name__}")
        return value

    @property
    def user(self) -> User:
        return identity.current_user()

    @property
    def admin(self) -> bool:
        return is_admin(self.user, self.engine.config.admin_group)


def _names(kinds: tuple[type, ...]) -> str:
    words = {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds))


_SCALAR = (str, int, float)
_REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "memory": _SCALAR, "duration": _SCALAR, "device": (int, str, list), "gpus": (int, str), "prefer": (int, str, list),
    "priority": (str,), "wait": (bool, int, float, str), "label": (str,), "idle_after": _SCALAR, "on_idle": (str,),
}


def _request(call: Call) -> RequestSpec:
    """The ``request`` argument read by the one request parser (:func:`chronos.request.parse_request`)."""
    raw = call.arg("request", (dict,))
    if raw is None or "memory" not in raw:
        raise InvalidRequestError("a request needs memory, such as \"8G\" or \"50%\"")
    unknown = sorted(set(raw) - set(_REQUEST_FIELDS))
    if unknown:
        raise ProtocolError(f"unknown request field {unknown[0]!r}: use {', '.join(_REQUEST_FIELDS)}")
    fields = Call(call.engine, call.peer, raw)
    values = {name: fields.arg(name, kinds) for name, kinds in _REQUEST_FIELDS.items()}
    for name in ("device", "prefer"):
        if isinstance(values[name], list) and not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in values[name]):
            raise ProtocolError(f"request field {name!r} must be an array of GPU indices")
    if values["wait"] == "forever":
        values["wait"] = True
    return parse_request(values.pop("memory"), values.pop("duration"), device=values.pop("device"),
                         gpus=values.pop("gpus"), prefer=values.pop("prefer"), priority=values.pop("priority"),
                         wait=values.pop("wait"), label=values.pop("label"), idle_after=values.pop("idle_after"),
                         on_idle=values.pop("on_idle"))


def _bind(call: Call, name: str, default: bool | int | None) -> bool | int | None:
    """A holder the caller may name: itself (true), none (false), or a process of its own (an admin: any)."""
    value = call.arg(name, (bool, int), default)
    if value is True or value is False or value is None:
        return value
    if value <= 0:
        raise InvalidRequestError(f"bind takes true, false or a process id, got {value}")
    owner = procs.uid_of(value)
    if owner is None:
        raise InvalidRequestError(f"no running process {value} to bind the lease to")
    if owner != call.peer.uid and not call.admin:
        raise NotAllowedError(f"process {value} is not yours: a lease can be bound only to your own processes "
                              "(an admin may bind any)")
    return int(value)


def _lease_id(call: Call, name: str = "lease_id") -> str:
    value = call.arg(name, (str, int))
    if value is None:
        raise InvalidRequestError(f"argument {name!r} is missing: name a lease such as 7")
    return str(value)


# -- the operations -------------------------------------------------------------------------
def _hello(call: Call) -> Any:
    return {"version": VERSION, "ledger": call.engine.ledger_id, "uid": call.peer.uid, "gid": call.peer.gid,
            "pid": call.peer.pid, "user": call.user.name, "admin": call.admin}


def _reserve(call: Call) -> Any:
    spec = _request(call)
    lease = call.engine.submit(spec, user=call.arg("user", (str,)), bind=_bind(call, "bind", True) or False,
                               on_wait=call.progress if spec.wait_s is not None else None)
    return call.took(lease, granted=True)


def _release(call: Call) -> Any:
    return codec.encode(call.engine.release(_lease_id(call)))


def _extend(call: Call) -> Any:
    duration = call.arg("duration", _SCALAR)
    if duration is None:
        raise InvalidRequestError("argument 'duration' is missing: give one such as \"30m\"")
    return codec.encode(call.engine.extend(_lease_id(call), duration))


def _bind_op(call: Call) -> Any:
    pid = _bind(call, "pid", None)
    holder = procs.caller()[0] if pid is True else (pid or None)
    return call.took(call.engine.bind(_lease_id(call), holder), granted=False)


def _get(call: Call) -> Any:
    return codec.encode(call.engine.get(_lease_id(call)))


def _limit(call: Call) -> int | None:
    limit: int | None = call.arg("limit", (int,))
    if limit is not None and limit < 0:
        raise InvalidRequestError("limit must be zero or more")
    return limit


def _page(call: Call) -> int:
    """A read of history's ``limit``: at most one page (:data:`MAX_ROWS`), a page if none is asked for."""
    return min(_limit(call) or MAX_ROWS, MAX_ROWS)


def _leases(call: Call) -> Any:
    since = call.arg("ended_since", (int, float))
    if since is not None and not math.isfinite(since):
        raise InvalidRequestError("ended_since must be a finite time in seconds since the epoch")
    every = bool(call.arg("all", (bool,), False))
    limit = _page(call) if every or since is not None else _limit(call)  # history: a page at a time
    return codec.encode(call.engine.leases(all=every, user=call.arg("user", (str,)), limit=limit,
                                           before=call.arg("before", (str,)),
                                           ended_since=None if since is None else float(since)))


def _bookings(call: Call) -> Any:
    every = bool(call.arg("all", (bool,), False))
    return codec.encode(call.engine.bookings(all=every, user=call.arg("user", (str,)),
                                             limit=_page(call) if every else None,
                                             after=call.arg("after", (str,))))


def _book(call: Call) -> Any:
    spec = _request(call)
    at = call.arg("at", (str, int, float))
    if at is None:
        raise InvalidRequestError("argument 'at' is missing: give a start such as \"tomorrow 09:00\" or \"+2h\"")
    memory = spec.memory
    return codec.encode(call.engine.book(memory, spec.duration_s, at, device=spec.devices, gpus=spec.gpus,
                                         label=spec.label, user=call.arg("user", (str,))))


def _claim(call: Call) -> Any:
    lease = call.engine.claim(_lease_id(call, "booking_id"), bind=_bind(call, "bind", True) or False)
    return call.took(lease, granted=True)


def _forecast(call: Call) -> Any:
    return codec.encode(call.engine.forecast(_request(call), user=call.arg("user", (str,))))


def _snapshot(call: Call) -> Any:
    return codec.encode(call.engine.snapshot())


def _active_records(call: Call) -> Any:
    return codec.encode(call.engine.active_records())


def _devices(call: Call) -> Any:
    return codec.encode(call.engine.devices())


def _owned(call: Call) -> Any:
    """The named lease, if the caller owns it or is an admin."""
    lease = call.engine.get(_lease_id(call))
    if lease.uid != call.peer.uid and not call.admin:
        raise NotAllowedError(f"lease {lease.id} belongs to {lease.owner}; only its owner or an admin may do that")
    return lease


def _record_usage(call: Call) -> Any:
    lease = _owned(call)
    peak, seconds = call.arg("peak_bytes", (int,), 0), call.arg("gpu_seconds", (int, float), 0.0)
    if peak < 0 or seconds < 0:
        raise InvalidRequestError("usage figures are zero or more")
    note = call.arg("note", (str,))
    call.engine.record_usage(lease.id, peak, float(seconds), note=None if note is None else plain(note[:500]))
    return None


def _lease_usage(call: Call) -> Any:
    return codec.encode(call.engine.lease_usage(call.engine.get(_lease_id(call)).record))


def _events(call: Call) -> Any:
    since = call.arg("since", (int, float))
    lease_id = call.arg("lease_id", (str, int))
    after = call.arg("after", (int,))
    if after is not None and after < 0:
        raise InvalidRequestError("after must be zero or more")
    return codec.encode(call.engine.events(since=since, lease_id=str(lease_id) if lease_id is not None else None,
                                           after=after, limit=_page(call)))


def _report(call: Call) -> Any:
    since = call.arg("since", (int, float))
    if since is None:
        raise InvalidRequestError("argument 'since' is missing: give a time in epoch seconds")
    by = call.arg("by", (str,), "user")
    if call.reports is None:
        return codec.encode(call.engine.report(since=float(since), by=by))
    return codec.encode(call.reports.build(since=float(since), by=by, gone=call.gone))


def _metrics(call: Call) -> Any:
    return call.engine.metrics()


def _limits_for(call: Call) -> Any:
    return codec.encode(call.engine.limits_for(call.arg("user", (str,))))


#: Operation name -> handler. Every name here is documented in docs/protocol.md.
OPS: dict[str, Callable[[Call], Any]] = {
    "hello": _hello, "reserve": _reserve, "release": _release, "extend": _extend, "bind": _bind_op, "get": _get,
    "leases": _leases, "bookings": _bookings, "book": _book, "claim": _claim, "forecast": _forecast,
    "snapshot": _snapshot, "active_records": _active_records, "devices": _devices, "record_usage": _record_usage,
    "lease_usage": _lease_usage, "events": _events, "report": _report, "metrics": _metrics,
    "limits_for": _limits_for,
}
#: Operations that change the ledger.
WRITE_OPS = frozenset({"reserve", "release", "extend", "bind", "book", "claim"})
#: Writes counted against their user's rate (:mod:`chronos.service.rates`): every one that may add to the
#: audit log (a usage record may carry a note), but a release, which ends what a counted write began, and is
#: never held back (a lease it could not end would stay held).
RATED_OPS = (WRITE_OPS - {"release"}) | {"record_usage"}
#: Operations that may wait in the queue (served on a thread of their own, not the worker pool).
WAITING_OPS = frozenset({"reserve"})


@contextmanager
def _as(peer: Peer) -> Iterator[None]:
    with identity.acting_as(peer.uid), procs.acting_for(peer.pid, peer.started):
        yield


def handle(call: Call, op: str) -> Any:
    """Serve ``op`` for ``call.peer``; raises the engine's error on refusal."""
    handler = OPS.get(op)
    if handler is None:
        raise ProtocolError(f"unknown operation {op!r}: see docs/protocol.md")
    with _as(call.peer):
        if op in RATED_OPS and call.rates is not None:
            call.rates.take(call.peer.uid, exempt=lambda: call.admin)
        return handler(call)


def undo_grant(engine: Engine, peer: Peer, lease_id: str) -> None:
    """End a lease whose grant its caller never learned of (the connection closed first)."""
    with _as(peer):
        engine.release(lease_id)

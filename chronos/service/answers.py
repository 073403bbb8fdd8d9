"""A request's answer line: its operation run as the caller (:mod:`chronos.service.handlers`), the result
or the error in the wire form, and a group of writes run in one ledger transaction (group commit)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from chronos.engine import Engine
from chronos.errors import ChronosError
from chronos.service.handlers import Call, handle
from chronos.service.protocol import MAX_MESSAGE_BYTES, VERSION, dump, error_to_wire

__all__ = ["ClientGone", "Outcome", "answer", "error_line", "plain_id", "run_group", "waits"]

log = logging.getLogger("chronos.service")

#: A served request: its answer line, the lease it granted (undone if the line is never delivered), and
#: the process it made a holder (watched from then on).
Outcome = tuple[bytes, str | None, tuple[int, float | None] | None]


class ClientGone(Exception):
    """The client closed its connection while its request was served (a queued wait withdraws)."""


def error_line(request_id: Any, exc: ChronosError) -> bytes:
    return dump({"v": VERSION, "id": request_id, "ok": False, "error": error_to_wire(exc)})


def answer(call: Call, op: str, request_id: Any) -> Outcome:
    """``op`` served for ``call``. Every failure becomes its answer line: a refusal as the engine raised
    it, a bug as one line to the client (the trace goes to the log), a client gone as no line at all."""
    granted = None
    try:
        result = handle(call, op)
        granted = call.granted
        data = dump({"v": VERSION, "id": request_id, "ok": True, "result": result})
        if len(data) > MAX_MESSAGE_BYTES * 16:
            raise ChronosError("the answer is too long to send: ask for less (a limit, a user)")
    except ChronosError as exc:
        data = error_line(request_id, exc)
    except ClientGone:
        data = b""
    except Exception as exc:  # a bug must not take the service down
        log.exception("operation %s failed", op)
        data = error_line(request_id, ChronosError(f"the service failed on {op}: {exc}"))
    return data, granted, call.holder


def run_group(engine: Engine, writes: Sequence[tuple[Any, Callable[[], Outcome]]]) -> list[Outcome]:
    """Group commit: each ``(request id, serve)`` served in turn inside one ledger transaction
    (:meth:`chronos.engine.Engine.batch`), each decided on what the ones before it left. If the commit
    fails, nothing of the group was written, and each request is answered with that error."""
    try:
        with engine.batch():
            return [serve() for _request_id, serve in writes]
    except Exception as exc:
        if not isinstance(exc, ChronosError):
            log.exception("group commit failed")
        failure = exc if isinstance(exc, ChronosError) else ChronosError(f"the service failed to write: {exc}")
        return [(error_line(request_id, failure), None, None) for request_id, _serve in writes]


def plain_id(value: Any) -> int | str | None:
    """A request's ``id`` as it may be echoed: a number or a short string, else nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value if not isinstance(value, str) or len(value) <= 200 else None


def waits(args: dict[str, Any]) -> bool:
    """Whether a reservation's arguments ask it to wait in the queue."""
    request = args.get("request")
    return isinstance(request, dict) and request.get("wait") not in (None, False, "", "no", "false")

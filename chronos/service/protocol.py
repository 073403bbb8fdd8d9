"""The wire format: one JSON object per line over a Unix stream socket, versioned, bounded.

A request is ``{"v": 1, "id": N, "op": NAME, "args": {...}}``; its answer is
``{"v": 1, "id": N, "ok": true, "result": ...}`` or ``{"v": 1, "id": N, "ok": false,
"error": {"code": CODE, "message": TEXT, "exit": EXIT}}``. A queued request may be answered first by
progress lines ``{"v": 1, "id": N, "wait": {...}}``. Error codes map one to one onto the classes of
:mod:`chronos.errors` and so onto the CLI's exit codes. docs/protocol.md is the reference.
"""

from __future__ import annotations

import json
from typing import Any

from chronos.errors import (
    BackendError,
    ChronosError,
    InvalidRequestError,
    LeaseNotFoundError,
    LimitError,
    NotAllowedError,
    StateError,
    UnavailableError,
)

__all__ = [
    "ERROR_CODES",
    "MAX_MESSAGE_BYTES",
    "MAX_ROWS",
    "VERSION",
    "ProtocolError",
    "dump",
    "error_from_wire",
    "error_to_wire",
    "read_message",
]

VERSION = 1
#: The longest line either side accepts, newline included (a longer one is refused, never buffered).
MAX_MESSAGE_BYTES = 1 << 20
#: The most rows of history (ended leases, audit lines) one answer holds; a client asks for the next page
#: (``before``, ``after``). Every request then costs the service a bounded read, memory and time, whatever
#: the history's length.
MAX_ROWS = 1000

#: Wire code -> error class; the most specific class first, so a reply names exactly what was raised.
ERROR_CODES: dict[str, type[ChronosError]] = {
    "limit": LimitError,
    "bad_input": InvalidRequestError,
    "unavailable": UnavailableError,
    "not_allowed": NotAllowedError,
    "no_such_lease": LeaseNotFoundError,
    "state": StateError,
    "backend": BackendError,
    "error": ChronosError,
}


class ProtocolError(InvalidRequestError):
    """A message that breaks the protocol: not JSON, too long, wrong version or shape."""


def error_to_wire(exc: ChronosError) -> dict[str, Any]:
    """``exc`` as the ``error`` member of an answer."""
    code = next(code for code, cls in ERROR_CODES.items() if isinstance(exc, cls))
    wire: dict[str, Any] = {"code": code, "message": str(exc), "exit": exc.exit_code}
    if isinstance(exc, LimitError):
        wire["rule"] = exc.rule
    if isinstance(exc, UnavailableError) and exc.could_wait:
        wire["could_wait"] = True  # the client's front end then suggests --wait
    return wire


def error_from_wire(wire: Any) -> ChronosError:
    """The error an answer's ``error`` member names, as the class that was raised in the service."""
    if not isinstance(wire, dict):
        return ProtocolError(f"the service sent a malformed error: {wire!r:.200}")
    message = str(wire.get("message", "the service gave no reason"))
    cls = ERROR_CODES.get(str(wire.get("code")), ChronosError)
    if cls is LimitError:
        return LimitError(str(wire.get("rule") or "limit"), message)
    if cls is UnavailableError:
        return UnavailableError(message, could_wait=wire.get("could_wait") is True)
    return cls(message)


def read_message(line: bytes) -> dict[str, Any]:
    """One received line as a JSON object (the newline already stripped or not)."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message too long: at most {MAX_MESSAGE_BYTES} bytes a line")
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not a JSON message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message is a JSON object")
    return message


#: ``json.dumps(..., separators=(",", ":"), allow_nan=False)`` made once (each call would build it again).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dump(message: dict[str, Any]) -> bytes:
    """``message`` as one line on the wire."""
    return _ENCODER.encode(message).encode() + b"\n"

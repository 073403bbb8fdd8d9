"""Why a kernel start was refused, as errors both jupyter_server and plain Python understand."""

from __future__ import annotations

import logging
import textwrap
from typing import Any

from tornado.web import HTTPError

from chronos.errors import ChronosError, InvalidRequestError, NotAllowedError, UnavailableError

__all__ = [
    "KernelLeaseEnded",
    "KernelLeaseError",
    "KernelLeaseInvalid",
    "KernelLeaseRefused",
    "KernelLeaseUnavailable",
    "OneLineRefusals",
    "dialog",
    "log_refusals_in_one_line",
    "one_line",
    "surface",
]

#: JupyterLab shows a refusal in its "Error Starting Kernel" dialog inside <pre>: lines do not wrap.
DIALOG_WIDTH = 76


def dialog(headline: str, *details: str) -> str:
    """A refusal as JupyterLab's dialog shows it well: what happened on the first line, then why and
    what to do, each wrapped to the dialog's width."""
    lines = [headline]
    for detail in details:
        if detail:
            lines.extend(textwrap.wrap(detail, DIALOG_WIDTH, subsequent_indent="  ", break_on_hyphens=False)
                         or [detail])
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A :func:`dialog` text as one line: parts joined by "; ", wrapped lines (indented) rejoined."""
    out = ""
    for line in message.splitlines():
        if line.startswith("  ") and out:
            out += " " + line.strip()
        else:
            out += ("; " if out else "") + line.strip()
    return out


class KernelLeaseError(HTTPError, ChronosError):
    """A kernel start refused by Chronos, with a message meant for the notebook user.

    It is a tornado HTTPError so that jupyter_server's REST handlers put the message itself in the
    reply (``POST /api/kernels`` shows ``log_message``, ``POST /api/sessions`` shows ``str()``)
    instead of "Unhandled error", and a ChronosError so that code outside a server can catch it.
    """

    status = 500

    def __init__(self, message: str) -> None:
        HTTPError.__init__(self, self.status, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class KernelLeaseUnavailable(KernelLeaseError, UnavailableError):
    """No capacity now (or the queue wait ran out): HTTP 503."""

    status = 503


class KernelLeaseEnded(KernelLeaseError, UnavailableError):
    """The kernel's lease is over, so it may not be (re)started: HTTP 409."""

    status = 409


class KernelLeaseInvalid(KernelLeaseError, InvalidRequestError):
    """The kernelspec's Chronos settings are wrong: HTTP 400."""

    status = 400


class KernelLeaseRefused(KernelLeaseError, NotAllowedError):
    """A policy forbids this lease: HTTP 403."""

    status = 403


def surface(exc: ChronosError, message: str) -> KernelLeaseError:
    if isinstance(exc, KernelLeaseError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return KernelLeaseInvalid(message)
    if isinstance(exc, NotAllowedError):
        return KernelLeaseRefused(message)
    if isinstance(exc, UnavailableError):
        return KernelLeaseUnavailable(message)
    return KernelLeaseError(message)


class OneLineRefusals(logging.Filter):
    """A refused kernel start is logged as one line (Jupyter logs it with a traceback, twice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KernelLeaseError):
            if getattr(exc, "_chronos_logged", False):
                return False  # jupyter_client and the server's kernel manager both log it
            exc._chronos_logged = True  # type: ignore[attr-defined]
            record.exc_info = None
            record.exc_text = None
            record.msg = "Chronos refused a kernel start: %s"
            record.args = (one_line(exc.message),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_filtered: set[int] = set()


def log_refusals_in_one_line(log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Put :class:`OneLineRefusals` on the server's logger (once)."""
    logger = log.logger if isinstance(log, logging.LoggerAdapter) else log
    if id(logger) not in _filtered:
        _filtered.add(id(logger))
        logger.addFilter(OneLineRefusals())

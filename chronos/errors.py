"""One error hierarchy; each class carries the CLI exit code it maps to."""

from __future__ import annotations

import errno

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ERROR",
    "EXIT_NOT_ALLOWED",
    "EXIT_NO_SUCH_LEASE",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "WAIT_HINT",
    "BackendError",
    "ChronosError",
    "InvalidRequestError",
    "LeaseNotFoundError",
    "LimitError",
    "NamespaceError",
    "NotAllowedError",
    "StateError",
    "UnavailableError",
    "as_chronos_error",
    "with_hint",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_ALLOWED = 4
EXIT_NO_SUCH_LEASE = 5


class ChronosError(Exception):
    """Base of every error Chronos raises on purpose; the message is one line for a person."""

    exit_code: int = EXIT_ERROR


class InvalidRequestError(ChronosError, ValueError):
    """Bad input: unparsable, out of range, or a request that could never fit on this machine."""

    exit_code = EXIT_BAD_INPUT


class UnavailableError(ChronosError):
    """The request is valid but cannot be satisfied now (not enough free memory, queue timeout).

    ``could_wait`` marks a request that would have been queued with ``--wait``: the CLI and the magics
    then say so (:data:`WAIT_HINT`); a kernel start, whose waiting the kernelspec decides, does not.
    """

    exit_code = EXIT_UNAVAILABLE
    could_wait: bool = False

    def __init__(self, message: str, *, could_wait: bool = False) -> None:
        super().__init__(message)
        self.could_wait = could_wait


#: What a front end whose request takes ``--wait`` adds to a refusal that could have waited.
WAIT_HINT = "add --wait to queue until it fits"


class NamespaceError(UnavailableError):
    """This process reads pids in another pid namespace than the ledger's (a container sharing the state
    directory): it cannot tell whose holders are alive, so it must not judge them (exit 3)."""


class NotAllowedError(ChronosError, PermissionError):
    """The caller may not do this: another user's lease, admin-only options, a policy limit."""

    exit_code = EXIT_NOT_ALLOWED


class LimitError(NotAllowedError):
    """A configured limit refused the request; ``rule`` names it (``max_duration``, ``max_gpus_per_user``...)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class LeaseNotFoundError(ChronosError, LookupError):
    """No lease has this id."""

    exit_code = EXIT_NO_SUCH_LEASE


class BackendError(ChronosError):
    """The GPU backend failed (NVML missing or returning an error)."""


class StateError(ChronosError):
    """The state directory or ledger is unsafe or unusable (symlinks, foreign owner, corruption)."""


def as_chronos_error(exc: BaseException) -> ChronosError | None:
    """The one-line Chronos error for a failure of the machine under a command (a full disk, a read-only
    file system, a damaged or foreign ledger file), which front ends print instead of a traceback;
    None for anything else (a bug, which should still be seen)."""
    if isinstance(exc, ChronosError):
        return exc
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return StateError(f"no space left on the device{where}: free some space and try again")
        if exc.errno == errno.EROFS:
            return StateError(f"the file system is read-only{where}: ask the administrator, or set CHRONOS_STATE_DIR")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return NotAllowedError(f"permission denied{where}: ask the administrator, or run `chronos doctor`")
        return StateError(f"{exc.strerror or exc}{where}")
    if type(exc).__module__ == "sqlite3":  # only the ledger speaks SQL; what escaped it says the file is unusable
        text = " ".join(str(exc).split()) or type(exc).__name__
        if "full" in text:
            return StateError(f"the ledger cannot be written ({text}): free some space and try again")
        return StateError(f"the ledger cannot be used ({text}): run `chronos doctor`, and ask the administrator "
                          "if it names the file as damaged")
    return None


def with_hint(exc: ChronosError) -> str:
    """``exc``'s message as a front end that takes ``--wait`` says it (the CLI, the magics)."""
    if isinstance(exc, UnavailableError) and exc.could_wait:
        return f"{exc}; {WAIT_HINT}"
    return str(exc)

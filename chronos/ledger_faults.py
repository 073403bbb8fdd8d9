"""What the ledger's file troubles mean for a person, and how long a write may wait for the lock.

SQLite's errors name a condition ("database or disk is full", "attempt to write a readonly
database"); :func:`ledger_error` turns each into one line saying what happened and what to do. The
watchdog's writes wait less for another process's lock than a command's do (:func:`patience`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chronos.errors import StateError
from chronos.state import write_trouble

__all__ = ["check_wal_files", "ledger_error", "patience", "patience_ms"]

_patience = threading.local()


@contextmanager
def patience(seconds: float) -> Iterator[None]:
    """Writes made by this thread inside the block wait at most ``seconds`` for another process's
    write lock (the watchdog's records: enforcement must never stall behind a held lock)."""
    before = getattr(_patience, "ms", None)
    _patience.ms = max(0, int(seconds * 1000))
    try:
        yield
    finally:
        _patience.ms = before


def ledger_error(exc: Exception, path: Path) -> StateError:
    """One line for a person about what SQLite ran into, and what to do about it."""
    text = str(exc)
    if "full" in text:
        return StateError(f"the file system holding ledger {path} is full: free space there, then try again")
    if "readonly" in text or "read-only" in text:
        why = write_trouble(path)
        return StateError(f"ledger {path} cannot be written: {why or 'permission denied'}")
    if "locked" in text or "busy" in text:
        return StateError(f"ledger {path} is locked by another process (a write lock held past the wait); "
                          f"try again, or see who holds it with: fuser {path}")
    if "not a database" in text or "malformed" in text:
        return StateError(f"ledger {path} is unusable ({text}): restore it from a backup "
                          "(see docs/trust-model.md)")
    if "disk I/O" in text:
        why = write_trouble(path)
        if why is not None and why.endswith("is full: free space there"):
            return StateError(f"the file system holding ledger {path} is full: free space there, then try again")
        return StateError(f"ledger {path}: disk I/O error{f' ({why})' if why else ''}; check the file system")
    return StateError(f"ledger {path}: {text}")


def patience_ms() -> int | None:
    """This thread's wait for the lock in milliseconds, inside :func:`patience` (None: the ledger's own)."""
    return getattr(_patience, "ms", None)


def check_wal_files(path: Path, seen: tuple[int, int] | None) -> tuple[int, int] | None:
    """The inodes of the ledger's ``-wal`` and ``-shm`` files, checked against those this connection saw
    before (inside a write: while any connection is open SQLite keeps both). Removed or replaced under
    it, they are another set of files from the one newer processes use: writing on would split the ledger."""
    try:
        now = (os.stat(f"{path}-wal").st_ino, os.stat(f"{path}-shm").st_ino)
    except FileNotFoundError:
        now = None
    if seen is not None and now != seen:
        raise StateError(f"ledger {path}: its -wal or -shm file was removed or replaced while this process had "
                         "the ledger open, so its writes would no longer reach other processes; restart this "
                         "process (see docs/trust-model.md)")
    return now if seen is None else seen

"""Waiting in the queue without a timer per waiter: one leader plans, each waiter sleeps until rung.

Hundreds of queued requests must cost next to nothing while nothing changes, so a waiter does not
poll the ledger. It sleeps on its *doorbell*, a Linux abstract Unix datagram socket named after the
ledger and its lease (no file, gone with the process; nothing else listens), and takes the write
lock only when rung to say its request can start (or when its own deadline comes).

One waiter on the machine is the *leader*: whoever holds ``flock`` on ``chronos.db.lock`` beside the
ledger. Its thread notices every change cheaply (``PRAGMA data_version``, the next lease end, holders'
liveness once a second), plans the queue once per change in a read, and rings the waiters that can
start now, and the others when their place changes. When the leader's own request is granted it
hands the lock on and rings the next waiter to take it; when it dies the kernel frees the lock and
the next waiter to wake takes it. Every waiter also wakes now and then on its own (:data:`CHECK_S`):
it takes the lead when nobody holds it, and when the leader's heartbeat (the lock file's time) is
stale, as for a stopped leader, it decides for itself as waiters did before.

Where none of this is available (another OS, an abstract name taken, a lock file this user cannot
make), a waiter falls back to polling at :data:`POLL_S`.
"""

from __future__ import annotations

import json
import os
import random
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronos import threads
from chronos.state import file_mode_for

if TYPE_CHECKING:
    import socket

__all__ = ["CHECK_S", "HEARTBEAT_S", "LEADER_POLL_S", "POLL_S", "Doorbell", "Leadership", "lock_path", "ring"]

#: How often a waiter with no doorbell re-checks (the old way; also where no leader can be).
POLL_S = 0.2
#: How often a sleeping waiter wakes on its own (jittered): the leader's health, its own row.
CHECK_S = 5.0
#: How often the leader looks for a change (one cheap read).
LEADER_POLL_S = 0.1
#: How often the leader touches the lock file, and how old a touch means the leader is gone.
HEARTBEAT_S = 0.5
STALE_S = 3.0

_LINUX = sys.platform.startswith("linux")


def lock_path(ledger_path: Path) -> Path:
    """The leader's lock file beside the ledger (``chronos.db.lock``)."""
    return Path(f"{ledger_path}.lock")


def _name(ledger: str, lease_id: str) -> bytes:
    return f"\0chronos-wait-{ledger}-{lease_id}".encode()


def ring(ledger: str, lease_id: str, message: dict[str, Any]) -> None:
    """Wake ``lease_id``'s waiter, if one sleeps (never blocks, never raises)."""
    if not _LINUX:
        return
    import socket  # only where a queue is: every command start would pay ~4 ms for it

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(json.dumps(message).encode(), _name(ledger, lease_id))
    except OSError:
        pass  # nobody waits there (any more), or its buffer is full: it wakes on its own


class Doorbell:
    """One waiter's doorbell; ``usable`` is False where it could not be made (then poll)."""

    def __init__(self, ledger: str, lease_id: str) -> None:
        self._sock: socket.socket | None = None
        if not _LINUX:
            return
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(_name(ledger, lease_id))
        except OSError:  # the name is taken: someone squats it, so this waiter polls
            sock.close()
            return
        self._sock = sock

    @property
    def usable(self) -> bool:
        return self._sock is not None

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Messages that arrived within ``timeout`` seconds (empty: none), all of them drained."""
        if self._sock is None:
            time.sleep(max(0.0, timeout))
            return []
        out: list[dict[str, Any]] = []
        self._sock.settimeout(max(0.0, timeout))
        try:
            data = self._sock.recv(4096)
        except (TimeoutError, BlockingIOError, OSError):
            return out
        self._sock.setblocking(False)
        while True:
            try:
                message = json.loads(data)
            except ValueError:
                message = None
            if isinstance(message, dict):  # anyone may ring: what is said is only a hint, checked after
                out.append(message)
            if len(out) > 64:
                break
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, OSError):
                break
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Leadership:
    """The leader's lock beside the ledger, and, while this process holds it, the thread that leads."""

    def __init__(self, ledger_path: Path, lead: Callable[[], None]) -> None:
        self.path = lock_path(ledger_path)
        self._lead = lead
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def leader_alive(self) -> bool:
        """True when a leader touched the lock file lately."""
        try:
            return time.time() - os.stat(self.path).st_mtime < STALE_S
        except OSError:
            return False

    def try_take(self) -> bool:
        """Become the leader if nobody is; True when this process leads now."""
        if self._fd is not None or not _LINUX:
            return self._fd is not None
        import fcntl

        try:  # made with the ledger's own sharing, so that any later leader may touch it
            made = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            pass
        else:
            try:
                os.fchmod(made, file_mode_for(self.path.parent))
            finally:
                os.close(made)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")  # a planted FIFO or device: no leader from here
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        self._touch()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="chronos-queue-leader", daemon=True)
        self._thread.start()
        return True

    def _touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass  # not ours to touch: waiters then see no heartbeat and also decide for themselves

    def _run(self) -> None:
        beat = 0.0
        while not self._stop.wait(LEADER_POLL_S):
            now = time.monotonic()
            if now >= beat:
                self._touch()
                beat = now + HEARTBEAT_S
            try:
                self._lead()
            except Exception:  # a failed round (a busy ledger, a backend hiccup) is retried next poll
                pass

    def give_up(self) -> None:
        """Stop leading and free the lock (the caller rings the next waiter)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        threads.join(thread)
        if self._fd is not None:
            os.close(self._fd)  # closing frees the flock
            self._fd = None


def check_after() -> float:
    """A sleeping waiter's next look of its own, jittered so that hundreds do not wake together."""
    return CHECK_S * random.uniform(0.8, 1.2)

"""The SQLite ledger: schema, migrations, short write transactions and the append-only audit log.

This is the only module that speaks SQL. Every write runs in ``BEGIN IMMEDIATE`` so that
the read-decide-write of an admission is atomic across processes.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from chronos import procs
from chronos.errors import StateError
from chronos.ledger_faults import check_wal_files, ledger_error, patience, patience_ms
from chronos.model import Action, IdleNotice, LeaseRecord, LeaseState, OnIdle, Priority, evolve
from chronos.state import prepare_file

__all__ = ["DB_NAME", "SCHEMA_VERSION", "Event", "Ledger", "patience", "queue_patience"]

DB_NAME = "chronos.db"
BUSY_TIMEOUT_MS = 30_000
#: Every this many commits a process asks its checkpoint thread to copy the WAL into the database, so that
#: no request waits for a checkpoint's fsync; SQLite's own checkpoint (in a commit) is only the backstop.
CHECKPOINT_EVERY = 32
#: The longest a request that may wait in the queue also waits for the ledger's write lock.
QUEUE_LOCK_WAIT_S = 600.0
AUTOCHECKPOINT_PAGES = 8000


class _Lock:
    """The connection's re-entrant lock, which knows whether the calling thread holds it (a read apart
    must not miss that thread's own uncommitted writes)."""

    __slots__ = ("_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> _Lock:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
        self._lock.release()

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()


@dataclass(frozen=True)
class Event:
    """One line of the audit log: who did what to which lease, when."""

    id: int
    at: float
    lease_id: str
    event: str
    uid: int
    user: str
    pid: int
    detail: dict[str, Any]


_V1 = (
    """CREATE TABLE leases (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        uid INTEGER NOT NULL,
        owner TEXT NOT NULL,
        devices TEXT NOT NULL,
        device_uuids TEXT NOT NULL,
        memory_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        expires_at REAL,
        duration_s REAL NOT NULL,
        priority TEXT NOT NULL,
        state TEXT NOT NULL,
        label TEXT,
        pid INTEGER,
        pid_start REAL,
        ended_at REAL,
        end_reason TEXT,
        peak_memory_bytes INTEGER,
        gpu_seconds REAL,
        request TEXT
    )""",
    "CREATE INDEX leases_state ON leases(state)",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        lease_seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        pid INTEGER NOT NULL,
        detail TEXT NOT NULL
    )""",
    "CREATE INDEX events_at ON events(at)",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
)


#: A booking's planned start (a lease booked ahead, state ``booked``, is granted in its window).
_V2_BOOKINGS = ("ALTER TABLE leases ADD COLUMN starts_at REAL",
                "CREATE INDEX leases_starts ON leases(starts_at) WHERE starts_at IS NOT NULL")
#: Idle leases: since when no member process used GPU time, and the warning given (JSON: when, what, by when).
_V3_IDLE = ("ALTER TABLE leases ADD COLUMN idle_since REAL", "ALTER TABLE leases ADD COLUMN idle_warning TEXT")
#: What the ender of a lease asks of its processes (an idle lease terminated), for the watchdog to do.
_V4_END_ACTION = ("ALTER TABLE leases ADD COLUMN end_action TEXT",)
#: Counting the rare events the metrics count (refusals, no-shows, idle warnings), and recent use (fair share),
#: without a scan; the frequent events (grants, releases) stay out of the index.
_V5_INDEXES = (
    "CREATE INDEX events_rare ON events(event) WHERE event IN ('refused', 'no-show', 'idle-warning')",
    "CREATE INDEX leases_ended ON leases(ended_at)",
)
#: Bounded history: one owner's newest leases without a scan (advice, ``list --all --user``), and an audit
#: log that stays append-only for every lease still on file, so retention may drop a pruned lease's events.
_V7_HISTORY = (
    "CREATE INDEX leases_owner ON leases(uid, seq)",
    "DROP TRIGGER events_no_delete",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        WHEN EXISTS (SELECT 1 FROM leases WHERE seq = old.lease_seq)
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only while its lease is on file'); END""",
)
#: Only ended leases in the index of end times: a new lease writes one index page fewer per grant.
_V8_ENDED = (
    "DROP INDEX leases_ended",
    "CREATE INDEX leases_ended ON leases(ended_at) WHERE ended_at IS NOT NULL",
)

def _start_ticks(conn: sqlite3.Connection) -> None:
    """Holders' starts from clock-derived times (boot time + start tick, which a clock step moves) to the
    start ticks themselves; the host table records the boot they count in."""
    if procs.boot_id() is None:
        return  # not Linux: starts stay psutil's times
    conn.execute("UPDATE leases SET pid_start = ROUND((pid_start - ?) * ?) - ? WHERE pid_start IS NOT NULL",
                 (procs.legacy_boot_time(), procs.clock_ticks(), procs.boottime_offset()))
    conn.execute("INSERT OR REPLACE INTO host (key, value) VALUES ('boot_id', ?)", (procs.boot_id(),))


#: Facts the holders are read against: the boot their start ticks count in, the pid namespace of their pids.
_V6_HOLDERS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    "CREATE TABLE host (key TEXT PRIMARY KEY, value TEXT NOT NULL)", _start_ticks)

#: Migration i+1 takes a ledger from schema version i to i+1: statements run in one transaction.
MIGRATIONS: Sequence[Sequence[str | Callable[[sqlite3.Connection], None]]] = (
    _V1, _V2_BOOKINGS, _V3_IDLE, _V4_END_ACTION, _V5_INDEXES, _V6_HOLDERS, _V7_HISTORY, _V8_ENDED)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "seq, uid, owner, devices, device_uuids, memory_bytes, created_at, started_at, expires_at, duration_s, "
    "priority, state, label, pid, pid_start, ended_at, end_reason, peak_memory_bytes, gpu_seconds, request, "
    "starts_at, idle_since, idle_warning, end_action"
)


def queue_patience(wait_s: float | None) -> AbstractContextManager[None]:
    """The lock wait of a write by a request that may still wait ``wait_s`` in the queue: as long as that (at
    most :data:`QUEUE_LOCK_WAIT_S`), never shorter than the ledger's own. Hundreds of processes starting on a
    small machine can keep the lock from one for longer than the usual wait; a request that asked to wait
    must not fail for that. A request that does not wait (None), or a shorter patience already set (the
    watchdog's), keeps the wait it has."""
    if wait_s is None or patience_ms() is not None:
        return nullcontext()
    return patience(min(max(wait_s, BUSY_TIMEOUT_MS / 1000), QUEUE_LOCK_WAIT_S))


class Ledger:
    """One connection to the ledger file; safe to share between threads of one process.

    Every read and every transaction holds one lock, so a thread never sees another thread's
    uncommitted write on the shared connection (a kernel runs its main, widget and watchdog
    threads on one engine).
    """

    def __init__(self, directory: Path) -> None:
        path = Path(directory) / DB_NAME
        self._lock = _Lock()
        #: History reads through a second connection of their own (:meth:`read_history_apart`).
        self._apart = False
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        if not os.path.lexists(path):
            _create(path)
        self.path = prepare_file(path)
        if os.stat(self.path).st_size == 0:
            # A new ledger is built aside and linked into place whole, so an empty one was emptied.
            raise StateError(f"ledger {self.path} is empty (0 bytes): it was truncated or made by hand, and "
                             "Chronos will not start it afresh over leases it may have held; restore it from a "
                             "backup, or remove it if no lease matters (see docs/trust-model.md)")
        self._connect()

    def _connect(self) -> None:
        self._close_reader()  # a connection made again (the file was replaced): its reads apart too
        self._commits = 0
        #: The thread running a :meth:`batch` (its transactions are savepoints), and whether the batch failed.
        self._batch_owner: int | None = None
        self._batch_broken = False
        self._checkpoints: threading.Event | None = None
        #: The open leases by id, oldest first, as of ``_open_version`` plus this connection's own writes.
        self._open_rows: dict[int, LeaseRecord] | None = None
        self._open_version = -1
        #: The rows of the open leases as last read, for those whose kept record was built from them and not
        #: changed by this connection since: read again, an equal row is the same record, not a change.
        self._open_raw: dict[int, tuple[Any, ...]] = {}
        #: Which read of the open leases ``_open_rows`` began as, and the ids this connection changed since.
        self._open_epoch = getattr(self, "_open_epoch", 0) + 1
        self._open_log: list[int] = []
        #: Inside a write transaction (BEGIN IMMEDIATE: no other connection can commit until it ends), and
        #: whether ``_open_rows`` was checked against ``data_version`` in it: then once is enough.
        self._writing = False
        self._checked_in_write = False
        self._wal_files: tuple[int, int] | None = None
        #: What this transaction did outside the ledger, to put right if it is rolled back (:meth:`on_undo`).
        self._undo: list[Callable[[], None]] = []
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._setup()
            self._wal_files = check_wal_files(self.path, None)  # this connection's -wal and -shm
        except sqlite3.Error as exc:
            raise ledger_error(exc, self.path) from None

    def _setup(self) -> None:
        """WAL mode and the schema, retried while other processes do the same on a new file.

        Two connections switching a new file to WAL at once can deadlock on their locks; SQLite then
        answers "database is locked" at once, without its busy handler, so the wait is ours.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
                self._migrate()
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.002, 0.02))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self._close_reader()

    def read_history_apart(self) -> None:
        """From now on, reads of history (ended leases, the audit log, counts over them) made by a thread
        that holds no transaction go through a second connection, which in WAL mode reads the last
        committed state while writes go on. The service asks this: one client's long report must not
        hold every other client's writes for its whole length."""
        self._apart = True

    def _close_reader(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _read_history(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query over history: apart, where asked and this thread is not inside a transaction
        (whose own writes it must see), else under the connection's lock like every read."""
        if not self._apart or self._lock.held_here():
            return self._read(sql, params)
        with self._reader_lock:
            try:
                if self._reader is None:
                    self._reader = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                                   check_same_thread=False)
                    self._reader.execute("PRAGMA query_only = 1")
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise ledger_error(exc, self.path) from None

    # -- schema ---------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"ledger {self.path} has schema {version}, newer than this Chronos understands "
                f"({SCHEMA_VERSION}); upgrade Chronos"
            )
        while version < SCHEMA_VERSION:
            with self.transaction():
                # Another process may have migrated while we waited for the lock.
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version < SCHEMA_VERSION:
                    for statement in MIGRATIONS[version]:
                        if callable(statement):
                            statement(self._conn)
                        else:
                            self._conn.execute(statement)
                    version += 1
                    self._conn.execute(f"PRAGMA user_version = {version}")

    @property
    def identity(self) -> str:
        """This ledger file's name on this machine (device and inode): a lease's processes carry it,
        so lease 7 here is never taken for lease 7 of another state directory."""
        info = os.stat(self.path)
        return f"{info.st_dev:x}-{info.st_ino:x}"

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def _waiting(self) -> Iterator[None]:
        """This thread's patience (:func:`patience`) as SQLite's busy timeout, for one write."""
        ms = patience_ms()
        if ms is None:
            yield
            return
        try:  # set inside: a stop raised as it returns must not leave this thread's patience for every later write
            self._conn.execute(f"PRAGMA busy_timeout = {ms}")
            yield
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    @contextmanager
    def transaction(self) -> Iterator[Ledger]:
        """A short write transaction (BEGIN IMMEDIATE): reads inside it see a stable ledger.

        Every SQLite error inside it (a full disk, a lock held past the wait, a read-only file)
        rolls it back and is raised as one :class:`StateError` that says what happened.
        """
        if self._batch_owner == threading.get_ident():
            with self._savepoint():
                yield self
            return
        with self._lock, self._waiting():
            self._undo = []
            self._writing, self._checked_in_write = True, False
            began = False
            try:
                # BEGIN is inside the ``try``: a signal raised as an exception the moment it returns (a stop while
                # it waited for the lock) must roll it back too, or this connection's next write fails.
                if self._conn.in_transaction:  # one that such a stop left open all the same: nothing of it stands
                    self._open_rows = None
                    self._conn.execute("ROLLBACK")
                self._conn.execute("BEGIN IMMEDIATE")
                began = True
                self._wal_files = check_wal_files(self.path, self._wal_files)
                yield self
                self._writing = False
                self._conn.execute("COMMIT")
            except BaseException as exc:
                self._writing = False
                if began or self._conn.in_transaction:
                    self._open_rows = None  # it holds this transaction's writes: read again
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite may have rolled back already (a full disk)
                self._run_undo(0)
                if isinstance(exc, sqlite3.Error):
                    raise ledger_error(exc, self.path) from None
                raise
            else:
                self._undo = []
                self._commits += 1
                if self._commits % CHECKPOINT_EVERY == 0:
                    self._checkpoint_soon()

    def on_undo(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` if the write transaction (or the batch's operation) in progress is rolled back:
        for what a write changed outside the ledger, such as a device file's ACL, which must follow
        the ledger back. Once per transaction for the same hook; nothing happens on commit."""
        if hook not in self._undo:
            self._undo.append(hook)

    def _run_undo(self, mark: int) -> None:
        hooks, self._undo[mark:] = self._undo[mark:], []
        for hook in hooks:
            try:
                hook()
            except Exception as exc:  # the rollback stands; the hook's owner heals it later
                import logging  # only here: every command start would pay for it

                logging.getLogger("chronos.ledger").warning("after a rollback: %s", exc)

    @contextmanager
    def batch(self) -> Iterator[Ledger]:
        """Group commit: one write transaction for several operations, run by this thread one after another.

        Each :meth:`transaction` this thread opens inside it is a SAVEPOINT: it sees what the ones before
        it wrote, and a failure undoes it alone. They all commit together at the end, or none does (a
        failed commit, or a write that made SQLite give up the whole transaction, raises StateError here).
        """
        with self.transaction():
            self._batch_owner, self._batch_broken = threading.get_ident(), False
            try:
                yield self
            finally:
                self._batch_owner = None
            if self._batch_broken or not self._conn.in_transaction:
                raise StateError(f"ledger {self.path}: a write failed and took its whole transaction with it; "
                                 "nothing of this group of requests was written")

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        """One operation inside :meth:`batch`, undone alone if it fails."""
        if self._batch_broken or not self._conn.in_transaction:
            self._batch_broken = True
            raise StateError(f"ledger {self.path}: an earlier write of this group failed and ended its transaction")
        try:
            self._conn.execute("SAVEPOINT operation")
        except sqlite3.Error as exc:
            self._batch_broken = True
            raise ledger_error(exc, self.path) from None
        mark = len(self._undo)
        try:
            yield
            self._conn.execute("RELEASE operation")
        except BaseException as exc:
            self._open_rows = None  # it may hold the undone writes: read again
            try:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK TO operation")
                    self._conn.execute("RELEASE operation")
                    self._run_undo(mark)
                else:
                    self._batch_broken = True  # SQLite rolled back everything (a full disk)
            except sqlite3.Error:
                self._batch_broken = True
            if isinstance(exc, sqlite3.Error):
                raise ledger_error(exc, self.path) from None
            raise

    def _checkpoint_soon(self) -> None:
        """Wake this process's checkpoint thread (started on first use): a PASSIVE checkpoint on its own
        connection copies the WAL back while requests go on; it never blocks a writer."""
        if self._checkpoints is None:
            self._checkpoints = threading.Event()
            threading.Thread(target=_checkpointer, args=(self.path, self._checkpoints), name="chronos-checkpoint",
                             daemon=True).start()
        self._checkpoints.set()

    # -- leases ---------------------------------------------------------------------------
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query, under the connection's lock."""
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise ledger_error(exc, self.path) from None

    def insert(self, lease: LeaseRecord, request: dict[str, Any] | None = None) -> str:
        cur = self._conn.execute(
            f"INSERT INTO leases ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?)",
            (
                lease.uid, lease.owner, json.dumps(list(lease.devices)), json.dumps(list(lease.device_uuids)),
                lease.memory_bytes, lease.created_at, lease.started_at, lease.expires_at, lease.duration_s,
                str(lease.priority), str(lease.state), lease.label, lease.pid, lease.pid_start, lease.ended_at,
                lease.end_reason, lease.peak_memory_bytes, lease.gpu_seconds,
                json.dumps(request) if request is not None else None,
                lease.starts_at, lease.idle_since, _notice_text(lease.idle_warning),
                str(lease.end_action) if lease.end_action is not None else None,
            ),
        )
        assert cur.lastrowid is not None
        if self._open_rows is not None and lease.state in _OPEN:
            self._open_rows[cur.lastrowid] = evolve(lease, id=str(cur.lastrowid))
            self._changed(cur.lastrowid)
        return str(cur.lastrowid)

    _UPDATABLE = frozenset(
        {"devices", "device_uuids", "memory_bytes", "started_at", "expires_at", "state", "pid", "pid_start",
         "ended_at", "end_reason", "peak_memory_bytes", "gpu_seconds", "idle_since", "idle_warning", "end_action",
         "label"}
    )

    def update(self, lease_id: str, **fields: Any) -> None:
        unknown = set(fields) - self._UPDATABLE
        assert not unknown, unknown
        values = [json.dumps(list(v)) if k in ("devices", "device_uuids") else _notice_text(v) if k == "idle_warning"
                  else str(v) if isinstance(v, (LeaseState, Action)) else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(f"UPDATE leases SET {assignments} WHERE seq = ?", (*values, int(lease_id)))
        self._apply(int(lease_id), fields)

    def _apply(self, seq: int, fields: dict[str, Any]) -> None:
        """This connection's own change to an open lease, made to the kept copy too."""
        if self._open_rows is None:
            return
        found = self._open_rows.get(seq)
        if found is None:
            if "state" in fields and LeaseState(fields["state"]) in _OPEN:
                self._open_rows = None  # an ended lease open again (never done): read again
            return
        typed: dict[str, Any] = {k: tuple(v) if k in ("devices", "device_uuids") else LeaseState(v) if k == "state"
                 else Action(v) if k == "end_action" and v is not None else v for k, v in fields.items()}
        record = evolve(found, **typed)
        if record.state in _OPEN:
            self._open_rows[seq] = record
        else:
            del self._open_rows[seq]
        self._changed(seq)

    def _changed(self, seq: int) -> None:
        """Note a change to the kept open lease ``seq`` for :meth:`open_changes`; a long log starts a new epoch."""
        self._open_raw.pop(seq, None)  # its kept record is no longer the one its last-read row made
        if len(self._open_log) >= 4096:
            self._open_log = []
            self._open_epoch += 1
        self._open_log.append(seq)

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float) -> None:
        """Store a lease's figures (inside a transaction): the peak only ever grows."""
        with self._lock:
            self._conn.execute(
                "UPDATE leases SET peak_memory_bytes = MAX(COALESCE(peak_memory_bytes, 0), ?), "
                "gpu_seconds = ? WHERE seq = ?",
                (int(peak_bytes), float(gpu_seconds), int(lease_id)),
            )
            found = self._open_rows.get(int(lease_id)) if self._open_rows is not None else None
            if found is not None:
                self._apply(int(lease_id), {"peak_memory_bytes": max(found.peak_memory_bytes or 0, int(peak_bytes)),
                                            "gpu_seconds": float(gpu_seconds)})

    def get(self, lease_id: str) -> LeaseRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM leases WHERE seq = ?", (int(lease_id),))
        return _lease(rows[0]) if rows else None

    def queued_requests(self) -> dict[str, dict[str, Any]]:
        """The stored request of every queued lease, by id, in one read."""
        rows = self._read("SELECT seq, request FROM leases WHERE state = ?", (str(LeaseState.QUEUED),))
        return {str(seq): json.loads(text) for seq, text in rows if text}

    def request_of(self, lease_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT request FROM leases WHERE seq = ?", (int(lease_id),))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def in_states(self, *states: LeaseState) -> list[LeaseRecord]:
        marks = ", ".join("?" for _ in states)
        rows = self._read(f"SELECT {_COLUMNS} FROM leases WHERE state IN ({marks}) ORDER BY seq",
                          [str(state) for state in states])
        return [_lease(r) for r in rows]

    def _open(self) -> list[LeaseRecord]:
        """Active, queued and booked leases, oldest first. Kept while no other connection commits (``PRAGMA
        data_version``), this connection's own writes applied as made: a write does not re-read every live
        lease, yet sees every other process's change."""
        with self._lock:
            return list(self._open_now().values())

    def _open_now(self) -> dict[int, LeaseRecord]:
        if self._writing and self._checked_in_write and self._open_rows is not None and self._conn.in_transaction:
            return self._open_rows  # checked in this write, and no other connection has committed since
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        self._checked_in_write = self._writing
        if self._open_rows is None or version != self._open_version:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM leases WHERE state IN (?, ?, ?) ORDER BY seq",
                                      [str(state) for state in _OPEN]).fetchall()
            self._open_rows = self._reread(rows)
            self._open_version = version
        return self._open_rows

    def _reread(self, rows: list[tuple[Any, ...]]) -> dict[int, LeaseRecord]:
        """The open leases from ``rows``, read afresh after another connection committed. A lease whose row is
        as last read keeps its record; the others are logged as changed (:meth:`open_changes`), so a view
        applies what another process changed instead of being rebuilt. With nothing kept, a new epoch."""
        kept, raw = self._open_rows, self._open_raw
        fresh: dict[int, LeaseRecord] = {}  # new ids are the largest: order holds
        changed: list[int] = []
        for row in rows:
            seq = row[0]
            if kept is not None and seq in kept and raw.get(seq) == row:
                fresh[seq] = kept[seq]
            else:
                fresh[seq] = _lease(row)
                changed.append(seq)
        if kept is None:
            self._open_epoch += 1
            self._open_log = []
        else:
            changed += [seq for seq in kept if seq not in fresh]
            for seq in changed:
                self._changed(seq)
        self._open_raw = {row[0]: row for row in rows}
        return fresh

    def open_changes(self, since: tuple[int, int]
                     ) -> tuple[tuple[int, int], Mapping[int, LeaseRecord], list[int] | None]:
        """The open leases by id now, a token for them, and the ids changed since token ``since`` (None when
        they were read afresh since: another connection committed, or a write rolled back). Call it with
        :meth:`locked` held, and read the mapping only while it is held."""
        with self._lock:
            try:
                rows = self._open_now()
            except sqlite3.Error as exc:
                raise ledger_error(exc, self.path) from None
            token = (self._open_epoch, len(self._open_log))
            changed = self._open_log[since[1]:] if since[0] == self._open_epoch else None
            return token, MappingProxyType(rows), changed

    def locked(self) -> AbstractContextManager[Any]:
        """This connection's lock (re-entrant; every transaction holds it): no other thread reads or writes
        through the connection while it is held."""
        return self._lock

    def live(self) -> list[LeaseRecord]:
        """Active and queued leases, oldest first."""
        return [r for r in self._open() if r.state != LeaseState.BOOKED]

    def open_leases(self) -> tuple[list[LeaseRecord], list[LeaseRecord]]:
        """Active and queued leases, and bookings not yet claimed, in one read (each oldest first)."""
        rows = self._open()
        return ([r for r in rows if r.state != LeaseState.BOOKED], [r for r in rows if r.state == LeaseState.BOOKED])

    def count_granted(self) -> int:
        """Leases ever granted: active ones and those that ended after their grant (an index-only count)."""
        states = (LeaseState.ACTIVE, LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED)
        rows = self._read_history(f"SELECT COUNT(*) FROM leases WHERE state IN ({', '.join('?' for _ in states)})",
                                  [str(s) for s in states])
        return int(rows[0][0])

    def booked(self) -> list[LeaseRecord]:
        """Bookings not yet claimed, oldest first."""
        return [r for r in self._open() if r.state == LeaseState.BOOKED]

    def bookings_of(self, uid: int | None = None, since: float | None = None, until: float | None = None, *,
                    after: str | None = None, limit: int | None = None) -> list[LeaseRecord]:
        """Leases that were booked ahead (any state), by planned start; optionally one owner's, in a window;
        ``limit`` at most, those after booking ``after`` in that order (a page)."""
        clauses: list[str] = ["starts_at IS NOT NULL"]
        params: list[float] = []
        if after is not None:
            clauses.append("(starts_at, seq) > (SELECT starts_at, seq FROM leases WHERE seq = ?)")
            params.append(int(after))
        if uid is not None:
            clauses.append("uid = ?")
            params.append(uid)
        if since is not None:
            clauses.append("starts_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("starts_at < ?")
            params.append(until)
        tail = f" LIMIT {int(limit)}" if limit else ""
        rows = self._read_history(f"SELECT {_COLUMNS} FROM leases WHERE {' AND '.join(clauses)} "
                                  f"ORDER BY starts_at, seq{tail}", params)
        return [_lease(r) for r in rows]

    def records(self, ids: Sequence[str]) -> list[LeaseRecord]:
        """The leases with these ids (in id order), in reads of at most 500 ids."""
        keys = sorted({int(i) for i in ids})
        out: list[LeaseRecord] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            out.extend(_lease(r) for r in self._read_history(f"SELECT {_COLUMNS} FROM leases WHERE seq IN ({marks}) "
                                                             "ORDER BY seq", chunk))
        return out

    def held_since(self, since: float) -> list[LeaseRecord]:
        """Leases granted at some time and still active or ended at or after ``since`` (recent use)."""
        rows = self._read(f"SELECT {_COLUMNS} FROM leases WHERE started_at IS NOT NULL AND "
                          "(state = ? OR ended_at >= ?)", (str(LeaseState.ACTIVE), since))
        return [_lease(r) for r in rows]

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (SQLite's ``PRAGMA data_version``)."""
        return int(self._read("PRAGMA data_version")[0][0])

    def change_mark(self) -> tuple[Any, ...]:
        """Something that changes whenever a lease is added or ends (two index lookups, no scan)."""
        return tuple(self._read("SELECT (SELECT MAX(seq) FROM leases), (SELECT MAX(ended_at) FROM leases)")[0])

    def count_events(self, event: str) -> dict[str, int]:
        """How many events of one rare kind (refused, no-show, idle-warning) the log holds, by their ``reason``."""
        rows = self._read_history("SELECT json_extract(detail, '$.reason'), COUNT(*) FROM events INDEXED BY "
                                  "events_rare WHERE event = ? AND event IN ('refused', 'no-show', 'idle-warning') "
                                  "GROUP BY 1", (event,))
        return {str(reason): int(n) for reason, n in rows}

    def history(self, *, uid: int | None = None, since: float | None = None, limit: int | None = None,
                before: str | None = None) -> list[LeaseRecord]:
        """Every lease, newest first; optionally one owner's, created since a time, older than lease ``before``
        (a page: the primary key or the owner index walks from there, so a page costs the same at any depth)."""
        clauses: list[str] = []
        params: list[float] = []
        if uid is not None:
            clauses.append("uid = ?")
            params.append(uid)
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(since)
        if before is not None:
            clauses.append("seq < ?")
            params.append(int(before))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        tail = f" LIMIT {int(limit)}" if limit else ""
        rows = self._read_history(f"SELECT {_COLUMNS} FROM leases {where} ORDER BY seq DESC{tail}", params)
        return [_lease(r) for r in rows]

    # -- the host ---------------------------------------------------------------------------
    def host_facts(self) -> dict[str, str]:
        """What the ledger's holders are read against (``boot_id``, ``pid_namespace``)."""
        return {str(k): str(v) for k, v in self._read("SELECT key, value FROM host")}

    def set_host_fact(self, key: str, value: str) -> None:
        """Record one host fact (inside a transaction)."""
        self._conn.execute("INSERT OR REPLACE INTO host (key, value) VALUES (?, ?)", (key, value))

    def forget_holders(self) -> None:
        """Mark every live lease's holder as gone (inside a transaction): the machine booted again since."""
        self._conn.execute("UPDATE leases SET pid_start = -1 WHERE pid IS NOT NULL AND state IN ('active', 'queued')")
        self._open_rows = None

    def recent(self, since: float, uid: int | None = None, *, limit: int | None = None,
               before: str | None = None) -> list[LeaseRecord]:
        """Live leases and those that ended at or after ``since`` (a window of history, read by index), newest
        first; ``limit`` at most, older than lease ``before`` (a page)."""
        owner = " AND uid = ?" if uid is not None else ""
        if before is not None:
            owner += f" AND seq < {int(before)}"
        extra: list[Any] = [uid] if uid is not None else []
        def window(columns: str) -> str:
            return (f"SELECT {columns} FROM leases WHERE state IN (?, ?, ?){owner} UNION ALL "
                    f"SELECT {columns} FROM leases INDEXED BY leases_ended WHERE ended_at >= ?{owner} "
                    "ORDER BY seq DESC")

        params = [str(LeaseState.ACTIVE), str(LeaseState.QUEUED), str(LeaseState.BOOKED), *extra, since, *extra]
        if limit:  # a page: the window's ids alone are sorted (from the indexes), then only the page's rows read
            rows = self._read_history(f"SELECT {_COLUMNS} FROM leases WHERE seq IN ({window('seq')} "
                                      f"LIMIT {int(limit)}) ORDER BY seq DESC", params)
        else:
            rows = self._read_history(window(_COLUMNS), params)
        return [_lease(r) for r in rows]

    def prune(self, before: float, batch: int) -> int:
        """Forget up to ``batch`` leases that ended before ``before``, and the audit log's lines older than
        that whose lease is gone, in one short write; returns how many leases went.

        The newest lease is never pruned, so a lease id is never given out twice.
        """
        with self.transaction():
            newest = self._conn.execute("SELECT MAX(seq) FROM leases").fetchone()[0] or 0
            gone = self._conn.execute(
                "DELETE FROM leases WHERE seq IN (SELECT seq FROM leases WHERE ended_at < ? AND seq < ? "
                "ORDER BY ended_at LIMIT ?)", (before, newest, batch)).rowcount
            # Every line of a lease on file is no older than the oldest such lease: lines before both bounds
            # are its forgotten leases', and only a bounded number of the oldest lines is looked at.
            oldest = self._conn.execute("SELECT created_at FROM leases ORDER BY seq LIMIT 1").fetchone()
            bound = min(before, oldest[0]) if oldest else before
            self._conn.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, lease_seq FROM events INDEXED BY events_at "
                "WHERE at < ? ORDER BY at LIMIT ?) AS old WHERE NOT EXISTS "
                "(SELECT 1 FROM leases WHERE seq = old.lease_seq))", (bound, batch * 4))
        return int(gone)

    # -- audit log ------------------------------------------------------------------------
    def append_event(
        self, lease_id: str, event: str, *, uid: int, user: str, pid: int, detail: dict[str, Any] | None = None,
        at: float | None = None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO events (at, lease_seq, event, uid, user, pid, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (at if at is not None else time.time(), int(lease_id), event, uid, user, pid,
             _EVENT_ENCODER.encode(detail or {})),
        )

    def events(self, *, since: float | None = None, lease_id: str | None = None, after: int | None = None,
               limit: int | None = None) -> list[Event]:
        """The audit log's lines, oldest first: at or after ``since``, of one lease, after line ``after`` (the last
        one of the page before); ``limit`` at most (a page)."""
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if lease_id is not None:
            clauses.append("lease_seq = ?")
            params.append(int(lease_id))
        if not limit and after is None:
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            # A window of the log is read through its index (SQLite would otherwise walk the whole log in id order).
            index = "INDEXED BY events_at " if since is not None else ""
            rows = self._read_history(f"SELECT {_COLUMNS_EVENTS} FROM events {index}{where} ORDER BY id", params)
        else:
            # A page walks the log in id order from ``after``: the first one of a window starts at the window's
            # first line (found once through the index), not at the log's beginning.
            if after is None and since is not None:
                first = self._read_history("SELECT MIN(id) FROM events INDEXED BY events_at WHERE at >= ?",
                                           (since,))[0][0]
                if first is None:
                    return []
                after = int(first) - 1
            clauses.append("id > ?")
            params.append(after or 0)
            tail = f" LIMIT {int(limit)}" if limit else ""
            rows = self._read_history(f"SELECT {_COLUMNS_EVENTS} FROM events WHERE {' AND '.join(clauses)} "
                                      f"ORDER BY id{tail}", params)
        return [Event(r[0], r[1], str(r[2]), r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]


#: An audit line's columns, in the order :class:`Event` takes them.
_COLUMNS_EVENTS = "id, at, lease_seq, event, uid, user, pid, detail"
#: ``json.dumps(..., sort_keys=True)`` made once: an audit line's detail, written by every lease operation.
_EVENT_ENCODER = json.JSONEncoder(sort_keys=True)


def _checkpointer(path: Path, wanted: threading.Event) -> None:
    conn: sqlite3.Connection | None = None
    while True:
        wanted.wait()
        wanted.clear()
        try:
            if conn is None:
                conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            conn = None  # SQLite's own checkpoint in a commit stays the backstop


def _create(path: Path) -> None:
    """A new ledger with its schema, built under a private name and linked into place (a lost race
    leaves the other process's ledger), so no process ever meets a half-made ledger file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.new")
    prepare_file(temp)
    try:
        fresh = Ledger.__new__(Ledger)
        fresh.path, fresh._lock, fresh._apart = temp, _Lock(), False
        fresh._reader, fresh._reader_lock = None, threading.Lock()
        fresh._connect()
        fresh.close()
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(f"cannot create ledger {path}: {exc.strerror}") from None
    finally:
        for leftover in (temp, temp.with_name(temp.name + "-wal"), temp.with_name(temp.name + "-shm")):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


@lru_cache(maxsize=1024)
def _tuple(text: str) -> tuple[Any, ...]:
    """A stored JSON list as a tuple; the same few device lists recur in every read."""
    return tuple(json.loads(text))


_STATES = {state.value: state for state in LeaseState}
_OPEN = (LeaseState.ACTIVE, LeaseState.QUEUED, LeaseState.BOOKED)
_PRIORITIES = {priority.value: priority for priority in Priority}
_ACTIONS = {action.value: action for action in Action}


@lru_cache(maxsize=8192)
def _lease(row: tuple[Any, ...]) -> LeaseRecord:
    """A record from its row; the same live rows are read by every write, so each is built once."""
    return LeaseRecord(
        id=str(row[0]), uid=row[1], owner=row[2], devices=_tuple(row[3]),
        device_uuids=_tuple(row[4]), memory_bytes=row[5], created_at=row[6], started_at=row[7],
        expires_at=row[8], duration_s=row[9], priority=_PRIORITIES[row[10]], state=_STATES[row[11]],
        label=row[12], pid=row[13],
        pid_start=row[14], ended_at=row[15], end_reason=row[16], peak_memory_bytes=row[17], gpu_seconds=row[18],
        starts_at=row[20], idle_since=row[21], idle_warning=_notice(row[22]) if row[22] else None,
        end_action=_ACTIONS[row[23]] if row[23] else None,
    )


def _notice_text(notice: IdleNotice | None) -> str | None:
    if notice is None:
        return None
    return json.dumps({"at": notice.at, "action": str(notice.action), "action_at": notice.action_at})


def _notice(text: str) -> IdleNotice | None:
    try:
        data = json.loads(text)
        return IdleNotice(float(data["at"]), OnIdle(data["action"]),
                          float(data["action_at"]) if data.get("action_at") is not None else None)
    except (ValueError, KeyError, TypeError):
        return None

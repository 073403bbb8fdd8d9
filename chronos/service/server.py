"""``chronos serve``: the one process that owns the ledger, answering clients on a Unix socket.

One selector thread does all socket I/O (accepting, reading lines, writing answers), so a client
that sends nothing, sends half a line, or never reads its answers costs a file descriptor and
nothing else. Short operations on one lease run on that thread (:data:`INLINE_OPS`), the rest on a
small pool of workers, shared fairly between users (:mod:`chronos.service.workers`); a queued
reservation waits on a thread of its own (at most :data:`MAX_WAITERS`, :data:`MAX_WAITERS_PER_USER` of
one user's). The short writes read in one turn of the loop run together in one ledger transaction (group
commit: one commit for many clients), each decided in turn and answered as if it had run alone, and
answered only once committed. A connection serves one request at a time.
Identity comes from SO_PEERCRED, never from the request.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from chronos import settings as settings_module
from chronos import waiting
from chronos.devices import backend_for
from chronos.engine import Engine
from chronos.errors import ChronosError, UnavailableError
from chronos.model import WaitUpdate
from chronos.service import answers, codec
from chronos.service.handlers import WAITING_OPS, WRITE_OPS, Call, Peer, undo_grant
from chronos.service.holders import HolderWatch
from chronos.service.protocol import MAX_MESSAGE_BYTES, VERSION, ProtocolError, dump, read_message
from chronos.service.rates import WriteRates
from chronos.service.reports import ReportChildren
from chronos.service.sockets import listen, peer_of, private_dir, raise_fd_limit, refuse
from chronos.service.workers import FairWorkers, Threads

__all__ = ["DEFAULT_STATE_DIR", "MAX_CONNECTIONS", "MAX_PER_USER", "Server", "serve"]

DEFAULT_STATE_DIR = Path("/var/lib/chronos")
MAX_CONNECTIONS = 1024
MAX_PER_USER = 128
MAX_WAITERS = 256
MAX_WAITERS_PER_USER = 32
#: The ledger serialises every read and write, so more workers than this only contend for it.
WORKERS = 4
#: Short operations on one lease, served on the I/O thread itself: no hand-over to a worker and back
#: (two thread switches, which on a busy machine cost more than the operation). Everything that
#: reads many leases, the GPUs' processes or the audit log goes to the workers.
INLINE_OPS = frozenset({"hello", "reserve", "release", "extend", "get", "bind", "claim"})
#: The inline writes: those read in one turn of the I/O loop share one ledger transaction (group commit).
GROUPED_OPS = INLINE_OPS & WRITE_OPS
#: A request must arrive whole this soon after its first byte.
PARTIAL_TIMEOUT_S = 10.0
#: A connection with nothing to do is closed after this long (the client reconnects by itself).
IDLE_TIMEOUT_S = 600.0
#: An answer not taken by its client within this long closes the connection.
WRITE_TIMEOUT_S = 30.0
#: A queued request's progress line is sent when it changes, and, while it is unchanged, no more often
#: than this. The waiter looks at least every :data:`chronos.waiting.CHECK_S` (jittered), so a line
#: comes at least that often (the client's ``on_wait`` runs on each, so a client can give up).
WAIT_HEARTBEAT_S = 1.0

log = logging.getLogger("chronos.service")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: Peer
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    busy: bool = False
    closed: bool = False
    last: float = field(default_factory=time.monotonic)
    partial_since: float | None = None
    write_since: float | None = None
    #: A lease granted by the request whose answer is in the outbox (undone if it is never delivered).
    undo: str | None = None
    #: The queued request its worker waits on, so that the waiter is woken when the client goes.
    waiting: str | None = None


class Server:
    """The service on ``socket_path`` over the ledger in ``state_dir`` (an :class:`Engine` of its own)."""

    def __init__(self, socket_path: str | Path, state_dir: str | Path = DEFAULT_STATE_DIR,
                 engine: Engine | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.state_dir = Path(state_dir)
        if engine is None:
            # Simulated GPUs keep their usage file where the environment says, so that the processes
            # claiming simulated memory and the service see the same GPUs; NVML ignores the directory.
            base = settings_module.current()
            engine = Engine(backend=backend_for(base), settings=base.with_state_dir(private_dir(self.state_dir)))
        self.engine = engine
        self.engine.read_history_apart()  # one client's long read of history holds no one's writes
        self.watch = HolderWatch(self.engine)
        self.reports = ReportChildren(self.engine.settings)
        self.rates = WriteRates()
        self.stop_event = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="chronos-worker")
        self._work = FairWorkers(self._pool)
        self._waiters = Threads(MAX_WAITERS, MAX_WAITERS_PER_USER, "queued requests waiting")
        self._done: queue.SimpleQueue[tuple[_Conn, bytes, str | None, bool]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: set[_Conn] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        #: The I/O thread's id: what it finishes itself is delivered by its own loop, with no wake-up.
        self._io_thread: int | None = None
        #: Writes read in this turn of the I/O loop, run together in one ledger transaction.
        self._writes: list[tuple[_Conn, Any, str, dict[str, Any]]] = []

    # -- life -----------------------------------------------------------------------------
    def start(self) -> Server:
        """Open the ledger, bind the socket (every user may connect), start the threads."""
        raise_fd_limit(MAX_CONNECTIONS + 256)
        self.engine.leases()  # open (and migrate) the ledger now, and reclaim what ended while we were down
        self._listener = listen(self.socket_path)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        for name, target in (("chronos-io", self._loop), ("chronos-holders", lambda: self.watch.run(self.stop_event))):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._start_enforcer()
        log.info("serving %s (ledger %s, holders watched with %s)", self.socket_path, self.engine.ledger.path,
                 "pidfds" if self.watch.pidfds else "polling")
        return self

    def _start_enforcer(self) -> None:
        """The one enforcement loop for every lease, where this installation has it."""
        try:
            from chronos.service import enforcer  # type: ignore[attr-defined, unused-ignore]
        except ImportError:
            log.warning("no enforcement loop in this installation: leases are enforced by their own watchdogs")
            return
        loop = enforcer.Enforcer(self.engine)
        thread = threading.Thread(target=loop.run, args=(self.stop_event,), name="chronos-enforcer", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("enforcement loop started: one loop for every lease and every user")

    def serve_forever(self) -> None:
        """Run until :meth:`stop` (a signal handler calls it)."""
        self.stop_event.wait()
        self.close()

    def stop(self) -> None:
        self.stop_event.set()
        self._poke()

    def close(self) -> None:
        self.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.reports.close()  # a report being built ends now, not when its child is done
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._listener is not None:
            self._listener.close()
            with suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
        for conn in list(self._conns):
            conn.sock.close()
        self._conns.clear()
        self.watch.close()
        self.engine.close()

    def _poke(self) -> None:
        with suppress(OSError):
            self._wake_w.send(b"x")

    # -- the I/O thread -------------------------------------------------------------------
    def _loop(self) -> None:
        self._io_thread = threading.get_ident()
        while not self.stop_event.is_set():
            try:
                events = self._selector.select(timeout=1.0)
                for key, mask in events:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._io(key.data, mask)
                self._settle()
                self._expire()
            except Exception:  # the loop must not die: log, and serve on
                log.exception("service I/O loop error")

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: leave the rest in the backlog
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            peer = peer_of(sock)
            mine = sum(1 for c in self._conns if c.peer.uid == peer.uid)
            if len(self._conns) >= MAX_CONNECTIONS or mine >= MAX_PER_USER:
                refuse(sock, f"too many connections (at most {MAX_PER_USER} a user, {MAX_CONNECTIONS} in all); "
                              "close some and try again")
                continue
            conn = _Conn(sock, peer)
            self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _drain_wake(self) -> None:
        with suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _io(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            conn.inbox += data
            conn.last = time.monotonic()
            if conn.partial_since is None:
                conn.partial_since = conn.last
            self._next_request(conn)

    def _next_request(self, conn: _Conn) -> None:
        if conn.busy or conn.closed:
            if len(conn.inbox) > MAX_MESSAGE_BYTES:  # requests sent ahead without reading answers
                self._drop(conn)
            return
        end = conn.inbox.find(b"\n")
        if end < 0:
            if len(conn.inbox) > MAX_MESSAGE_BYTES:
                self._answer_now(conn, None, ProtocolError(f"message too long: at most {MAX_MESSAGE_BYTES} bytes"),
                                 close=True)
            elif not conn.inbox:
                conn.partial_since = None
            return
        line = bytes(conn.inbox[:end])
        del conn.inbox[:end + 1]
        conn.partial_since = time.monotonic() if conn.inbox else None
        request_id: Any = None
        try:
            message = read_message(line)
            request_id = message.get("id")
            if message.get("v") != VERSION:
                raise ProtocolError(f"protocol version {message.get('v')!r} is not served here: this service speaks "
                                    f"version {VERSION} (send \"v\": {VERSION})")
            op, args = message.get("op"), message.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ProtocolError("a request is {\"v\": 1, \"id\": N, \"op\": NAME, \"args\": {...}}")
        except ProtocolError as exc:
            self._answer_now(conn, answers.plain_id(request_id), exc)
            return
        request_id = answers.plain_id(request_id)
        conn.busy = True
        if op in WAITING_OPS and answers.waits(args):
            refusal = self._waiters.start(conn.peer.uid, partial(self._serve, conn, request_id, op, args),
                                          "chronos-waiter")
            if refusal is not None:
                conn.busy = False
                self._answer_now(conn, request_id, UnavailableError(refusal))
        elif op in GROUPED_OPS:  # in this turn's group commit (:meth:`_run_writes`)
            self._writes.append((conn, request_id, op, args))
        elif op in INLINE_OPS:
            self._serve(conn, request_id, op, args)
        else:
            self._work.submit(conn.peer.uid, partial(self._serve, conn, request_id, op, args))

    def _answer_now(self, conn: _Conn, request_id: Any, exc: ChronosError, *, close: bool = False) -> None:
        self._queue_out(conn, answers.error_line(request_id, exc))
        if close:
            conn.inbox.clear()
            conn.closed = True
            self._flush(conn)

    def _queue_out(self, conn: _Conn, data: bytes) -> None:
        conn.outbox += data
        if conn.write_since is None:
            conn.write_since = time.monotonic()
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.outbox[:sent]
        if conn.outbox:
            self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        conn.write_since = None
        conn.undo = None  # delivered
        if conn.closed:
            self._drop(conn)
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _watch(self, conn: _Conn, events: int) -> None:
        with suppress(KeyError, ValueError):
            self._selector.modify(conn.sock, events, conn)

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection; a grant it never received is undone."""
        conn.closed = True
        if conn.busy:  # its worker finishes, sees it closed, and undoes what it did
            with suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)  # a closed socket reads as ready: stop watching it
            if conn.waiting is not None:  # a queued wait: woken now, it sees the client gone and withdraws
                waiting.ring(self.engine.ledger_id, conn.waiting, {"check": True})
            return
        if conn in self._conns:
            self._conns.discard(conn)
            with suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.sock.close()
        if conn.undo is not None:
            lease_id, conn.undo = conn.undo, None
            self._pool.submit(self._undo, conn.peer, lease_id)

    def _undo(self, peer: Peer, lease_id: str) -> None:
        try:
            undo_grant(self.engine, peer, lease_id)
            log.info("released lease %s: its client went away before it learned of the grant", lease_id)
        except ChronosError as exc:
            log.warning("could not undo the grant of lease %s: %s", lease_id, exc)
        self.watch.wake()

    def _settle(self) -> None:
        """The turn's writes, run as one group, and the answers delivered. A connection's next request taken
        then (one per connection per turn) is answered, or joins the group, in the next turn: the loop is
        woken for it."""
        self._run_writes()
        if self._deliver() and (self._writes or not self._done.empty()):
            self._poke()

    def _run_writes(self) -> None:
        """Group commit: the writes read this turn, in the order they came, in one ledger transaction.

        Each is decided on what the ones before it left and answered as if it had run alone; a refused
        one undoes only itself. Answers go out only after the commit; if the commit fails, every one of
        them gets that error, and nothing of the group was written."""
        writes, self._writes = self._writes, []
        if len(writes) == 1:
            self._serve(*writes[0])
        if len(writes) <= 1:
            return
        outcomes = answers.run_group(self.engine, [
            (request_id, partial(self._outcome, conn, request_id, op, args))
            for conn, request_id, op, args in writes])
        for (conn, *_request), outcome in zip(writes, outcomes, strict=True):
            self._finish(conn, *outcome)

    def _deliver(self) -> bool:
        """Answers to their connections; whether any connection's next request was taken."""
        ready: list[_Conn] = []
        while True:
            try:
                conn, data, granted, final = self._done.get_nowait()
            except queue.Empty:
                break
            if final:
                conn.busy = False
                conn.last = time.monotonic()
            if conn.closed and conn not in self._conns:
                continue
            if conn.closed:
                if final:
                    conn.undo = granted
                    self._drop(conn)
                continue
            if final:
                conn.undo = granted
            self._queue_out(conn, data)
            if final and not conn.closed:
                ready.append(conn)
        for conn in ready:  # one request of each connection per turn: a pipelining client waits its turn
            self._next_request(conn)
        return bool(ready)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns):
            if conn.write_since is not None and now - conn.write_since > WRITE_TIMEOUT_S:
                self._drop(conn)
            elif conn.partial_since is not None and not conn.busy and now - conn.partial_since > PARTIAL_TIMEOUT_S:
                self._answer_now(conn, None, ProtocolError(f"incomplete request: a request is one line, sent within "
                                                           f"{PARTIAL_TIMEOUT_S:g}s"), close=True)
            elif not conn.busy and not conn.outbox and now - conn.last > IDLE_TIMEOUT_S:
                self._drop(conn)

    # -- the workers ----------------------------------------------------------------------
    def _serve(self, conn: _Conn, request_id: Any, op: str, args: dict[str, Any]) -> None:
        self._finish(conn, *self._outcome(conn, request_id, op, args))

    def _outcome(self, conn: _Conn, request_id: Any, op: str, args: dict[str, Any]) -> answers.Outcome:
        """One request served; a queued one's progress lines go out as it waits (while its client is there)."""
        last: list[tuple[WaitUpdate, float]] = []
        conn.waiting = None

        def progress(update: WaitUpdate) -> None:
            conn.waiting = update.lease_id
            if conn.closed:
                raise answers.ClientGone("the client went away")
            now = time.monotonic()
            if not last or last[0][0] != update or now - last[0][1] >= WAIT_HEARTBEAT_S:
                last[:] = [(update, now)]
                self._done.put((conn, dump({"v": VERSION, "id": request_id, "wait": codec.encode(update)}), None,
                                False))
                self._poke()

        if conn.closed:  # the client went before its turn came: nothing is done for it, and no line is owed
            return b"", None, None
        call = Call(self.engine, conn.peer, args, progress, reports=self.reports, gone=lambda: conn.closed,
                    rates=self.rates)
        return answers.answer(call, op, request_id)

    def _finish(self, conn: _Conn, data: bytes, granted: str | None, holder: tuple[int, float | None] | None) -> None:
        """A served request's answer handed to the I/O thread (woken, unless it is the one that served it)."""
        if holder is not None:
            self.watch.wake(holder)
        self._done.put((conn, data, granted, True))
        if threading.get_ident() != self._io_thread:  # the I/O thread delivers after this turn anyway
            self._poke()


def serve(socket_path: str | Path, state_dir: str | Path = DEFAULT_STATE_DIR) -> None:
    """Serve in the foreground until SIGTERM or SIGINT (systemd runs it so)."""
    import signal

    server = Server(socket_path, state_dir).start()

    def stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    log.info("stopped")


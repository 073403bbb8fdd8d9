"""Group commit: several writes in one ledger transaction (``Engine.batch``, as the service runs the writes
read in one turn of its loop). Each is decided on what the ones before it left, a refused one undoes only
itself, the audit log reads as if each had run alone, and the group commits whole or not at all."""

from __future__ import annotations

import fcntl
import json
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from chronos.engine import Engine
from chronos.errors import InvalidRequestError, LeaseNotFoundError, UnavailableError
from chronos.request import parse_request
from tests.service_fixture import Service
from tests.waiting import wait_for

GIB = 1 << 30
TOTAL = 80 * GIB
ENDS = {"released", "expired", "revoked", "withdrawn"}


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _overcommits(db: Path, total: int) -> int:
    """Replay the audit log: how many grants pushed a GPU past its memory."""
    used: Counter[int] = Counter()
    sizes: dict[int, tuple[list[int], int]] = {}
    bad = 0
    for seq, event, detail in _rows(db, "SELECT lease_seq, event, detail FROM events ORDER BY id"):
        info = json.loads(detail)
        if event == "granted":
            sizes[seq] = (info["devices"], info["memory_bytes"])
            for index in info["devices"]:
                used[index] += info["memory_bytes"]
                bad += used[index] > total
        elif event in ENDS and seq in sizes:
            devices, memory = sizes.pop(seq)
            for index in devices:
                used[index] -= memory
    return bad


def _spec(memory: str) -> Any:
    return parse_request(memory, "10m", device=0)


def test_a_batch_decides_each_write_on_what_the_ones_before_it_left(chronos_env: Path) -> None:
    engine = Engine()
    db = engine.ledger.path
    with engine.batch():
        first = engine.submit(_spec("50G"), bind=False)
        with pytest.raises(UnavailableError):  # the first grant, not yet committed, already counts
            engine.submit(_spec("50G"), bind=False)
        with pytest.raises(LeaseNotFoundError):
            engine.release("9999")
        second = engine.submit(_spec("30G"), bind=False)
        extended = engine.extend(first.id, "5m")
        # one transaction: another connection sees none of it before the commit
        assert _rows(db, "SELECT COUNT(*) FROM leases") == [(0,)]
    assert {lease.id: lease.state for lease in engine.leases()} == {first.id: "active", second.id: "active"}
    assert extended.expires_at == pytest.approx(first.expires_at + 300)
    events = [(str(seq), event) for seq, event in _rows(db, "SELECT lease_seq, event FROM events ORDER BY id")]
    assert events == [(first.id, "granted"), ("0", "refused"), (second.id, "granted"), (first.id, "extended")]
    assert _overcommits(db, TOTAL) == 0
    engine.close()


def test_a_failed_batch_writes_nothing(chronos_env: Path) -> None:
    engine = Engine()
    with pytest.raises(RuntimeError), engine.batch():
        engine.submit(_spec("10G"), bind=False)
        raise RuntimeError("the group fails after its first write")
    assert engine.leases() == []
    assert engine.events() == []
    lease = engine.submit(_spec("10G"), bind=False)  # and the ledger serves on
    assert [found.id for found in engine.leases()] == [lease.id]
    engine.close()


def test_a_refusal_undone_inside_a_batch_leaves_its_neighbours_written(chronos_env: Path) -> None:
    engine = Engine()
    with engine.batch():
        kept = engine.submit(_spec("10G"), bind=False)
        with pytest.raises(InvalidRequestError):  # refused after its own writes began: undone alone
            with engine.ledger.transaction():
                engine.ledger.append_event(kept.id, "note", uid=0, user="root", pid=1)
                raise InvalidRequestError("refused midway")
        after = engine.submit(_spec("10G"), bind=False)
    assert {lease.id for lease in engine.leases()} == {kept.id, after.id}
    assert [event.event for event in engine.events()] == ["granted", "granted"]
    engine.close()


def test_a_batch_reclaims_a_dead_holders_lease_for_the_writes_after_it(chronos_env: Path) -> None:
    engine = Engine()
    holder = subprocess.Popen(["sleep", "60"])
    held = engine.submit(_spec("50G"), bind=holder.pid)
    holder.kill()
    holder.wait()
    with engine.batch():
        lease = engine.submit(_spec("50G"), bind=False)  # fits only once the dead holder's lease has ended
        with pytest.raises(UnavailableError):
            engine.submit(_spec("50G"), bind=False)
    assert engine.get(held.id).state == "revoked"
    assert [found.id for found in engine.leases()] == [lease.id]
    assert _overcommits(engine.ledger.path, TOTAL) == 0
    engine.close()


def _send(path: Path, op: str, args: dict[str, Any]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode() + b"\n")
    return sock


def _answer(sock: socket.socket) -> dict[str, Any]:
    with sock, sock.makefile("rb") as reader:
        answer: dict[str, Any] = json.loads(reader.readline())
        return answer


def _grouped(service: Service, requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Answers to ``requests``, sent on connections of their own so that the service writes them in one group.

    The test holds the ledger's write lock while it sends: the service's loop is held in its first write (a
    plug, 1 GiB on GPU 1) or has not yet read any, so every request is waiting in its socket when the loop
    next reads, and the ones after the plug are read in one turn. The plug's answer comes last."""
    blocker = sqlite3.connect(service.state_dir / "chronos.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        plug = _send(service.socket, "reserve", {"request": {"memory": "1G", "duration": "10m", "device": 1},
                                                 "bind": False})
        socks = [_send(service.socket, op, args) for op, args in requests]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    return [_answer(sock) for sock in [*socks, plug]]


def _outcome(answer: dict[str, Any]) -> tuple[bool, str | None, int]:
    error = answer.get("error") or {}
    return answer["ok"], error.get("code"), error.get("exit", 0)


def test_requests_arriving_together_are_answered_as_if_each_ran_alone(service: Service) -> None:
    db = service.state_dir / "chronos.db"
    first = _answer(_send(service.socket, "reserve", {"request": {"memory": "10G", "duration": "10m", "device": 0},
                                                      "bind": False}))
    assert first["ok"], first
    lease_id = first["result"]["id"]
    requests: list[tuple[str, dict[str, Any]]] = [
        ("reserve", {"request": {"memory": "30G", "duration": "10m", "device": 0}, "bind": False}),
        ("reserve", {"request": {"memory": "75G", "duration": "10m", "device": 0}, "bind": False}),  # never fits
        ("reserve", {"request": {"memory": "lots", "duration": "10m"}, "bind": False}),
        ("release", {"lease_id": "9999"}),
        ("extend", {"lease_id": lease_id, "duration": "10m"}),
        ("reserve", {"request": {"memory": "30G", "duration": "10m", "device": 0}, "bind": False}),
    ]
    answers = _grouped(service, requests)
    assert [_outcome(a) for a in answers] == [
        (True, None, 0), (False, "unavailable", 3), (False, "bad_input", 2), (False, "no_such_lease", 5),
        (True, None, 0), (True, None, 0), (True, None, 0)]
    # the refusals, asked again one at a time, are answered alike
    again = [_answer(_send(service.socket, op, args)) for op, args in requests[1:4]]
    assert [_outcome(a) for a in again] == [_outcome(a) for a in answers[1:4]]
    live = _rows(db, "SELECT seq, memory_bytes FROM leases WHERE state = 'active' AND devices = '[0]' ORDER BY seq")
    assert [seq for seq, _ in live] == sorted(int(x) for x in (lease_id, answers[0]["result"]["id"],
                                                               answers[5]["result"]["id"]))
    assert sum(memory for _, memory in live) == 70 * GIB
    events = Counter(event for (event,) in _rows(db, "SELECT event FROM events"))
    assert events == Counter({"granted": 4, "refused": 2, "extended": 1})
    assert _overcommits(db, TOTAL) == 0


WORKER = """
import sys
import chronos
from chronos.errors import UnavailableError
out, rounds = sys.argv[1], int(sys.argv[2])
with open(out, "w") as f:
    for _ in range(rounds):
        try:
            lease = chronos.reserve("30G", "10m", device=0, bind=False)
        except UnavailableError:
            f.write("refused\\n")
            continue
        f.write(f"granted {lease.id}\\n")
        lease.release()
"""


def test_many_clients_racing_through_group_commits_never_overcommit_nor_lose_a_lease(service: Service,
                                                                                    tmp_path: Path) -> None:
    db = service.state_dir / "chronos.db"
    outs = [tmp_path / f"worker-{i}.txt" for i in range(10)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(out), "60"], stderr=subprocess.PIPE)
               for out in outs]
    for worker in workers:
        _out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    lines = [line.split() for out in outs for line in out.read_text().splitlines()]
    granted = [words[1] for words in lines if words[0] == "granted"]
    assert len(lines) == 600 and granted
    assert len(set(granted)) == len(granted)  # no lease handed to two clients
    logged = [str(seq) for (seq,) in _rows(db, "SELECT lease_seq FROM events WHERE event = 'granted'")]
    assert sorted(logged, key=int) == sorted(granted, key=int)  # every grant the log holds reached its client
    assert _rows(db, "SELECT COUNT(*) FROM leases WHERE state = 'active'") == [(0,)]
    assert _overcommits(db, TOTAL) == 0
    assert sum(words[0] == "refused" for words in lines) == \
        _rows(db, "SELECT COUNT(*) FROM events WHERE event = 'refused'")[0][0]


def test_a_release_in_a_group_starts_a_queued_request(service: Service, tmp_path: Path) -> None:
    db = service.state_dir / "chronos.db"
    holder = _answer(_send(service.socket, "reserve", {"request": {"memory": "70G", "duration": "10m",
                                                                   "device": 0}, "bind": False}))
    waiter = _send(service.socket, "reserve", {"request": {"memory": "20G", "duration": "10m", "device": 0,
                                                           "wait": "forever"}, "bind": False})
    wait_for(lambda: _rows(db, "SELECT COUNT(*) FROM leases WHERE state = 'queued'") == [(1,)])
    answers = _grouped(service, [("release", {"lease_id": holder["result"]["id"]}),
                                 ("reserve", {"request": {"memory": "5G", "duration": "10m", "device": 1},
                                              "bind": False})])
    assert [answer["ok"] for answer in answers] == [True, True, True], answers
    with waiter, waiter.makefile("rb") as reader:
        while "wait" in (answer := json.loads(reader.readline())):
            pass
    assert answer["ok"] and answer["result"]["state"] == "active", answer
    assert _overcommits(db, TOTAL) == 0


def _unread(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def test_a_pipelining_client_gets_one_request_a_turn_and_holds_nobody_up(service: Service) -> None:
    """A client that sends many requests ahead is served one of them per turn of the loop: a client that
    connects after the service has read them all is answered long before the last of them."""
    count = 1000  # their lines fit in one read of the service's
    line = json.dumps({"v": 1, "id": 1, "op": "release", "args": {"lease_id": "9999"}}).encode() + b"\n"
    seen = {"answers": 0, "when_other_answered": -1}
    blocker = sqlite3.connect(service.state_dir / "chronos.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # the first of them waits for the lock, the rest wait in the service
    try:
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.connect(str(service.socket))
        greedy.sendall(line * count)
        wait_for(lambda: _unread(greedy) == 0, what="the service to read the pipelined requests")
        other = _send(service.socket, "hello", {})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    def drain() -> None:
        with greedy, greedy.makefile("rb") as reader:
            for _ in range(count):
                assert json.loads(reader.readline())["error"]["code"] == "no_such_lease"
                seen["answers"] += 1

    reading = threading.Thread(target=drain)
    reading.start()
    assert _answer(other)["ok"]
    seen["when_other_answered"] = seen["answers"]
    reading.join(timeout=120)
    assert seen["answers"] == count
    assert seen["when_other_answered"] < count // 2, seen

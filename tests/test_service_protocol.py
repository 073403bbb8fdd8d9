"""The protocol as any language sees it (a raw socket), and a service that hostile clients cannot stall."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chronos
from tests.service_fixture import Service
from tests.waiting import wait_for

RAW = Path(__file__).with_name("raw_client.py")


def _raw(service: Service, op: str, args: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    # -I: isolated mode, so not even PYTHONPATH can slip a Chronos import in.
    out = subprocess.run([sys.executable, "-I", str(RAW), str(service.socket), op, json.dumps(args or {})],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout)


def _line(sock: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


def _connect(service: Service) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(service.socket))
    return sock


def test_a_raw_socket_client_drives_the_protocol(service: Service) -> None:
    assert "import chronos" not in RAW.read_text() and "from chronos" not in RAW.read_text()
    code, hello = _raw(service, "hello")
    assert code == 0 and hello["result"]["version"] == 1 and hello["result"]["uid"] == os.getuid()  # type: ignore[index]
    code, granted = _raw(service, "reserve", {"request": {"memory": "8G", "duration": "2h", "label": "raw"},
                                              "bind": False})
    assert code == 0, granted
    lease = granted["result"]
    assert isinstance(lease, dict) and lease["state"] == "active" and lease["memory_bytes"] == 8 << 30
    assert chronos.get_lease(lease["id"]).label == "raw"  # the same ledger every client sees
    code, extended = _raw(service, "extend", {"lease_id": lease["id"], "duration": "1h"})
    assert code == 0 and extended["result"]["expires_at"] > lease["expires_at"] + 3599  # type: ignore[index]
    code, listed = _raw(service, "leases")
    assert code == 0 and [x["id"] for x in listed["result"]] == [lease["id"]]  # type: ignore[attr-defined]
    code, released = _raw(service, "release", {"lease_id": lease["id"]})
    assert code == 0 and released["result"]["state"] == "released"  # type: ignore[index]
    for op, args, exit_code, wire in [
        ("release", {"lease_id": "99"}, 5, "no_such_lease"),
        ("reserve", {"request": {"memory": "800G"}}, 2, "bad_input"),
        ("reserve", {"request": {"memory": "80G"}, "bind": False, "user": "nobody"}, 4, "not_allowed"),
        ("no-such-op", {}, 2, "bad_input"),
    ]:
        if exit_code == 4:
            continue  # root may reserve for others; the refusal is tested with real users
        code, refused = _raw(service, op, args)
        error = refused["error"]
        assert (code, refused["ok"], error["code"], error["exit"]) == (  # type: ignore[index]
            exit_code, False, wire, exit_code), refused


def test_garbage_and_bad_shapes_get_one_error_line_and_the_connection_stays_usable(service: Service) -> None:
    with _connect(service) as sock:
        for junk in [b"hello there\n", b"[1, 2]\n", b'{"v": 99, "id": 1, "op": "hello"}\n',
                     b'{"v": 1, "id": 2, "op": "reserve", "args": {"request": {"memory": {"no": 1}}}}\n',
                     b'{"v": 1, "id": 3, "op": "release", "args": {"lease_id": [1]}}\n', b"\xff\xfe\n"]:
            sock.sendall(junk)
            answer = _line(sock)
            assert answer["ok"] is False and answer["error"]["exit"] == 2, (junk, answer)  # type: ignore[index]
        sock.sendall(b'{"v": 1, "id": 9, "op": "hello"}\n')
        assert _line(sock)["ok"] is True


def test_an_oversized_message_is_refused_without_being_buffered(service: Service) -> None:
    with _connect(service) as sock:
        try:
            sock.sendall(b"x" * (3 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service may close before the sender is done: that is the refusal
        else:
            answer = _line(sock)
            assert answer["ok"] is False and "too long" in str(answer["error"])
    assert [x.state for x in chronos.leases()] == []  # and it still answers


def test_silent_half_sent_and_flooding_clients_do_not_stall_others(service: Service) -> None:
    baseline = _round_trips(20)
    idle = [_connect(service) for _ in range(100)]  # connect and say nothing
    half = [_connect(service) for _ in range(50)]
    for sock in half:
        sock.sendall(b'{"v": 1, "id": 1, "op": "hel')  # and never finish the line
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(service.socket)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(Path("/proc", str(flood.pid), "fd").iterdir())) > 200, what="the flood's sockets")
        during = _round_trips(20)
    finally:
        flood.kill()
        flood.communicate()
        for sock in idle + half:
            sock.close()
    # Served all along, and in the same league as before (a generous bound: the machine is shared).
    assert during < max(10 * baseline, 0.5), (baseline, during)


FLOOD = """
import socket, sys
socks = []
for _ in range(300):  # past the per-user limit: the rest are refused with one line, not queued
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        s.sendall(b'{"v": 1, "id": 1, "op": "leases"}\\n' * 50)  # requests sent ahead, answers never read
    except OSError:
        pass
    socks.append(s)
import time; time.sleep(600)
"""


def _round_trips(count: int) -> float:
    """The median seconds of a reserve plus release through the service."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        chronos.reserve("1G", "1h", bind=False).release()
        times.append(time.perf_counter() - start)
    return sorted(times)[count // 2]

"""The service through its clients: same answers and exit codes as embedded mode, holders watched,
waits served by the service, restarts that lose nothing, a client in another pid namespace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chronos
from chronos.errors import LeaseNotFoundError, UnavailableError
from chronos.service.client import ServiceEngine
from tests.conftest import run_cli
from tests.service_fixture import Service
from tests.waiting import wait_for

HOLD = "import chronos, sys, time; lease = chronos.reserve({args}); print(lease.id, flush=True); time.sleep(600)"


def _holder(args: str = "'1G', '1h'", *prefix: str) -> tuple[subprocess.Popen[str], str]:
    """A process that reserves a lease bound to itself and sleeps; returns it and the lease id."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLD.format(args=args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"holder failed: {proc.communicate()[1]}")
    return proc, line


def test_the_api_goes_through_the_service(service: Service, chronos_env: Path) -> None:
    assert isinstance(chronos.api.default_engine(), ServiceEngine)
    lease = chronos.reserve("8G", "1h", bind=False, label="train")
    assert (lease.id, lease.label, lease.memory_bytes) == ("1", "train", 8 << 30)
    assert lease.uid == os.getuid()
    lease.extend("30m")
    assert 5300 < lease.remaining <= 5400
    assert [x.id for x in chronos.leases()] == ["1"]
    assert chronos.gpus()[lease.devices[0]].memory_reserved_bytes == 8 << 30
    lease.release()
    assert chronos.get_lease("1").state == "released"
    events = [e.event for e in chronos.api.default_engine().events(lease_id="1")]
    assert events == ["granted", "extended", "released"]
    assert (service.state_dir / "chronos.db").exists() and not (chronos_env / "chronos.db").exists()
    assert os.stat(service.state_dir).st_mode & 0o077 == 0  # the ledger's directory is the service's alone


def test_errors_and_exit_codes_are_those_of_embedded_mode(service: Service) -> None:
    with pytest.raises(LeaseNotFoundError):
        chronos.release(99)
    cases = [(("release", "99"), 5, "no lease 99"), (("reserve", "800G", "1h"), 2, "can never fit"),
             (("reserve", "8G", "1x"), 2, "duration"), (("extend", "L", "1h"), 5, "no lease")]
    for argv, code, text in cases:
        out = run_cli(*argv)
        assert (out.returncode, out.stdout) == (code, ""), (argv, out)
        assert text in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert run_cli("reserve", "80G", "1h", "--gpu", "0").returncode == 0
    busy = run_cli("reserve", "80G", "1h", "--gpu", "0")
    assert busy.returncode == 3 and "Traceback" not in busy.stderr
    listed = json.loads(run_cli("list", "--json").stdout)
    assert [lease["memory_bytes"] for lease in listed] == [80 << 30]


def test_a_configured_service_that_is_not_running_says_what_to_run(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    out = run_cli("list", env={"CHRONOS_SERVER": str(sock)})
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        f"chronos: error: the Chronos service is not running at {sock}: start it with `chronos serve --socket "
        f"{sock}` (or `systemctl start chronos`), or ask your administrator"]


def test_the_system_file_can_name_the_service(service: Service, chronos_env: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'server = "{service.socket}"\n')
    env = {"CHRONOS_CONFIG": str(config), "CHRONOS_SERVER": ""}
    assert run_cli("reserve", "2G", "1h", env=env).returncode == 0
    assert [x.memory_bytes for x in chronos.leases()] == [2 << 30]


def test_a_dead_holders_lease_ends_within_a_second(service: Service) -> None:
    proc, lease_id = _holder()
    assert chronos.get_lease(lease_id).pid == proc.pid
    proc.kill()
    killed = time.time()
    proc.communicate()
    # Read the ledger itself, read-only: asking the service would reclaim the lease on the way.
    state, ended_at = wait_for(lambda: _ended(service, lease_id), timeout=10, what="the holder's lease to end")
    assert state == "revoked" and ended_at - killed < 1.0, (state, ended_at - killed)


def test_a_restart_loses_nothing_and_readopts_living_holders(service: Service) -> None:
    kept = chronos.reserve("4G", "1h", bind=False)
    proc, held = _holder()
    service.restart()
    assert {x.id: x.state for x in chronos.leases()} == {kept.id: "active", held: "active"}
    proc.kill()
    proc.communicate()
    wait_for(lambda: chronos.get_lease(held).state == "revoked", timeout=10, what="the re-adopted holder's end")
    assert chronos.get_lease(kept.id).state == "active"


def test_a_queued_request_is_served_by_the_service(service: Service) -> None:
    blocker = chronos.reserve("80G", "1h", device=0, bind=False)
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "80G", "1h", "--gpu", "0", "--wait", "1m",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: [x.state for x in chronos.leases()] == ["active", "queued"], what="the request queued")
    blocker.release()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert json.loads(out)["state"] == "active"


def test_a_waiter_that_dies_withdraws_its_request(service: Service) -> None:
    chronos.reserve("80G", "1h", device=0, bind=False)
    waiter = subprocess.Popen([sys.executable, "-m", "chronos", "reserve", "80G", "1h", "--gpu", "0", "--wait",
                               "forever"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    queued = wait_for(lambda: next((x for x in chronos.leases() if x.state == "queued"), None))
    waiter.kill()
    waiter.wait()
    assert wait_for(lambda: chronos.get_lease(queued.id).state == "withdrawn", timeout=10)


def test_a_grant_its_client_never_received_is_undone(service: Service) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(service.socket))
    sock.sendall(b'{"v": 1, "id": 1, "op": "reserve", "args": {"request": {"memory": "1G"}, "bind": false}}\n')
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    lease = wait_for(lambda: next(iter(chronos.leases(all=True)), None), what="the grant")
    wait_for(lambda: chronos.get_lease(lease.id).state == "released", timeout=10, what="the undone grant")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_client_in_another_pid_namespace_holds_a_lease(service: Service) -> None:
    proc, lease_id = _holder("'1G', '1h'", "unshare", "--fork", "--pid", "--mount-proc")
    lease = chronos.get_lease(lease_id)
    assert lease.state == "active" and lease.pid is not None and lease.pid != 1  # the host's pid, not the box's
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    namespaced = [int(p) for p in children.split()]
    assert namespaced and any(lease.pid in _tree(p) for p in namespaced)
    proc.send_signal(signal.SIGKILL)  # unshare dies; the kernel ends the namespace's init and everything in it
    for pid in namespaced:
        _kill(pid)
    proc.communicate()
    assert wait_for(lambda: chronos.get_lease(lease_id).state == "revoked", timeout=10)


def _ended(service: Service, lease_id: str) -> tuple[str, float] | None:
    import sqlite3

    conn = sqlite3.connect(f"file:{service.state_dir / 'chronos.db'}?mode=ro", uri=True, timeout=30)
    try:
        state, ended_at = conn.execute("SELECT state, ended_at FROM leases WHERE seq = ?", (int(lease_id),)).fetchone()
    finally:
        conn.close()
    return (state, ended_at) if state != "active" else None


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_service_refuses_a_state_directory_others_may_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    out = run_cli("serve", "--socket", str(tmp_path / "s.sock"), "--state-dir", str(shared), timeout=30)
    assert out.returncode == 1 and "must belong to the service and be writable by it alone" in out.stderr
    assert "Traceback" not in out.stderr


def test_unavailable_is_what_a_stopped_service_means(service: Service) -> None:
    chronos.leases()
    service.stop()
    with pytest.raises(UnavailableError, match=r"not running|went away"):
        chronos.leases()
    service.start()
    assert chronos.leases() == []

"""The CLI driven as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli

GIB = 1 << 30
LEASE_KEYS = {"id", "owner", "uid", "devices", "device_uuids", "memory_bytes", "created_at", "expires_at",
              "remaining_s", "state", "priority", "label", "pid"}
DEVICE_KEYS = {"index", "uuid", "name", "memory_total_bytes", "memory_used_bytes", "memory_reserved_bytes",
               "memory_available_bytes", "active_leases"}


@pytest.mark.usefixtures("both_modes")
def test_reserve_prints_the_id_and_lives_after_the_cli_exits() -> None:
    out = run_cli("reserve", "8G", "2h", "--label", "train")
    assert out.returncode == 0, out.stderr
    assert "lease 1" in out.stdout and "8 GiB" in out.stdout and "2h" in out.stdout and "left" in out.stdout
    listed = json.loads(run_cli("list", "--json").stdout)
    assert [(lease["id"], lease["state"], lease["label"], lease["pid"]) for lease in listed] == [
        ("1", "active", "train", None)
    ]
    table = run_cli("list").stdout
    assert "train" in table and "active" in table and "8 GiB" in table


def test_json_shapes_are_stable() -> None:
    lease = json.loads(run_cli("reserve", "50%", "90m", "--gpus", "2", "--json").stdout)
    assert LEASE_KEYS <= set(lease)
    assert lease["devices"] == [0, 1] and lease["memory_bytes"] == 40 * GIB
    assert lease["expires_at"] - lease["created_at"] == pytest.approx(5400)
    assert json.loads(run_cli("list", "--json", "--all").stdout)[0]["id"] == lease["id"]
    devices = json.loads(run_cli("stats", "--json").stdout)
    assert len(devices) == 2 and DEVICE_KEYS <= set(devices[0])
    assert devices[0]["memory_reserved_bytes"] == 40 * GIB
    assert devices[0]["memory_available_bytes"] == 40 * GIB
    run_cli("release", lease["id"])
    assert json.loads(run_cli("list", "--json").stdout) == []


def test_create_the_original_syntax_and_available() -> None:
    out = run_cli("create", "0", "0.25", "3600")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[:3] == ["Created", "partition", "partition_0001"]
    assert run_cli("available", "0").stdout.strip() == "75.00"
    assert run_cli("available", "1").stdout.strip() == "100.00"


def test_extend_and_release_several() -> None:
    a = json.loads(run_cli("reserve", "1G", "10m", "--json").stdout)
    b = json.loads(run_cli("reserve", "1G", "10m", "--json").stdout)
    out = run_cli("extend", a["id"], "30m", "--json")
    assert json.loads(out.stdout)["expires_at"] == pytest.approx(a["expires_at"] + 1800)
    out = run_cli("release", a["id"], b["id"])
    assert out.returncode == 0
    assert out.stdout.count("released lease") == 2


@pytest.mark.usefixtures("both_modes")
def test_pid_binds_the_lease_to_a_process() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = json.loads(run_cli("reserve", "1G", "--pid", str(sleeper.pid), "--json").stdout)
        assert lease["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert json.loads(run_cli("show", lease["id"], "--json").stdout)["state"] == "revoked"


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["reserve", "8X"], 2, "cannot read memory"),
        (["reserve", "8G", "2x"], 2, "cannot read duration"),
        (["reserve", "-8G"], 2, ""),
        (["reserve", "0G"], 2, "is 0 bytes"),
        (["reserve", "150%"], 2, "at most 1"),
        (["reserve", "81G"], 2, "never fit"),
        (["reserve", "1G", "--gpus", "3"], 2, "3 GPUs"),
        (["reserve", "1G", "--gpu", "9"], 2, "unknown GPU 9"),
        (["reserve", "1G", "--gpu", "x"], 2, "invalid --gpu"),
        (["reserve", "1G", "0"], 2, "must be more than 0"),
        (["reserve", "1G", "--priority", "urgent"], 2, "invalid choice"),
        (["reserve", "1G", "--user", "no-such-user-here"], 2, "no such user"),
        (["create", "0", "1.5", "60"], 2, "FRACTION"),
        (["create", "9", "0.5", "60"], 2, "unknown GPU 9"),
        (["create", "0", "0.5", "-1"], 2, ""),
        (["available", "9"], 2, "unknown GPU 9"),
        (["release", "42"], 5, "no lease 42"),
        (["extend", "42", "1h"], 5, "no lease 42"),
        (["show", "nope"], 5, "no lease"),
        (["extend", "1", "soon"], 2, "cannot read duration"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, ""),
    ],
)
def test_mistakes_get_one_line_and_an_exit_code(args: list[str], code: int, fragment: str) -> None:
    out = run_cli(*args)
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    if fragment:
        assert fragment in out.stderr
        assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr


@pytest.mark.usefixtures("both_modes")
def test_not_enough_free_memory_is_exit_3_and_says_where() -> None:
    assert run_cli("reserve", "70G", "--gpu", "0").returncode == 0
    assert run_cli("reserve", "70G", "--gpu", "1").returncode == 0
    out = run_cli("reserve", "20G")
    assert out.returncode == 3
    assert "GPU 0: 10 GiB" in out.stderr and "GPU 1: 10 GiB" in out.stderr


@pytest.mark.usefixtures("both_modes")
def test_wait_timeout_is_exit_3_and_leaves_no_queued_request() -> None:
    run_cli("reserve", "70G", "--gpu", "0")
    out = run_cli("reserve", "70G", "--gpu", "0", "--wait", "1s")
    assert out.returncode == 3 and "gave up" in out.stderr
    states = [lease["state"] for lease in json.loads(run_cli("list", "--all", "--json").stdout)]
    assert states == ["withdrawn", "active"]


def test_colour_only_on_request() -> None:
    run_cli("reserve", "1G")
    plain = run_cli("list")
    assert "\033[" not in plain.stdout
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["FORCE_COLOR"] = "1"
    coloured = subprocess.run([sys.executable, "-m", "chronos", "list"], capture_output=True, text=True, env=env)
    assert "\033[" in coloured.stdout


def test_stats_reports_unmanaged_processes() -> None:
    code = (
        "import sys, time, chronos\n"
        "from chronos.devices import simulated\n"
        "lease = chronos.reserve('10G', device=0)\n"
        "simulated.allocate(0, 4 << 30)\n"
        "simulated.allocate(1, 2 << 30)\n"
        "print(lease.id, flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert holder.stdout is not None
        lease_id = holder.stdout.readline().strip()
        from chronos.devices import simulated

        simulated.allocate(0, 3 << 30, pid=stray.pid)
        devices = json.loads(run_cli("stats", "--json").stdout)
        found = {(d["index"], p["pid"]): p for d in devices for p in d["unmanaged_processes"]}
        assert found[(0, stray.pid)]["reason"] == "no lease"
        assert found[(1, holder.pid)] == {"pid": holder.pid, "used_bytes": 2 << 30,
                                          "reason": "device not in lease", "lease_id": lease_id}
        assert (0, holder.pid) not in found
        assert devices[0]["unmanaged_bytes"] == 3 << 30 and devices[1]["unmanaged_bytes"] == 2 << 30
        table = run_cli("stats").stdout
        assert "unmanaged GPU processes" in table and str(stray.pid) in table
    finally:
        for proc in (holder, stray):
            proc.kill()
            proc.wait()
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.usefixtures("both_modes")
def test_list_shows_queued_requests_with_position_and_estimate() -> None:
    assert run_cli("reserve", "70G", "10m", "--gpu", "0").returncode == 0
    assert run_cli("reserve", "70G", "10m", "--gpu", "1").returncode == 0
    waiter = subprocess.Popen(
        [sys.executable, "-m", "chronos", "reserve", "70G", "5m", "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(200):
            listed = json.loads(run_cli("list", "--json").stdout)
            queued = [item for item in listed if item["state"] == "queued"]
            if queued:
                break
        assert queued, "the waiter never appeared in the queue"
        assert queued[0]["queue_position"] == 1
        assert queued[0]["estimated_start"] == pytest.approx(listed[0]["expires_at"], abs=2)
        table = run_cli("list").stdout
        assert "#1 in queue" in table and "starts ~" in table
    finally:
        waiter.kill()
        waiter.communicate()


def test_stats_all_names_every_gpu_by_uuid() -> None:
    plain = {d["index"]: d["uuid"] for d in json.loads(run_cli("stats", "--json").stdout)}
    detailed = json.loads(run_cli("stats", "--all", "--json").stdout)
    assert {d["index"]: d["uuid"] for d in detailed["devices"]} == plain
    assert all(uuid in run_cli("stats", "--all").stdout for uuid in plain.values())


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [["--version"], ["--help"], ["list"], ["reserve", "1G", "10m"]])
def test_a_reader_that_went_away_is_an_exit_code_not_a_traceback(args: list[str], buffered: bool) -> None:
    """``chronos list | head -0``: the pipe is closed before Chronos writes. No traceback, no "Exception
    ignored" from Python's flush at exit (its 120): exit 1, "anything else", or argparse's own 0 where it
    swallowed the error itself. What was asked is still done (the lease is granted)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED" or not buffered}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "chronos", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert err == "", err
    assert code == (0 if args == ["--help"] and not buffered else 1)
    if args[0] == "reserve":
        assert [lease["memory_bytes"] for lease in json.loads(run_cli("list", "--json").stdout)] == [GIB]

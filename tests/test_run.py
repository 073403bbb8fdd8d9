"""``chronos run`` and chronos.run.run: exit codes, signals, enforcement, release, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import chronos
from chronos.errors import InvalidRequestError
from chronos.run import run, shell_status
from tests.conftest import run_cli

GIB = 1 << 30

ALLOCATE = textwrap.dedent("""
    import os, sys, time
    from chronos.devices import get_backend
    from chronos.devices.simulated import allocate
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in get_backend().devices() if d.uuid == uuid][0]
    allocate(index, int(sys.argv[1]))
    time.sleep(60)
""")

# Reports each signal it gets on stdout; exits 0 on SIGUSR1, by the signal's default otherwise.
SIGNALLED = textwrap.dedent("""
    import signal, sys, time
    def usr1(*_):
        print("usr1", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGUSR1, usr1)
    print("ready", flush=True)
    time.sleep(60)
""")


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "chronos", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return proc.returncode, out, err


def test_exit_code_passes_through_and_lease_is_released() -> None:
    result = run_cli("run", "1G", "1h", "--label", "job", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert result.returncode == 7
    (lease,) = chronos.leases(all=True)
    assert lease.state == "released" and lease.label == "job"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"chronos: lease {lease.id} on GPU ") and "peak 0 GiB of 1 GiB" in summary


def test_child_environment_carries_the_lease(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    result = run_cli("run", "8G", "10m", "--gpu", "1", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    env = json.loads(out.read_text())
    (lease,) = chronos.leases(all=True)
    assert env["CHRONOS_LEASE_ID"] == lease.id
    assert env["CUDA_VISIBLE_DEVICES"] == lease.device_uuids[0] and lease.devices == (1,)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(
        (8 * GIB - (768 << 20)) / (80 * GIB), abs=1e-6
    )
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env  # no MPS daemon here


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2]
)
def test_signals_are_forwarded_and_reported_as_shells_do(sig: signal.Signals) -> None:
    proc = _start("1G", "1h", "--", sys.executable, "-c", SIGNALLED)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    code, _, err = _finish(proc)
    # Python turns SIGINT into KeyboardInterrupt, then re-raises the signal on its way out
    assert code == 128 + sig, err
    assert "Traceback" not in err.replace("KeyboardInterrupt", "") or sig == signal.SIGINT
    assert chronos.leases() == []


def test_sigusr1_is_forwarded_to_a_handler() -> None:
    proc = _start("1G", "1h", "--", sys.executable, "-c", SIGNALLED)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    code, out, _ = _finish(proc)
    assert code == 0 and "usr1" in out


def test_overuse_ends_the_command_with_a_reason() -> None:
    result = run_cli(
        "run",
        "1G",
        "1h",
        "--grace",
        "0.3",
        "--kill-wait",
        "5",
        "--",
        sys.executable,
        "-c",
        ALLOCATE,
        str(3 * GIB),
    )
    assert result.returncode == 128 + signal.SIGTERM
    lines = result.stderr.strip().splitlines()
    assert any(
        line.startswith("chronos: ended the command (SIGTERM): GPU ") and "over the lease's 1 GiB cap" in line
        for line in lines
    ), result.stderr
    assert "peak 3 GiB of 1 GiB" in lines[-1]
    (lease,) = chronos.leases(all=True)
    assert lease.state == "released" and lease.peak_memory_bytes == 3 * GIB


def test_expiry_ends_the_command_and_kill_wait_applies() -> None:
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    started = time.monotonic()
    result = run_cli("run", "1G", "1s", "--kill-wait", "0.5", "--", sys.executable, "-c", ignore_term)
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert time.monotonic() - started < 30
    assert "expired" in result.stderr
    (lease,) = chronos.leases(all=True)
    assert lease.state == "expired"


def test_on_expiry_warn_leaves_the_command_running() -> None:
    result = run_cli(
        "run", "1G", "1s", "--on-expiry", "warn", "--", sys.executable, "-c", "import time; time.sleep(2)"
    )
    assert result.returncode == 0
    assert "ended the command" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["1G", "1h"], "no command given"),
        (["1G", "1h", "--"], "no command given"),
        (["lots", "1h", "--", "true"], "cannot read memory"),
        (["1G", "soon", "--", "true"], "cannot read duration"),
        (["1G", "1h", "--on-overuse", "explode", "--", "true"], "invalid choice"),
        (["1G", "1h", "--gpu", "7", "--", "true"], "7"),
        (["1G", "1h", "--wait", "never", "--", "true"], "--wait"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli("run", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert chronos.leases(all=True) == []


def test_unavailable_is_exit_3() -> None:
    held = chronos.reserve("70G", "1h", device=0, bind=False)
    result = run_cli("run", "20G", "1h", "--gpu", "0", "--", "true")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert [lease.id for lease in chronos.leases()] == [held.id]


def test_command_not_found_is_127_and_releases() -> None:
    result = run_cli("run", "1G", "1h", "--", "/nonexistent/chronos-test-command")
    assert result.returncode == 127
    assert "command not found" in result.stderr
    (lease,) = chronos.leases(all=True)
    assert lease.state == "released"


def test_options_after_the_dashes_belong_to_the_command(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    code = f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))"
    result = run_cli(
        "run", "1G", "1h", "--priority", "low", "--", sys.executable, "-c", code, "--gpu", "3", "--", "x"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == ["--gpu", "3", "--", "x"]
    (lease,) = chronos.leases(all=True)
    assert lease.priority == "low"


def test_python_api_returns_a_result() -> None:
    result = run(
        [sys.executable, "-c", ALLOCATE, str(3 * GIB)], "1G", "1h", grace=0.3, kill_wait=5, stderr=None
    )
    assert result.exit_code == 128 + signal.SIGTERM and result.signal_name == "SIGTERM"
    assert result.reason is not None and "cap" in result.reason
    assert result.peak_memory_bytes == 3 * GIB and result.memory_bytes == GIB
    assert result.lease_id is not None and chronos.get_lease(result.lease_id).state == "released"
    ok = run([sys.executable, "-c", "pass"], "1G", "1h", stderr=None)
    assert ok.exit_code == 0 and ok.reason is None and ok.signal_name is None


def test_python_api_rejects_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="no command given"):
        run([], "1G", "1h")
    with pytest.raises(InvalidRequestError, match="use one of"):
        run(["true"], "1G", "1h", on_expiry="later")
    assert chronos.leases(all=True) == []


def test_shell_status() -> None:
    assert shell_status(0) == 0 and shell_status(3) == 3
    assert shell_status(-signal.SIGKILL) == 137 and shell_status(-signal.SIGINT) == 130


def test_wrapper_is_the_holder_and_cwd_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "info.json"
    code = (
        f"import json, os; json.dump({{'ppid': os.getppid(), 'cwd': os.getcwd()}}, open({str(out)!r}, 'w'))"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "chronos", "run", "1G", "1h", "--", sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(out.read_text())
    (lease,) = chronos.leases(all=True)
    assert info["ppid"] == lease.pid and Path(info["cwd"]) == tmp_path

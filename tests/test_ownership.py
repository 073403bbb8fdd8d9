"""One owner for every fact: one rule for a lease's processes, one engine that reaches everything,
a lease that is plain data with its engine, a ledger whose threads cannot see each other's writes."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import chronos
from chronos import settings
from chronos.accounting import Membership
from chronos.devices import simulated
from chronos.devices.simulated import SimulatedBackend
from chronos.enforce.watchdog import SignalEvent, Watchdog
from chronos.engine import Engine
from chronos.lease import Lease
from chronos.ledger import Ledger
from chronos.model import LeaseRecord, LeaseState
from tests.conftest import ROOT, run_cli
from tests.waiting import wait_for

GIB = 1 << 30

# Started with the lease's environment, forks a grandchild that leaves the tree (its parent exits, so
# it is re-parented to init), claims NBYTES on the lease's first GPU, and prints its pid.
DETACH = textwrap.dedent("""
    import os, sys, time
    from chronos.devices import simulated
    from chronos.api import default_engine
    uuid = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    index = [d.index for d in default_engine().backend.devices() if d.uuid == uuid][0]
    read, write = os.pipe()
    if os.fork():
        os.close(write)
        print(os.read(read, 64).decode(), flush=True)
        os._exit(0)  # the middle process exits: the grandchild is nobody's child any more
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # hold no pipe of the test's: it reads until the pipes close
    simulated.allocate(index, int(sys.argv[1]))
    os.write(write, str(os.getpid()).encode())
    time.sleep(120)
""")


def _detached(lease: chronos.Lease, nbytes: int) -> int:
    out = subprocess.run([sys.executable, "-c", DETACH, str(nbytes)], env=lease.env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_detached_process_of_the_lease_is_counted_shown_and_enforced() -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lease = chronos.reserve("4G", "1h", device=0, bind=holder.pid)
    pid = _detached(lease, 6 * GIB)
    try:
        assert pid not in {p for p in _tree(holder.pid)}  # it really left the holder's tree
        # admission: its memory is the lease's (up to the lease), not unmanaged
        status = chronos.gpus()[0]
        assert status.unmanaged_bytes == 2 * GIB and status.memory_reserved_bytes == 4 * GIB
        # the widget's figure
        assert lease.usage() == {0: 6 * GIB}
        # the watchdog's figure, and its action
        dog = Watchdog(lease, grace_s=0, kill_wait_s=1, rate_hz=20)

        def ended() -> bool:
            dog.poll()
            return not _alive(pid)

        wait_for(ended, timeout=20, what="the watchdog to end the detached process over the cap")
        signalled = [e for e in dog.events if isinstance(e, SignalEvent)]
        assert signalled and pid in signalled[0].pids
        assert dog.peak_bytes == 6 * GIB
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        holder.kill()
        holder.wait()


def _tree(pid: int) -> set[int]:
    import psutil

    return {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}


def test_one_membership_rule_for_admission_watchdog_and_widget() -> None:
    """A process of the holder's tree, one named by the environment, and a stranger: all three
    consumers agree on which is whose."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lease = chronos.reserve("8G", "1h", device=1, bind=holder.pid)
    named = _detached(lease, GIB)
    try:
        simulated.allocate(1, 2 * GIB, pid=holder.pid)
        simulated.allocate(1, 3 * GIB, pid=stranger.pid)
        judge = Membership([lease.record])
        assert judge.lease_of(holder.pid) == lease.id and judge.lease_of(named) == lease.id
        assert judge.lease_of(stranger.pid) is None
        assert lease.usage() == {1: 3 * GIB}
        assert chronos.gpus()[1].unmanaged_bytes == 3 * GIB
        dog = Watchdog(lease, grace_s=0)
        dog.poll()
        assert dog.usage == {1: 3 * GIB}
    finally:
        os.kill(named, signal.SIGKILL)
        for proc in (holder, stranger):
            proc.kill()
            proc.wait()


def test_an_injected_backend_reaches_the_caps(tmp_path: Path) -> None:
    """``Engine(backend=...)`` is what lease.env() asks for device totals, not the process's backend."""
    backend = SimulatedBackend("40G", None, tmp_path)
    engine = Engine(state_dir=tmp_path, backend=backend)
    lease = engine.reserve("8G", "10m", bind=False)
    assert lease.device_uuids == (backend.devices()[0].uuid,)
    assert lease.device_uuids[0] not in {d.uuid for d in chronos.gpus()}  # the process-wide GPUs differ
    env = lease.env({})
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx((8 * GIB - (768 << 20)) / (40 * GIB),
                                                                         abs=1e-6)
    assert env["CUPY_GPU_MEMORY_LIMIT"] == str(8 * GIB - (768 << 20))


def test_a_lease_on_a_gpu_the_engine_does_not_have_is_an_error_not_uncapped(tmp_path: Path) -> None:
    engine = Engine(state_dir=tmp_path, backend=SimulatedBackend("40G", None, tmp_path))
    lease = engine.reserve("8G", "10m", bind=False)
    other = Lease(lease.record, Engine(state_dir=tmp_path, backend=SimulatedBackend("80G", None, tmp_path)))
    with pytest.raises(chronos.BackendError, match="does not have"):
        other.env({})


def test_a_lease_is_plain_data_with_its_engine(tmp_path: Path) -> None:
    engine = Engine(state_dir=tmp_path)
    lease = engine.reserve("1G", "10m", bind=False)
    assert isinstance(lease.record, LeaseRecord)
    again = pickle.loads(pickle.dumps(lease))
    assert again == lease and again.engine is engine  # found again, not the environment's engine
    deep = copy.deepcopy(lease)
    assert deep == lease and deep.engine is engine
    assert pickle.loads(pickle.dumps(lease.record)) == lease.record
    with pytest.raises(TypeError):
        Lease(lease.record)  # type: ignore[call-arg]  # a handle is always given its engine
    deep.release()
    assert lease.refresh().state == LeaseState.RELEASED
    assert chronos.leases() == []  # the default ledger never saw it


def test_a_pickled_lease_acts_on_its_own_ledger_in_another_process(tmp_path: Path) -> None:
    engine = Engine(state_dir=tmp_path / "elsewhere")
    lease = engine.reserve("1G", "10m", bind=False)
    blob = tmp_path / "lease.pickle"
    blob.write_bytes(pickle.dumps(lease))
    code = f"import pickle; lease = pickle.loads(open({str(blob)!r}, 'rb').read()); lease.release(); print(lease.state)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "released"
    assert lease.refresh().state == LeaseState.RELEASED


def test_a_reader_thread_never_sees_another_threads_uncommitted_write(chronos_env: Path) -> None:
    ledger = Ledger(chronos_env)
    written = threading.Event()
    finish = threading.Event()
    record = LeaseRecord(id="", owner="x", uid=0, devices=(0,), device_uuids=("u",), memory_bytes=1,
                         created_at=time.time(), expires_at=None, duration_s=60.0)

    def writer() -> None:
        with ledger.transaction():
            ledger.insert(record)
            written.set()
            finish.wait(10)
            raise RuntimeError("roll back")

    def rolled_back() -> None:
        with pytest.raises(RuntimeError):
            writer()

    thread = threading.Thread(target=rolled_back)
    thread.start()
    assert written.wait(10)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(len(ledger.live())))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not seen  # it waits for the transaction, rather than reading into it
    finish.set()
    thread.join(10)
    reader.join(10)
    assert seen == [0]  # and then sees the ledger without the rolled-back row
    ledger.close()


def test_wait_forever_is_one_spelling_everywhere() -> None:
    cli = run_cli("reserve", "1G", "10m", "--wait", "forever", "--json")
    assert cli.returncode == 0, cli.stderr
    from chronos.request import FOREVER, parse_wait

    for spelling in ("forever", "yes", True, "true"):
        assert parse_wait(spelling) == FOREVER
    for spelling in ("no", False, None, "false"):
        assert parse_wait(spelling) is None
    assert parse_wait("5m") == 300.0 and parse_wait(90) == 90.0
    lease = chronos.reserve("1G", "10m", wait="5m")  # the API takes the CLI's spellings
    assert lease.state == LeaseState.ACTIVE


def test_cli_choices_come_from_the_model() -> None:
    from chronos.cli.app import build_parser
    from chronos.model import Action, Priority

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    run = subparsers.choices["run"]  # type: ignore[union-attr]
    by_flag = {flag: action for action in run._actions for flag in action.option_strings}
    assert tuple(by_flag["--priority"].choices) == Priority.choices()
    assert tuple(by_flag["--on-expiry"].choices) == Action.choices()


def test_version_does_not_load_the_engine() -> None:
    code = "import sys\nfrom chronos.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n" \
           "print(sorted(m for m in sys.modules if m.startswith('chronos.') and m.split('.')[1] in " \
           "('engine', 'ledger', 'scheduler', 'accounting', 'api')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_the_package_loads_nothing_until_a_name_is_used() -> None:
    """``import chronos`` imports no other module of Chronos; every public name is listed and resolves."""
    code = ("import sys\nimport chronos\nprint(sorted(m for m in sys.modules if m.startswith('chronos.')))\n"
            "missing = [n for n in chronos.__all__ if n not in dir(chronos)]\n"
            "[getattr(chronos, n) for n in chronos.__all__]\n"
            "print(missing, callable(chronos.devices), chronos.devices.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "[] True chronos.devices"], out.stdout


def test_the_quick_version_says_what_the_parser_says() -> None:
    """``chronos --version`` alone skips the parser; its answer is the parser's own, and both are the version."""
    import chronos
    from chronos.cli.app import build_parser

    quick = run_cli("--version")
    assert quick.returncode == 0, quick.stderr
    parser = build_parser()
    version = next(action for action in parser._actions if "--version" in action.option_strings)
    assert quick.stdout.strip() == version.version == f"chronos {chronos.__version__}"  # type: ignore[attr-defined]
    late = run_cli("--version", "--help")  # not the quick path: the parser answers, and the same way
    assert late.returncode == 0 and late.stdout.strip() == quick.stdout.strip()


def test_the_whole_parser_loads_no_records() -> None:
    """Every command's arguments, as ``chronos --help`` builds them, come from the spellings alone: the records,
    their text and the dataclass machinery load with the command that runs."""
    code = ("import sys\nfrom chronos.cli.app import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m in ('dataclasses', 'chronos.model', 'chronos.text', "
            "'chronos.units', 'chronos.policy.report', 'chronos.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_run_takes_options_after_its_command(tmp_path: Path) -> None:
    """Everything after ``--`` is the command's, its own options included."""
    out = run_cli("run", "1G", "1m", "--gpu", "1", "--", sys.executable, "-c",
                  "import sys; print(sys.argv[1:])", "--gpu", "0", "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['--gpu', '0', '--wait']"


def test_the_default_engine_is_the_current_settings() -> None:
    from chronos.api import default_engine

    assert default_engine().settings is settings.current()
    assert default_engine() is default_engine()


def test_a_lease_of_another_ledger_with_the_same_id_is_not_this_leases(tmp_path: Path) -> None:
    """Lease 1 of one state directory is never taken for lease 1 of another (both ids are "1")."""
    here = Engine(state_dir=tmp_path / "here")
    there = Engine(state_dir=tmp_path / "there")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    mine = here.reserve("4G", "1h", device=0, bind=holder.pid)  # bound: an owner's unbound lease takes all
    theirs = there.reserve("4G", "1h", device=0, bind=False)
    assert mine.id == theirs.id == "1"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=theirs.env())
    try:
        # judged until its environment is readable: Popen returns once execve closed the child's
        # descriptors, a moment before the kernel sets up the new environment
        assert wait_for(lambda: there.membership([theirs.record]).lease_of(child.pid) == "1", timeout=10,
                        what="the other ledger's process to count there")
        assert here.membership([mine.record]).lease_of(child.pid) is None
        dog = Watchdog(mine, grace_s=0, kill_wait_s=0)
        assert {pid for pid, _ in dog.membership.members(mine.id)} == {holder.pid}
        ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=mine.env())
        try:
            assert wait_for(lambda: here.membership([mine.record]).lease_of(ours.pid) == "1", timeout=10,
                            what="its own ledger's process to count")
        finally:
            ours.kill()
            ours.wait()
    finally:
        for proc in (child, holder):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_nobody_charges_their_processes_to_another_users_lease() -> None:
    """Setting a victim's CHRONOS_LEASE_ID and CHRONOS_LEDGER in one's own process changes nothing."""
    lease = chronos.reserve("4G", "1h", device=0, bind=False)
    env = {**lease.env(), "PATH": "/usr/bin:/bin"}
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    intruder = subprocess.Popen([runuser, "-u", "nobody", "--", "/bin/sleep", "60"], env=env)
    try:
        def as_nobody() -> int | None:  # runuser's child once it runs as nobody, or runuser itself if it exec'd
            for candidate in sorted(_tree(intruder.pid) | {intruder.pid}):
                try:
                    status = Path(f"/proc/{candidate}/status").read_text()
                except OSError:
                    continue
                if status.split("Uid:")[1].split()[0] == "65534":
                    return candidate
            return None

        pid = wait_for(as_nobody, what="the intruder's sleep to run as nobody")
        simulated.allocate(0, 8 * GIB, pid=pid)
        assert chronos.api.default_engine().membership([lease.record]).lease_of(pid) is None
        assert lease.usage() == {0: 0}
        assert chronos.gpus()[0].unmanaged_bytes == 8 * GIB
    finally:
        intruder.kill()
        intruder.wait()

"""Device gating on stand-in device files, with a real second OS user.

The stand-ins are plain files named ``nvidia0`` and ``nvidia1`` (root:root, mode 0660) in a directory
every user may search; ``[enforce] device_dir`` points the gate there. The kernel's own permission
check decides every ``open`` here: the ACL entries are real ``system.posix_acl_access`` attributes.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chronos import settings
from chronos.enforce.gating import ACL_XATTR, DeviceGate, driver_restores_modes, may_open
from chronos.engine import Engine
from chronos.errors import StateError
from chronos.model import FindingKind
from chronos.service.enforcer import Enforcer
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)

SYSTEM_PYTHON = "/usr/bin/python3"
# Opens PATH for reading and writing as CUDA opens /dev/nvidiaN; prints "ok" or the errno's name.
OPEN = textwrap.dedent("""
    import errno, sys
    try:
        open(sys.argv[1], "r+b")
    except OSError as e:
        print(errno.errorcode[e.errno])
    else:
        print("ok")
""")
# Opens PATH, says "open", and keeps it open.
HOLD = textwrap.dedent("""
    import sys, time
    f = open(sys.argv[1], "r+b")
    print("open", flush=True)
    time.sleep(120)
""")


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    users = OsUsers("chrenf")
    try:
        gpu = users.group("gpu")
        yield {"ann": users.user("ann"), "bob": users.user("bob"), "member": users.user("member", [gpu]),
               "group": gpu}
    finally:
        users.remove()


@pytest.fixture
def devices() -> Iterator[Path]:
    """Two stand-in device files, root:root 0660, in a directory anyone may search."""
    top = Path(tempfile.mkdtemp(prefix="chrenf-dev-", dir="/tmp"))
    top.chmod(0o755)
    for index in (0, 1):
        path = top / f"nvidia{index}"
        path.write_bytes(b"")
        path.chmod(0o660)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _engine(device_dir: Path, gate: bool = True) -> Engine:
    config = replace(settings.current().config, gate_devices=gate, device_dir=device_dir, kill_wait_s=5.0)
    return Engine(config=config)


def _open_as(user: str, path: Path) -> str:
    info = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    done = subprocess.run([SYSTEM_PYTHON, "-c", OPEN, str(path)], capture_output=True, text=True, timeout=30,
                          user=info.pw_uid, group=info.pw_gid, extra_groups=groups, env={"PATH": "/usr/bin"},
                          cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_user_opens_a_gpu_only_while_holding_a_lease_on_it(people: dict[str, str], devices: Path) -> None:
    engine = _engine(devices)
    gpu0, gpu1 = devices / "nvidia0", devices / "nvidia1"
    assert _open_as(people["ann"], gpu0) == "EACCES"
    lease = engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    assert _open_as(people["ann"], gpu0) == "ok"
    assert _open_as(people["ann"], gpu1) == "EACCES"  # not a GPU of the lease
    assert _open_as(people["bob"], gpu0) == "EACCES"  # nor anyone else's
    assert may_open(gpu0, pwd.getpwnam(people["ann"]).pw_uid)
    engine.release(lease.id)
    assert _open_as(people["ann"], gpu0) == "EACCES"
    # the last entry gone, the file is as it was: its mode back to 0660 and no ACL left
    assert gpu0.stat().st_mode & 0o777 == 0o660
    with pytest.raises(OSError) as missing:
        os.getxattr(gpu0, ACL_XATTR)
    assert missing.value.errno == errno.ENODATA


def test_two_leases_on_one_gpu_each_give_their_owner_access_until_their_own_end(
        people: dict[str, str], devices: Path) -> None:
    engine = _engine(devices)
    gpu1 = devices / "nvidia1"
    ann = engine.reserve("4G", "1h", device=1, user=people["ann"], bind=False)
    bob = engine.reserve("4G", "1h", device=1, user=people["bob"], bind=False)
    assert _open_as(people["ann"], gpu1) == "ok" and _open_as(people["bob"], gpu1) == "ok"
    engine.release(ann.id)
    assert _open_as(people["ann"], gpu1) == "EACCES" and _open_as(people["bob"], gpu1) == "ok"
    engine.release(bob.id)
    assert _open_as(people["bob"], gpu1) == "EACCES"


def test_an_expired_lease_loses_its_access_at_the_next_operation(people: dict[str, str], devices: Path) -> None:
    engine = _engine(devices)
    engine.reserve("4G", 2, device=0, user=people["ann"], bind=False)  # the shortest lease is 1s
    assert _open_as(people["ann"], devices / "nvidia0") == "ok"
    wait_for(lambda: not engine.active_records(), what="the lease to be reclaimed")
    assert _open_as(people["ann"], devices / "nvidia0") == "EACCES"


def test_group_access_and_the_mode_stay_the_administrators(people: dict[str, str], devices: Path) -> None:
    gpu0 = devices / "nvidia0"
    os.chown(gpu0, 0, grp.getgrnam(people["group"]).gr_gid)
    engine = _engine(devices)
    assert _open_as(people["member"], gpu0) == "ok"  # the device's group may, lease or not
    lease = engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    assert _open_as(people["member"], gpu0) == "ok" and _open_as(people["ann"], gpu0) == "ok"
    engine.release(lease.id)
    assert _open_as(people["member"], gpu0) == "ok" and _open_as(people["ann"], gpu0) == "EACCES"
    assert gpu0.stat().st_mode & 0o777 == 0o660


def test_an_entry_for_a_user_without_a_lease_is_removed(people: dict[str, str], devices: Path) -> None:
    gate = DeviceGate(devices)
    bob = pwd.getpwnam(people["bob"]).pw_uid
    engine = _engine(devices)
    engine.reserve("4G", "1h", device=0, user=people["bob"], bind=False)
    assert _open_as(people["bob"], devices / "nvidia0") == "ok"
    engine.close()
    # a second ledger (another state directory) with no lease: the gate follows the ledger it is given
    assert gate.sync([]) == [f"{devices / 'nvidia0'}: access of uid {bob} removed"]
    assert _open_as(people["bob"], devices / "nvidia0") == "EACCES"


def test_gating_off_changes_nothing(people: dict[str, str], devices: Path) -> None:
    engine = _engine(devices, gate=False)
    engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    assert _open_as(people["ann"], devices / "nvidia0") == "EACCES"
    with pytest.raises(OSError):
        os.getxattr(devices / "nvidia0", ACL_XATTR)
    assert engine.sync_gate() == []


def test_a_grant_whose_acl_cannot_be_written_fails_in_one_line(people: dict[str, str], devices: Path) -> None:
    (devices / "nvidia0").unlink()
    (devices / "nvidia0").symlink_to("/proc/self/status")  # /proc holds no ACLs
    engine = _engine(devices)
    with pytest.raises(StateError) as refused:
        engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    assert "device gating: cannot set the ACL of" in str(refused.value) and "\n" not in str(refused.value)
    assert engine.active_records() == []  # the grant was rolled back


def test_a_process_still_holding_the_device_after_the_end_is_ended(people: dict[str, str], devices: Path) -> None:
    engine = _engine(devices)
    ann = pwd.getpwnam(people["ann"])
    lease = engine.reserve("4G", "1h", device=1, user=people["ann"], bind=False)
    holder = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLD, str(devices / "nvidia1")], stdout=subprocess.PIPE,
                              text=True, user=ann.pw_uid, group=ann.pw_gid, extra_groups=[], env={}, cwd="/")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        enforcer = Enforcer(engine)
        stop = threading.Event()
        loop = threading.Thread(target=enforcer.run, args=(stop, 0.05), daemon=True)
        loop.start()
        try:
            target = enforcer.polls + 5
            wait_for(lambda: enforcer.polls >= target, what="passes with the lease active")
            assert holder.poll() is None and not enforcer.findings  # allowed while the lease lasts
            engine.release(lease.id)  # released with no action asked: the device file is all that is left
            assert holder.wait(20) == -signal.SIGTERM
        finally:
            stop.set()
            loop.join(10)
        found: list[Any] = [f for f in enforcer.findings if f.kind == FindingKind.NO_ACCESS]
        assert found and found[0].pid == holder.pid and found[0].uid == ann.pw_uid and found[0].device == 1
        assert found[0].signal == "SIGTERM"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_driver_that_puts_the_modes_back_is_a_problem(devices: Path, tmp_path: Path) -> None:
    params = tmp_path / "params"
    params.write_text("ResmanDebugLevel: 4294967295\nModifyDeviceFiles: 1\nDeviceFileMode: 438\n")
    gate = DeviceGate(devices, driver_params=params)
    assert driver_restores_modes(params)
    assert gate.problems() == [
        f"device gating: the NVIDIA driver has ModifyDeviceFiles=1 ({params}), so every root program that starts "
        "NVML or CUDA, this service included, makes the device files 0666 again; set NVreg_ModifyDeviceFiles=0, "
        "or [enforce] device_mode = \"0660\" (docs/enforcement.md, Device gating)"]
    assert gate.problems(mode_kept=True) == []  # the enforcer puts the modes back every pass
    params.write_text("ModifyDeviceFiles: 0\nDeviceFileMode: 432\n")
    assert not driver_restores_modes(params) and gate.problems() == []
    assert not driver_restores_modes(tmp_path / "no-driver-loaded")


def test_a_device_file_made_open_to_all_is_logged_at_the_next_pass_and_when_fixed(
        people: dict[str, str], devices: Path, caplog: pytest.LogCaptureFixture) -> None:
    enforcer = Enforcer(_engine(devices))
    assert enforcer.gate is not None
    enforcer.gate.driver_params = devices / "no-driver-loaded"  # judge the files alone on a GPU machine too
    gpu1 = devices / "nvidia1"
    with caplog.at_level(logging.INFO, logger="chronos"):
        enforcer.poll()
        assert not [r for r in caplog.records if "gating" in r.getMessage()]
        errors = enforcer.errors
        gpu1.chmod(0o666)  # a root program started CUDA under ModifyDeviceFiles=1, say
        enforcer.poll()
        enforcer.poll()  # said once, not at every pass
        said = [r for r in caplog.records if "open to every user" in r.getMessage()]
        assert [(r.levelname, str(gpu1) in r.getMessage()) for r in said] == [("ERROR", True)]
        assert enforcer.errors == errors + 1
        gpu1.chmod(0o660)
        enforcer.poll()
        fixed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device gating, fixed")]
        assert len(fixed) == 1 and str(gpu1) in fixed[0]


def test_a_grant_or_an_end_that_is_rolled_back_takes_its_acl_change_back(people: dict[str, str],
                                                                         devices: Path) -> None:
    engine = _engine(devices)
    gpu0 = devices / "nvidia0"
    with pytest.raises(RuntimeError), engine.batch():  # a group commit that fails after a grant
        engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
        assert _open_as(people["ann"], gpu0) == "ok"  # given inside the transaction
        raise RuntimeError("the group fails after the grant")
    assert engine.active_records() == []
    assert _open_as(people["ann"], gpu0) == "EACCES"  # at once, not at the enforcer's next pass
    lease = engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    with pytest.raises(RuntimeError), engine.batch():  # and one that fails after an end
        engine.release(lease.id)
        assert _open_as(people["ann"], gpu0) == "EACCES"
        raise RuntimeError("the group fails after the release")
    assert [r.id for r in engine.active_records()] == [lease.id]
    assert _open_as(people["ann"], gpu0) == "ok"
    engine.release(lease.id)
    assert _open_as(people["ann"], gpu0) == "EACCES"


def test_device_mode_puts_a_reset_mode_back_at_the_next_pass_and_keeps_the_acl(
        people: dict[str, str], devices: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine(config=replace(settings.current().config, gate_devices=True, device_dir=devices,
                                   device_mode=0o660, kill_wait_s=5.0))
    enforcer = Enforcer(engine)
    gpu0 = devices / "nvidia0"
    lease = engine.reserve("4G", "1h", device=0, user=people["ann"], bind=False)
    enforcer.poll()
    gpu0.chmod(0o666)  # as a root program's CUDA start makes it under ModifyDeviceFiles=1
    assert _open_as(people["bob"], gpu0) == "ok"
    with caplog.at_level(logging.INFO, logger="chronos"):
        enforcer.poll()
    assert oct(gpu0.stat().st_mode & 0o777) == "0o660"
    assert [r.getMessage() for r in caplog.records if "device_mode" in r.getMessage()] == [
        f"device gating: {gpu0} was 0666, made 0660 again ([enforce] device_mode)"]
    assert not [r for r in caplog.records if "open to every user" in r.getMessage()]  # healed before judged
    assert _open_as(people["bob"], gpu0) == "EACCES"
    assert _open_as(people["ann"], gpu0) == "ok"  # her lease's ACL entry survived the chmods
    engine.release(lease.id)
    assert _open_as(people["ann"], gpu0) == "EACCES"

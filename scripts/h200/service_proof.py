"""The service's enforcement and device gating on a real GPU (run as root by scripts/h200/service.sh).

With the real NVML backend:

1. ``over_cap``: a root process under a 2 GiB lease allocates 4 GiB with cuMemAlloc (past every
   framework cap); the enforcer, one loop at 4 Hz, must end it (SIGTERM).
2. ``unmanaged``: a second OS user's process holds 1 GiB on the GPU with no lease; with
   ``[enforce] unmanaged = "terminate"`` the enforcer must end it.
3. ``gating``: /dev/nvidia0 made 0660 root:root; the second user must fail to create a CUDA context
   (``torch.cuda.init()`` and a tensor on the GPU); with a lease on GPU 0 (the ACL entry added) they
   must succeed; a context they still hold when the lease is released must be ended by the enforcer;
   after the end they must fail again. The device files' modes and ACLs are put back at the end,
   whatever happened. The service runs with ``[enforce] device_mode = "0660"``: where the driver has
   ``ModifyDeviceFiles=1`` (every root NVML or CUDA start makes the file 0666 again;
   ``scripts/h200/gating_probe.py`` shows which), each enforcement pass puts the mode back, and
   every time it did is recorded.

``--dry-run`` runs the same steps here, on simulated GPUs (memory claimed for each process's pid) and
stand-in device files in a temporary directory; opening the stand-in read-write stands for the CUDA
context. Writes ``service.json`` (every check with what was seen) to ``--out``; exit 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MIB = 1 << 20
USER = "chrenf-gpu"
TORCH_CHECK = ("import torch; torch.cuda.init(); x = torch.zeros(1, device='cuda'); "
               "print('ok', torch.cuda.get_device_name(0))")
HOLD_FILE = "import sys, time; f = open(sys.argv[1], 'r+b'); print('open', flush=True); time.sleep(120)"
checks: list[dict[str, Any]] = []


def check(name: str, ok: bool, **seen: Any) -> bool:
    checks.append({"check": name, "ok": bool(ok), **seen})
    print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(seen, default=str)}", flush=True)
    return ok


def second_user() -> tuple[str, bool]:
    """A user to act as: ``chrenf-gpu`` made for the run, else ``nobody``; and whether it was made."""
    if shutil.which("useradd"):
        done = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                              capture_output=True, text=True)
        if done.returncode == 0 or "already exists" in done.stderr:
            return USER, done.returncode == 0
    return "nobody", False


def as_user(user: str, argv: list[str], home: Path, **kwargs: Any) -> subprocess.Popen[str]:
    info = pwd.getpwnam(user)
    # the machine's own variables (LD_LIBRARY_PATH for libcuda, NCCL's settings), none of Chronos's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHRONOS_", "PYTHONPATH", "CUDA_VISIBLE"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home), USER=user)
    return subprocess.Popen(argv, user=info.pw_uid, group=info.pw_gid, extra_groups=[], env=env, cwd=str(home),
                            text=True, **kwargs)


@contextmanager
def enforcing(engine: Any) -> Iterator[Any]:
    from chronos.service.enforcer import Enforcer

    enforcer = Enforcer(engine)
    stop = threading.Event()
    loop = threading.Thread(target=enforcer.run, args=(stop, 0.25), daemon=True)
    loop.start()
    try:
        yield enforcer
    finally:
        stop.set()
        loop.join(10)


def wait(proc: subprocess.Popen[str], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def until(condition: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="simulated GPUs and stand-in device files")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./h200-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # a timeout's SIGTERM still puts the devices back
    if os.geteuid() != 0:
        print("run as root: the enforcer acts on every user's processes and sets device ACLs", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="chrenf-proof-"))
    work.chmod(0o755)
    state = work / "state"
    state.mkdir()
    state.chmod(0o1777)
    os.environ["CHRONOS_STATE_DIR"] = str(state)
    os.environ["CHRONOS_CONFIG"] = str(work / "no-config.toml")
    os.environ["CHRONOS_BACKEND"] = "simulated" if args.dry_run else "nvml"
    os.environ.setdefault("CHRONOS_SIM_GPUS", "2x80G")
    home = work / "home"
    home.mkdir()
    alloc = work / "gpu_cuda_alloc.py"
    shutil.copy(ROOT / "bench" / "gpu_cuda_alloc.py", alloc)
    alloc.chmod(0o644)
    device_dir = Path("/dev")
    if args.dry_run:
        device_dir = work / "dev"
        device_dir.mkdir()
        device_dir.chmod(0o755)
        for index in (0, 1):
            (device_dir / f"nvidia{index}").write_bytes(b"")
            (device_dir / f"nvidia{index}").chmod(0o666)  # as NVIDIA's driver makes them by default

    from chronos import settings
    from chronos.devices.simulated import allocate
    from chronos.enforce.gating import ACL_XATTR, DeviceGate
    from chronos.engine import Engine
    from chronos.model import Action, FindingKind, OnUnmanaged

    # The second user's interpreter: on the GPU machine the one with PyTorch (this one); here Debian's,
    # since a Python under /root cannot be run by another user.
    user_python = "/usr/bin/python3" if args.dry_run and Path("/usr/bin/python3").exists() else sys.executable
    user, made = second_user()
    os.chown(home, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    gpu0 = device_dir / "nvidia0"
    saved = {p: (os.stat(p).st_mode & 0o7777, _acl(p, ACL_XATTR)) for p in DeviceGate(device_dir).paths().values()}
    params = Path("/proc/driver/nvidia/params")
    driver = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in params.read_text().splitlines()
              if line.startswith(("ModifyDeviceFiles", "DeviceFileMode", "DeviceFileUID", "DeviceFileGID"))} \
        if params.exists() else {}
    print(json.dumps({"dry_run": args.dry_run, "user": user, "device_dir": str(device_dir), "driver": driver,
                      "modes": {str(p): oct(m) for p, (m, _) in saved.items()}}), flush=True)
    base = settings.current().config

    def gpu_proc(owner: str, mib: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A process holding ``mib`` on GPU 0: cuMemAlloc on a GPU, a claim for its pid when simulated."""
        argv = ["sleep", "120"] if args.dry_run else [user_python, str(alloc), str(mib), "--hold", "120"]
        if owner == "root":
            full = {**os.environ, **(env or {})}
            proc = subprocess.Popen(argv, env=full, stdout=subprocess.PIPE, text=True)
        else:
            proc = as_user(owner, argv, home, stdout=subprocess.PIPE)
        if args.dry_run:
            allocate(0, mib * MIB, pid=proc.pid)
        else:
            assert proc.stdout is not None
            for line in proc.stdout:
                if '"mib"' in line:
                    break
        return proc

    def device() -> dict[str, Any]:
        """GPU 0's file as it is now: its mode and the uids of its named-user ACL entries."""
        from chronos.enforce.gating import _read_acl

        return {"mode": oct(os.stat(gpu0).st_mode & 0o777),
                "acl_users": sorted(ident for tag, _, ident in _read_acl(gpu0) if tag == 0x02)}

    def cuda_context(owner: str) -> tuple[bool, str]:
        """Can ``owner`` create a CUDA context on GPU 0 (dry run: open the stand-in read-write)?"""
        argv = [user_python, "-c", f"open({str(gpu0)!r}, 'r+b'); print('ok')"] if args.dry_run else \
            [user_python, "-c", TORCH_CHECK]
        proc = as_user(owner, argv, home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=120)
        last = (err.strip().splitlines() or [""])[-1]
        return proc.returncode == 0 and out.startswith("ok"), (out.strip() or last)[:300]

    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("chronos").addHandler(Keep())
    failed = False
    try:
        # 1. over the cap, a root process with a lease
        engine = Engine(config=replace(base, overuse_grace_s=1.0, kill_wait_s=5.0))
        lease = engine.reserve("2G", "10m", device=0, bind=False)
        proc = gpu_proc("root", 4096, lease.env())
        with enforcing(engine) as enforcer:
            started = time.monotonic()
            code = wait(proc, 30)
            took = time.monotonic() - started
        found = [f.message for f in enforcer.findings if f.kind == FindingKind.OVER_CAP]
        failed |= not check("over_cap: a 4 GiB process under a 2 GiB lease is ended", code == -signal.SIGTERM,
                            returncode=code, seconds=round(took, 2), findings=found)
        engine.release(lease.id)
        # 2. unmanaged, the second user's
        engine = Engine(config=replace(base, unmanaged=OnUnmanaged.TERMINATE, unmanaged_grace_s=1.0, kill_wait_s=5.0))
        proc = gpu_proc(user, 1024)
        with enforcing(engine) as enforcer:
            code = wait(proc, 30)
        found = [f.message for f in enforcer.findings if f.kind == FindingKind.UNMANAGED]
        failed |= not check(f"unmanaged: {user}'s GPU process with no lease is ended", code == -signal.SIGTERM,
                            returncode=code, findings=found)
        # 3. device gating. First the baseline: with the file as the driver made it the user can, so a
        # refusal below is the gating's and not, say, an interpreter this user may not run.
        allowed, said = cuda_context(user)
        failed |= not check(f"gating: before, with {gpu0} as it was, {user} can create a CUDA context", allowed,
                            said=said, mode=oct(os.stat(gpu0).st_mode & 0o777))
        # A lent machine's driver may have ModifyDeviceFiles=1 (a module parameter that cannot be changed
        # there): then every root NVML or CUDA start, the service's and the machine's own agents' included,
        # makes the file 0666 again. The service runs with [enforce] device_mode = "0660", so each pass
        # puts it back; a check during which that happened (a line in the log) runs again, three tries.
        def resets() -> list[str]:
            return [line for line in logged if "([enforce] device_mode)" in line]

        def gated_context(polls: Callable[[], int]) -> tuple[bool, str, int]:
            spoiled = 0
            for _ in range(3):
                before, first = len(resets()), polls()
                allowed, said = cuda_context(user)
                until(lambda start=first: polls() >= start + 2, 5)  # a pass after the try has looked at the mode
                if len(resets()) == before:
                    return allowed, said, spoiled
                spoiled += 1
            return allowed, said, spoiled

        engine = Engine(config=replace(base, gate_devices=True, device_dir=device_dir, device_mode=0o660,
                                       kill_wait_s=5.0, on_expiry=Action.TERMINATE))
        with enforcing(engine) as enforcer:
            until(lambda: enforcer.polls >= 2, 10)
            failed |= not check("gating: the service made GPU 0's file 0660 ([enforce] device_mode)",
                                device()["mode"] == "0o660", device=device(), logged=resets()[:2])
            polls = lambda: enforcer.polls  # noqa: E731
            allowed, said, spoiled = gated_context(polls)
            failed |= not check(f"gating: without a lease {user} cannot create a CUDA context", not allowed,
                                said=said, spoiled_tries=spoiled, device=device())
            lease = engine.reserve("8G", "10m", device=0, user=user, bind=False)
            allowed, said, spoiled = gated_context(polls)
            failed |= not check(f"gating: with a lease on GPU 0 {user} can", allowed, said=said,
                                spoiled_tries=spoiled, device=device())
            holder = as_user(user, [user_python, "-c", HOLD_FILE, str(gpu0)], home, stdout=subprocess.PIPE) \
                if args.dry_run else gpu_proc(user, 256)
            if args.dry_run:
                assert holder.stdout is not None
                holder.stdout.readline()
            target = enforcer.polls + 4
            until(lambda: enforcer.polls >= target, 10)
            alive_during = holder.poll() is None
            engine.release(lease.id)
            code = wait(holder, 30)
            found = [f.message for f in enforcer.findings if f.kind == FindingKind.NO_ACCESS]
            after = device()
            failed |= not check("gating: a context still held after the lease's end is ended",
                                alive_during and code == -signal.SIGTERM, alive_during_lease=alive_during,
                                returncode=code, findings=found, device=after)
            uid = pwd.getpwnam(user).pw_uid
            failed |= not check(f"gating: at the end {user}'s ACL entry is gone", uid not in after["acl_users"],
                                device=after)
            allowed, said, spoiled = gated_context(polls)
            failed |= not check(f"gating: after the end {user} cannot again", not allowed, said=said,
                                spoiled_tries=spoiled, device=device())
        if driver.get("ModifyDeviceFiles") == "1":
            said_by_service = [line for line in logged if "ModifyDeviceFiles=1" in line]
            failed |= not check("gating: with device_mode set the service does not call the driver's resets a "
                                "problem", not said_by_service, logged=said_by_service[:1])
        checks.append({"check": "modes put back by the service", "ok": True, "resets": resets()})
        print(f"modes put back by the service: {json.dumps(resets())}", flush=True)
    except Exception as exc:
        failed = True
        check("the proof ran to its end", False, error=f"{type(exc).__name__}: {exc}")
    finally:
        for path, (mode, acl) in saved.items():
            with suppress(OSError):
                if acl is None:
                    with suppress(OSError):
                        os.removexattr(path, ACL_XATTR)
                else:
                    os.setxattr(path, ACL_XATTR, acl)
                os.chmod(path, mode)
        restored = all(os.stat(p).st_mode & 0o7777 == m and _acl(p, ACL_XATTR) == a for p, (m, a) in saved.items())
        failed |= not check("device files' modes and ACLs put back", restored,
                            modes={str(p): oct(os.stat(p).st_mode & 0o7777) for p in saved})
        if made:
            subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        (args.out / "service.json").write_text(json.dumps({"dry_run": args.dry_run, "user": user, "driver": driver,
                                                           "checks": checks}, indent=2, default=str) + "\n")
    print("all checks passed" if not failed else "SOME CHECKS FAILED", flush=True)
    return 1 if failed else 0


def _acl(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())

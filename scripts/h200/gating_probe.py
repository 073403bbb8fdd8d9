"""Which root programs put /dev/nvidia0's mode back (run as root by scripts/h200/gating.sh).

The driver's ``ModifyDeviceFiles`` parameter lets NVIDIA's user-space libraries, when run by root,
make the device files match ``DeviceFileMode`` again. This makes /dev/nvidia0 0660 (with a named-user
ACL entry in one step) before each probe, runs one program in a fresh process, and prints the mode
and ACL afterwards, one JSON line per probe. The mode and ACL are put back at the end.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEV = Path("/dev/nvidia0")
NVML_INIT = "import pynvml; pynvml.nvmlInit(); print('nvml', pynvml.nvmlSystemGetDriverVersion())"
NVML_QUERY = ("import pynvml; pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0); "
              "print('procs', len(pynvml.nvmlDeviceGetComputeRunningProcesses(h)))")
CU_INIT = ("import ctypes; cu = ctypes.CDLL('libcuda.so.1'); print('cuInit', cu.cuInit(0)); "
           "n = ctypes.c_int(); cu.cuDeviceGetCount(ctypes.byref(n)); print('devices', n.value)")
CHRONOS = "import chronos.devices as d; print([g.name for g in d.get_backend().devices()])"


def seen() -> dict[str, object]:
    from chronos.enforce.gating import _read_acl

    mode = stat.S_IMODE(os.stat(DEV).st_mode)
    return {"mode": oct(mode), "named_users": sorted(e[2] for e in _read_acl(DEV) if e[0] == 2)}


def probe(name: str, argv: list[str], uid: int | None = None, acl_uid: int | None = None) -> None:
    from chronos.enforce.gating import _read_acl, _write_acl

    os.chmod(DEV, 0o660)
    if acl_uid is not None:
        _write_acl(DEV, [*_read_acl(DEV), (2, 0o6, acl_uid)])
    before = seen()
    env = {**os.environ, "CHRONOS_BACKEND": "nvml", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/",
                          user=uid, group=uid, extra_groups=[] if uid is not None else None)
    said = (done.stdout.strip() or done.stderr.strip().splitlines()[-1:] or [""])
    print(json.dumps({"probe": name, "before": before, "after": seen(), "rc": done.returncode,
                      "said": said if isinstance(said, str) else said[0]}), flush=True)


def main() -> int:
    saved = stat.S_IMODE(os.stat(DEV).st_mode)
    params = Path("/proc/driver/nvidia/params")
    print(json.dumps({"params": [line for line in params.read_text().splitlines()
                                 if "DeviceFile" in line]}) if params.exists() else "{}", flush=True)
    py = sys.executable
    try:
        probe("stat only (control)", ["stat", "-c", "%a", str(DEV)])
        probe("root: nvmlInit", [py, "-c", NVML_INIT])
        probe("root: nvmlInit and a process query", [py, "-c", NVML_QUERY])
        probe("root: cuInit", [py, "-c", CU_INIT])
        probe("root: chronos NVML backend devices()", [py, "-c", CHRONOS])
        probe("nobody: cuInit (expected to fail)", [py, "-c", CU_INIT], uid=65534)
        probe("root: nvmlInit with a named-user ACL entry", [py, "-c", NVML_INIT], acl_uid=65534)
        probe("root: cuInit with a named-user ACL entry", [py, "-c", CU_INIT], acl_uid=65534)
    finally:
        from chronos.enforce.gating import ACL_XATTR

        try:
            os.removexattr(DEV, ACL_XATTR)
        except OSError:
            pass
        os.chmod(DEV, saved)
        print(json.dumps({"restored": seen()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tier 3, driver-enforced caps: where an MPS control daemon runs, the driver itself refuses a
client's allocation past ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``.

Chronos never starts or stops the daemon (an administrator's choice: MPS serves one Linux user at
a time, see docs/enforcement.md); it only detects one and gives children the limit. The limit is
written by device index *as the child sees it* (``0=2048M``): limits keyed by UUID were reported
ignored. Also here: the probe for NVML's per-cgroup memory limits (driver r615 and later).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from chronos.devices.base import Backend
from chronos.errors import ChronosError, InvalidRequestError
from chronos.units import parse_size

__all__ = [
    "DEFAULT_PIPE_DIR",
    "LIMIT_VAR",
    "MpsStatus",
    "cgroup_limits_supported",
    "merge_limit",
    "mps_env",
    "mps_status",
]

DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
LIMIT_VAR = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
_CONTROL = "nvidia-cuda-mps-control"
_SERVER = "nvidia-cuda-mps-server"


@dataclass(frozen=True)
class MpsStatus:
    """What this machine shows of MPS."""

    active: bool
    pipe_dir: str
    control_pipe: bool = False
    control_pids: tuple[int, ...] = ()
    server_pids: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def _is_channel(path: Path) -> bool:
    """A named pipe or a UNIX socket: what the daemon leaves in its pipe directory."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _daemon_pipe_dir(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    except (psutil.Error, OSError):
        return None  # another user's daemon: its environment is not ours to read


def mps_status(env: Mapping[str, str] | None = None, scan_processes: bool = True) -> MpsStatus:
    """Detect an MPS control daemon: its control pipe or socket in the pipe directory, and its process.

    With ``scan_processes`` a daemon counts when its process runs and it serves our pipe directory
    (its control entry is there, or its environment names the directory); without, the control
    entry alone decides.
    """
    source = os.environ if env is None else env
    pipe_dir = source.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    pipe = _is_channel(Path(pipe_dir) / "control")
    controls: list[int] = []
    servers: list[int] = []
    ours = False
    if scan_processes:
        for proc in psutil.process_iter(["name"]):
            name = proc.info.get("name") or ""
            if name == _CONTROL:
                controls.append(proc.pid)
                served = _daemon_pipe_dir(proc)
                ours = ours or (served is not None and os.path.realpath(served) == os.path.realpath(pipe_dir))
            elif name == _SERVER:
                servers.append(proc.pid)
    notes: list[str] = []
    if pipe and not controls and scan_processes:
        notes.append("control pipe present but no daemon process seen (stale pipe, or another pid namespace)")
    if controls and not pipe and not ours:
        notes.append(f"daemon runs but its pipe is not in {pipe_dir}: set CUDA_MPS_PIPE_DIRECTORY")
    return MpsStatus(
        active=(bool(controls) and (pipe or ours)) if scan_processes else pipe,
        pipe_dir=pipe_dir,
        control_pipe=pipe,
        control_pids=tuple(controls),
        server_pids=tuple(servers),
        notes=tuple(notes),
    )


def _parse_limit(text: str) -> dict[str, int]:
    """A user's ``0=1G,1=2048M`` as bytes per device index; unreadable entries are left out."""
    out: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        value = value.strip()
        if not sep or not value:
            continue
        try:
            out[key.strip()] = int(value) if value.isdigit() else parse_size(value)
        except InvalidRequestError:
            continue
    return out


def merge_limit(existing: str | None, device_count: int, memory_bytes: int) -> str:
    """Our limit per device, with a user's smaller per-device limit kept."""
    user = _parse_limit(existing or "")
    parts = []
    for i in range(device_count):
        ours = max(1, memory_bytes >> 20) << 20
        chosen = min(ours, user.get(str(i), ours))
        parts.append(f"{i}={max(1, chosen >> 20)}M")
    return ",".join(parts)


def mps_env(
    env: Mapping[str, str], device_count: int, memory_bytes: int, status: MpsStatus | None = None
) -> dict[str, str]:
    """``env`` plus the MPS memory limit when a daemon runs; unchanged otherwise."""
    out = dict(env)
    status = status if status is not None else mps_status(out)
    if status.active:
        out[LIMIT_VAR] = merge_limit(out.get(LIMIT_VAR), device_count, memory_bytes)
    return out


def cgroup_limits_supported(backend: Backend) -> bool | None:
    """Whether the driver offers per-cgroup memory limits; None where it cannot be told (no NVML)."""
    if backend.name != "nvml":
        return None
    from chronos.devices.nvml import has_cgroup_memory_limits  # pynvml only where NVML is in use

    try:
        return bool(has_cgroup_memory_limits())
    except ChronosError:
        return None

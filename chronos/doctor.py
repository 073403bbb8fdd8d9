"""``chronos doctor``: what Chronos can see and enforce on this machine.

Every check is read-only and none raises: a failing part is reported as a problem so the rest of
the report still appears. Frameworks are found through ``importlib.metadata``, never imported.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from chronos.doctor_ledger import ledger_problems
from chronos.enforce import caps, mps
from chronos.engine import Engine
from chronos.errors import ChronosError
from chronos.ops import EngineOps
from chronos.state import check_dir
from chronos.state_admin import audit_state_dir

__all__ = ["Report", "diagnose", "framework_versions"]

_FRAMEWORKS = {
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "cupy": ("cupy",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
}


@dataclass
class Report:
    """The doctor's findings; ``problems`` holds one line per thing that needs a person."""

    backend: str | None = None
    simulated: bool | None = None
    driver: str | None = None
    cuda_driver: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    per_process_memory: bool | None = None
    state_dir: dict[str, Any] = field(default_factory=dict)
    mps: dict[str, Any] = field(default_factory=dict)
    cgroup_memory_limits: bool | None = None
    frameworks: dict[str, str | None] = field(default_factory=dict)
    torch_env_fraction: bool = False
    enforcement: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def framework_versions() -> dict[str, str | None]:
    """Installed versions of the GPU frameworks Chronos caps (None: not installed)."""
    out: dict[str, str | None] = {}
    for name, dists in _FRAMEWORKS.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    if out["cupy"] is None:  # CuPy ships as cupy-cuda12x, cupy-cuda13x, ...
        for dist in metadata.packages_distributions().get("cupy", []):
            try:
                out["cupy"] = f"{metadata.version(dist)} ({dist})"
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _check_backend(report: Report, engine: EngineOps) -> None:
    try:
        backend = engine.backend
        report.backend = backend.name
        report.simulated = backend.name == "simulated"
        report.driver = backend.driver_version()
        if backend.name == "nvml":
            from chronos.devices.nvml import cuda_driver_version  # pynvml only where NVML is in use

            report.cuda_driver = cuda_driver_version()
        for d in backend.devices():
            report.devices.append({
                "index": d.index, "uuid": d.uuid, "name": d.name, "memory_total_bytes": d.memory_total_bytes,
                "memory_used_bytes": d.memory_used_bytes, "utilization_percent": d.utilization_percent,
            })
        procs = backend.processes()
        report.per_process_memory = all(p.used_bytes is not None for p in procs) if procs else None
    except ChronosError as exc:
        report.problems.append(f"GPU backend: {exc}")


def _check_state_dir(report: Report, engine: EngineOps) -> None:
    path = Path(engine.config.state_dir)
    info: dict[str, Any] = {"path": str(path), "exists": False}
    report.state_dir = info
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        info["note"] = "created on first use"
        return
    except OSError as exc:
        report.problems.append(f"state directory {path}: {exc.strerror}")
        return
    mode = stat.S_IMODE(st.st_mode)
    info.update({
        "exists": True, "owner_uid": st.st_uid, "mode": f"{mode:04o}", "symlink": stat.S_ISLNK(st.st_mode),
        "writable": os.access(path, os.W_OK), "shared": bool(mode & stat.S_IWOTH),
    })
    if stat.S_ISLNK(st.st_mode):
        report.problems.append(f"state directory {path} is a symbolic link; Chronos refuses it")
    elif mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        report.problems.append(f"state directory {path} is world-writable without the sticky bit: "
                               "chmod +t it")
    elif not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        try:
            check_dir(path, shared=False)
        except ChronosError as exc:
            report.problems.append(str(exc))
        else:  # pragma: no cover - check_dir refuses what os.access refuses
            report.problems.append(f"state directory {path} is not usable by this user")
    report.problems.extend(audit_state_dir(path))
    if isinstance(engine, Engine):  # through the service, the ledger is the service's to watch
        report.problems.extend(ledger_problems(engine))


def _check_mps(report: Report, engine: EngineOps) -> None:
    status = mps.mps_status()
    report.mps = {
        "active": status.active, "pipe_dir": status.pipe_dir, "control_pipe": status.control_pipe,
        "control_pids": list(status.control_pids), "server_pids": list(status.server_pids),
        "notes": list(status.notes),
    }
    try:
        report.cgroup_memory_limits = mps.cgroup_limits_supported(engine.backend)
    except ChronosError:
        report.cgroup_memory_limits = None


def _check_gating(report: Report, engine: EngineOps) -> None:
    if not engine.config.gate_devices:
        report.enforcement["device gating"] = "off"
        return
    from chronos.enforce.gating import DeviceGate

    problems = DeviceGate(engine.config.device_dir).problems(mode_kept=engine.config.device_mode is not None)
    report.problems.extend(problems)
    report.enforcement["device gating"] = (f"on, in {engine.config.device_dir}" if not problems
                                           else "on, but cannot hold (see the problems)")


def _summarise(report: Report) -> None:
    report.torch_env_fraction = caps.torch_env_fraction_supported()
    fw = report.frameworks
    coop = []
    if fw.get("torch"):
        coop.append("PyTorch" + ("" if report.torch_env_fraction else " (in-process only: torch < 2.10)"))
    if fw.get("jax"):
        coop.append("JAX")
    if fw.get("cupy"):
        coop.append("CuPy")
    report.enforcement["cooperative caps"] = ", ".join(coop) if coop else "no GPU framework installed here"
    if report.backend is None:
        report.enforcement["watchdog"] = "unavailable: no GPU backend"
    elif report.simulated:
        report.enforcement["watchdog"] = "simulated GPUs only"
    elif report.per_process_memory is False:
        report.enforcement["watchdog"] = "per device (the driver hides per-process memory)"
    else:
        report.enforcement["watchdog"] = "per process (NVML)"
    report.enforcement["driver caps (MPS)"] = (
        "active: children get CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
        if report.mps.get("active")
        else "no MPS daemon"
    )
    cg = report.cgroup_memory_limits
    report.enforcement["cgroup memory limits"] = (
        "offered by the driver (not used yet)" if cg else "unknown (no NVML)" if cg is None else "not offered"
    )


def diagnose(engine: EngineOps) -> Report:
    """Run every check on ``engine``'s machine; never raises for a machine-side problem."""
    report = Report()
    _check_backend(report, engine)
    _check_state_dir(report, engine)
    _check_mps(report, engine)
    _check_gating(report, engine)
    report.frameworks = framework_versions()
    _summarise(report)
    return report

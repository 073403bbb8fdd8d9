"""Tier 1, cooperative caps: each framework's own memory limit, so a user meets an out-of-memory
error inside the program rather than a kill from the watchdog.

:func:`lease_env` builds the environment for a child process; :func:`apply_caps` caps frameworks
already imported in the current process (a notebook kernel). Neither imports a framework: versions
come from ``importlib.metadata`` so that building an environment stays cheap. Both are given the
devices' totals by the engine, which owns the backend.

The framework caps are set a little below the lease's memory (:func:`framework_budget`): a CUDA
context takes device memory that no allocator counts but NVML and the watchdog do.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from chronos.accounting import LEASE_ENV, LEDGER_ENV
from chronos.errors import BackendError
from chronos.model import LeaseRecord

__all__ = [
    "CONTEXT_RESERVE_BYTES",
    "apply_caps",
    "framework_budget",
    "lease_env",
    "merge_alloc_conf",
    "torch_env_fraction_supported",
]

#: Device memory set aside for the CUDA context: on the H200 (driver 580, CUDA 13) a bare driver
#: context took 0.51 GiB, PyTorch 2.11's 0.60 GiB, and 0.67 GiB once cuBLAS ran (docs/gpu-validation.md).
CONTEXT_RESERVE_BYTES = 768 << 20
#: PyTorch learned ``per_process_memory_fraction`` in PYTORCH_CUDA_ALLOC_CONF in 2.10 (pytorch#161035).
_TORCH_ENV_FRACTION_SINCE = (2, 10)
_TORCH_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def framework_budget(memory_bytes: int, reserve_bytes: int | None = None) -> int:
    """Bytes a framework allocator may take under a lease of ``memory_bytes``.

    The lease minus room for the CUDA context: 768 MiB, or half of a lease below 1.5 GiB (such a
    lease is too small for a framework's context plus much data; the watchdog still counts both).
    ``reserve_bytes`` (``CHRONOS_CONTEXT_RESERVE``, through the settings) overrides the reserve.
    """
    reserve = min(CONTEXT_RESERVE_BYTES, memory_bytes // 2)
    if reserve_bytes is not None:
        reserve = min(reserve_bytes, memory_bytes - 1)
    return max(1, memory_bytes - reserve)


def _fraction(budget: int, totals: Sequence[int]) -> float | None:
    """The smallest budget/total over the devices, rounded down to 6 places so it never exceeds."""
    if not totals:
        return None
    frac = min(budget / t for t in totals if t > 0)
    return max(1e-6, min(1.0, math.floor(frac * 1e6) / 1e6))


def torch_env_fraction_supported() -> bool:
    """True when the installed PyTorch reads ``per_process_memory_fraction`` from the environment."""
    from importlib import metadata  # ~12 ms: only where caps are worked out

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) >= _TORCH_ENV_FRACTION_SINCE


def merge_alloc_conf(existing: str | None, fraction: float) -> str:
    """PyTorch's comma-separated ``key:value`` allocator settings with the fraction merged in.

    Other keys are kept; a fraction the user already set wins when it is smaller.
    """
    parts: list[str] = []
    user_fraction: float | None = None
    for item in (existing or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition(":")
        if key.strip() == "per_process_memory_fraction":
            try:
                user_fraction = float(value)
            except ValueError:
                user_fraction = None
            continue
        parts.append(item)
    chosen = fraction if user_fraction is None or not 0 < user_fraction else min(fraction, user_fraction)
    parts.append(f"per_process_memory_fraction:{chosen:g}")
    return ",".join(parts)


def _smaller_fraction(existing: str | None, fraction: float) -> str:
    try:
        user = float(existing) if existing else None
    except ValueError:
        user = None
    chosen = fraction if user is None or not 0 < user <= 1 else min(user, fraction)
    return f"{chosen:g}"


def _cupy_limit(existing: str | None, budget: int, total: int) -> str:
    """CuPy's limit in bytes; a user's smaller limit (bytes or percent) wins."""
    user: int | None = None
    text = (existing or "").strip()
    try:
        if text.endswith("%"):
            user = int(float(text[:-1]) / 100 * total)
        elif text:
            user = int(float(text))
    except ValueError:
        user = None
    chosen = budget if user is None or user <= 0 else min(user, budget)
    return str(chosen)


def lease_env(
    lease: LeaseRecord, totals: Mapping[str, int], base: Mapping[str, str] | None = None,
    reserve_bytes: int | None = None, ledger: str | None = None,
) -> dict[str, str]:
    """The environment for a child process that should live inside ``lease``'s caps.

    ``totals`` maps device UUID to total bytes; ``base`` defaults to ``os.environ``; ``ledger`` names
    the lease's ledger (what :class:`chronos.accounting.Membership` checks beside the lease id).
    User settings in the framework variables are merged: other keys kept, smaller limits kept.
    """
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.device_uuids)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env[LEASE_ENV] = lease.id
    if ledger is not None:
        env[LEDGER_ENV] = ledger
    else:
        env.pop(LEDGER_ENV, None)
    sizes = [totals[u] for u in lease.device_uuids if u in totals]
    if len(sizes) != len(lease.device_uuids):
        missing = [u for u in lease.device_uuids if u not in totals]
        raise BackendError(f"lease {lease.id} names GPU {', '.join(missing)}, which this machine does not have")
    budget = framework_budget(lease.memory_bytes, reserve_bytes)
    fraction = _fraction(budget, sizes)
    if fraction is None:
        return env
    if torch_env_fraction_supported():
        keys = [k for k in _TORCH_KEYS if env.get(k)] or ["PYTORCH_CUDA_ALLOC_CONF"]
        for key in keys:
            env[key] = merge_alloc_conf(env.get(key), fraction)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = _smaller_fraction(
        env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), fraction
    )
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["CUPY_GPU_MEMORY_LIMIT"] = _cupy_limit(env.get("CUPY_GPU_MEMORY_LIMIT"), budget, min(sizes))
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    return env


# --------------------------------------------------------------------------- in-process caps


def _strip_gpu(uuid: str) -> str:
    return uuid.lower().removeprefix("gpu-").removeprefix("mig-")


def _cap_torch(torch: Any, lease: LeaseRecord, budget: int) -> list[str]:
    cuda = torch.cuda
    if not cuda.is_available():
        return ["torch: CUDA not available, nothing to cap"]
    wanted = {_strip_gpu(u) for u in lease.device_uuids}
    done: list[str] = []
    for index in range(cuda.device_count()):
        props = cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "")).lower()
        if wanted and uuid and _strip_gpu(uuid) not in wanted:
            continue
        fraction = _fraction(budget, [int(props.total_memory)])
        assert fraction is not None
        cuda.set_per_process_memory_fraction(fraction, index)
        done.append(f"torch: cuda:{index} capped at {fraction:g} of {props.total_memory} bytes")
    return done or ["torch: none of the lease's devices is visible to this process"]


def _cap_cupy(cupy: Any, lease: LeaseRecord, budget: int) -> list[str]:
    pool = cupy.get_default_memory_pool()
    wanted = {_strip_gpu(u) for u in lease.device_uuids}
    done: list[str] = []
    for index in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(index):
            uuid = ""
            props = cupy.cuda.runtime.getDeviceProperties(index)
            raw = props.get("uuid") if isinstance(props, dict) else None
            if isinstance(raw, bytes) and len(raw) == 16:
                h = raw.hex()
                uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            if wanted and uuid and uuid not in wanted:
                continue
            pool.set_limit(size=budget)
            done.append(f"cupy: device {index} memory pool limited to {budget} bytes")
    return done


def apply_caps(lease: LeaseRecord, totals: Mapping[str, int], modules: Mapping[str, Any] | None = None,
               reserve_bytes: int | None = None, ledger: str | None = None) -> list[str]:
    """Cap frameworks already imported in this process; returns one line per thing done.

    Frameworks not imported yet get the environment variables of :func:`lease_env`, which they
    read when imported later. JAX reads its fraction only at start, so an imported JAX is reported
    as not capped.
    """
    mods = sys.modules if modules is None else modules
    budget = framework_budget(lease.memory_bytes, reserve_bytes)
    done: list[str] = []
    env = lease_env(lease, totals, base={}, reserve_bytes=reserve_bytes, ledger=ledger)
    imported = {name for name in ("torch", "cupy", "jax") if name in mods}
    if "torch" in mods:
        done.extend(_cap_torch(mods["torch"], lease, budget))
    if "cupy" in mods:
        done.extend(_cap_cupy(mods["cupy"], lease, budget))
    if "jax" in mods:
        done.append("jax: already imported; its memory fraction is read only at start, not capped")
    later = {
        "torch": [k for k in _TORCH_KEYS if k in env],
        "jax": ["XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"],
        "cupy": ["CUPY_GPU_MEMORY_LIMIT"],
    }
    merged = lease_env(lease, totals, reserve_bytes=reserve_bytes, ledger=ledger)
    for name, keys in later.items():
        if name in imported:
            continue
        for key in keys:
            if key in merged:
                os.environ[key] = merged[key]
                done.append(f"{name}: {key}={merged[key]} set for a later import")
    if not imported:
        for key in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
            os.environ[key] = env[key]
        done.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} set for a later CUDA start")
    os.environ[LEASE_ENV] = lease.id
    if ledger is not None:
        os.environ[LEDGER_ENV] = ledger
    return done

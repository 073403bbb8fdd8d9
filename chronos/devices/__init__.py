"""GPU backends and the one place that picks between them.

``CHRONOS_BACKEND`` chooses: ``nvml`` (real GPUs; an error when no driver loads), ``simulated``
(``CHRONOS_SIM_GPUS``, see :mod:`chronos.devices.simulated`), or ``auto`` (the default): NVML where
a driver loads, otherwise simulated GPUs, said once per process on stderr. ``auto`` falls back only
when the driver or its library is absent (or reports no GPU); any other NVML failure is raised, so
a broken driver on a real GPU machine is never silently replaced by make-believe GPUs.

The chosen backend is cached per process and rebuilt when the variables that describe it change,
which is what lets tests switch backends per test. pynvml is imported only when NVML is tried.
"""

from __future__ import annotations

import os
import sys
import threading

from chronos.devices.base import Backend, Device, GpuProcess
from chronos.errors import BackendError, InvalidRequestError

__all__ = ["Backend", "Device", "GpuProcess", "get_backend", "is_simulated", "reset_backend"]

_CHOICES = ("auto", "nvml", "simulated")
_ENV_KEYS = ("CHRONOS_BACKEND", "CHRONOS_SIM_GPUS", "CHRONOS_SIM_TOPOLOGY")

_lock = threading.Lock()
_cached: tuple[tuple[str | None, ...], Backend] | None = None
_warned = False


def get_backend() -> Backend:
    """The backend ``CHRONOS_BACKEND`` selects; built once and reused while the environment holds."""
    global _cached
    key = tuple(os.environ.get(k) for k in _ENV_KEYS)
    cached = _cached
    if cached is not None and cached[0] == key:
        return cached[1]
    with _lock:
        cached = _cached
        if cached is not None and cached[0] == key:
            return cached[1]
        backend = _build(key[0])
        _cached = (key, backend)
        return backend


def reset_backend() -> None:
    """Forget the cached backend so the next :func:`get_backend` builds a fresh one."""
    global _cached
    with _lock:
        _cached = None


def is_simulated() -> bool:
    """True when the selected backend is the simulated one."""
    return get_backend().name == "simulated"


def _build(raw: str | None) -> Backend:
    choice = (raw or "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise InvalidRequestError(f"CHRONOS_BACKEND={raw!r} is not a backend: use auto, nvml or simulated")
    from chronos.devices.simulated import SimulatedBackend

    if choice == "simulated":
        return SimulatedBackend()
    try:
        from chronos.devices import nvml
    except ImportError as exc:
        if exc.name != "pynvml":
            raise
        if choice == "nvml":
            raise BackendError("the nvidia-ml-py package is missing: pip install nvidia-ml-py") from None
        reason = "nvidia-ml-py is not installed"
    else:
        if choice == "nvml":
            return nvml.NvmlBackend()
        try:
            backend = nvml.NvmlBackend()
        except nvml.DriverNotFoundError:
            reason = "no NVIDIA driver found"
        else:
            if backend.device_count():
                return backend
            reason = "the NVIDIA driver reports no GPU"
    simulated = SimulatedBackend()
    _say_fallback_once(reason, len(simulated.sizes))
    return simulated


def _say_fallback_once(reason: str, count: int) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    noun = "GPU" if count == 1 else "GPUs"
    print(
        f"chronos: {reason}; using {count} simulated {noun} "
        "(set CHRONOS_SIM_GPUS to change them, CHRONOS_BACKEND=simulated to silence this)",
        file=sys.stderr,
    )

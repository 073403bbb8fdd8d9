"""GPU backends and the one place that picks between them.

``CHRONOS_BACKEND`` (read into :class:`~chronos.settings.Settings`) chooses: ``nvml`` (real GPUs;
an error when no driver loads), ``simulated`` (``CHRONOS_SIM_GPUS``, see
:mod:`chronos.devices.simulated`), or ``auto`` (the default): NVML where a driver loads, otherwise
simulated GPUs, said once per process on stderr. ``auto`` falls back only when the driver or its
library is absent (or reports no GPU); any other NVML failure is raised, so a broken driver on a
real GPU machine is never silently replaced by make-believe GPUs.

An engine builds its backend with :func:`backend_for` from its settings; pynvml is imported only
when NVML is tried.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import TYPE_CHECKING

from chronos.devices.base import Backend, Device, GpuProcess, ProcessUtilization
from chronos.errors import BackendError

if TYPE_CHECKING:  # the settings (and the config parser) load only when a backend is built
    from chronos.accounting import DeviceStatus
    from chronos.settings import Settings

__all__ = ["Backend", "Device", "GpuProcess", "ProcessUtilization", "backend_for", "get_backend", "is_simulated",
           "select", "visible_indices"]

_lock = threading.Lock()
_built: tuple[Settings, Backend] | None = None
_warned = False


def select(settings: Settings) -> Backend:
    """A new backend as ``settings`` describe it."""
    from chronos.devices.simulated import SimulatedBackend

    if settings.backend == "simulated":
        return SimulatedBackend.from_settings(settings)
    try:
        from chronos.devices import nvml
    except ImportError as exc:
        if exc.name != "pynvml":
            raise
        if settings.backend == "nvml":
            raise BackendError("the nvidia-ml-py package is missing: pip install nvidia-ml-py") from None
        reason = "nvidia-ml-py is not installed"
    else:
        if settings.backend == "nvml":
            return nvml.NvmlBackend()
        try:
            backend = nvml.NvmlBackend()
        except nvml.DriverNotFoundError:
            reason = "no NVIDIA driver found"
        else:
            if backend.device_count():
                return backend
            reason = "the NVIDIA driver reports no GPU"
    fallback = SimulatedBackend.from_settings(settings)
    _say_fallback_once(reason, len(fallback.sizes))
    return fallback


def backend_for(settings: Settings) -> Backend:
    """The backend for ``settings``, built once and shared while they are the ones in use."""
    global _built
    with _lock:
        if _built is None or _built[0] is not settings:
            _built = (settings, select(settings))
        return _built[1]


def get_backend() -> Backend:
    """The backend this process's environment selects (for scripts; library code is handed one)."""
    from chronos.settings import current

    return backend_for(current())


def is_simulated() -> bool:
    """True when the selected backend is the simulated one."""
    return get_backend().name == "simulated"


def visible_indices(devices: list[Device], value: str | None) -> tuple[int, ...] | None:
    """Indices a ``CUDA_VISIBLE_DEVICES`` value allows, in its order (None when unset)."""
    if value is None:
        return None
    allowed: list[int] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if index < 0:
                break  # CUDA stops at the first invalid entry
            if any(d.index == index for d in devices):
                allowed.append(index)
            continue
        allowed.extend(d.index for d in devices if d.uuid.startswith(entry) or entry.startswith(d.uuid))
    return tuple(dict.fromkeys(allowed))


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



class _CallablePackage(types.ModuleType):
    """``chronos.devices`` is this package, and ``chronos.devices()`` (the 2.0 name of :func:`chronos.gpus`)
    still lists the GPUs. Python documents setting a module's ``__class__`` to a subclass as the way to give
    a module such behaviour; it is set here, where the package is made, so that it holds however the package
    was first imported. Typed code calls ``chronos.gpus()``."""

    def __call__(self) -> list[DeviceStatus]:
        import chronos  # the package's lazy name, not an arrow down to the API from the backends

        return chronos.gpus()


sys.modules[__name__].__class__ = _CallablePackage

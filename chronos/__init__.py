"""Chronos: time-limited, memory-capped GPU leases for people who share GPUs on one machine.

>>> import chronos
>>> with chronos.reserve("8G", "2h") as lease:
...     print(lease.id, lease.devices, lease.remaining)
"""

from typing import TYPE_CHECKING

from chronos.api import extend, get_lease, leases, make_devices_callable, release, reserve
from chronos.compat import Partition, Partitioner, is_stub_mode
from chronos.config import ConfigError
from chronos.engine import DeviceStatus, Engine, WaitUpdate
from chronos.errors import (
    BackendError,
    ChronosError,
    InvalidRequestError,
    LeaseNotFoundError,
    NotAllowedError,
    StateError,
    UnavailableError,
)
from chronos.lease import Lease
from chronos.units import format_bytes, format_duration, parse_duration, parse_memory

if TYPE_CHECKING:
    from chronos.enforce.watchdog import Watchdog, WatchdogEvent
    from chronos.run import RunResult
    from chronos.run import run as run_command
    from chronos.stats import QueueEntry, Suggestion, queue, suggest

__version__ = "2.0.0"

# ``chronos.devices`` is the backends package; calling it lists devices with their lease accounting.
make_devices_callable()

# Imported on first use, so that `import chronos` (and every CLI start) stays light.
_LAZY = {
    "suggest": ("chronos.stats", "suggest"),
    "Suggestion": ("chronos.stats", "Suggestion"),
    "queue": ("chronos.stats", "queue"),
    "QueueEntry": ("chronos.stats", "QueueEntry"),
    "run_command": ("chronos.run", "run"),
    "RunResult": ("chronos.run", "RunResult"),
    "Watchdog": ("chronos.enforce.watchdog", "Watchdog"),
    "WatchdogEvent": ("chronos.enforce.watchdog", "WatchdogEvent"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chronos' has no attribute {name!r}")

__all__ = [
    "BackendError",
    "ChronosError",
    "ConfigError",
    "DeviceStatus",
    "Engine",
    "InvalidRequestError",
    "Lease",
    "LeaseNotFoundError",
    "NotAllowedError",
    "Partition",
    "Partitioner",
    "QueueEntry",
    "RunResult",
    "StateError",
    "Suggestion",
    "UnavailableError",
    "WaitUpdate",
    "Watchdog",
    "WatchdogEvent",
    "__version__",
    "devices",
    "extend",
    "format_bytes",
    "format_duration",
    "get_lease",
    "is_stub_mode",
    "leases",
    "parse_duration",
    "parse_memory",
    "queue",
    "release",
    "reserve",
    "run_command",
    "suggest",
]

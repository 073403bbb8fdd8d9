"""Chronos: time-limited, memory-capped GPU leases for people who share GPUs on one machine.

>>> import chronos
>>> with chronos.reserve("8G", "2h") as lease:
...     print(lease.id, lease.devices, lease.remaining)

Every public name is re-exported here and imported on first use, so ``import chronos`` (and so
every CLI start) stays light: importing this package imports nothing else of Chronos.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "2.0.0"

if TYPE_CHECKING:
    from chronos.api import (
        book,
        bookings,
        claim,
        detailed_stats,
        extend,
        forecast,
        get_lease,
        gpus,
        leases,
        limits_for,
        machine_status,
        metrics,
        queue,
        release,
        report,
        reserve,
        suggest,
    )
    from chronos.compat import Partition, Partitioner, PartitionInfo, is_stub_mode
    from chronos.config import ConfigError
    from chronos.enforce.watchdog import Watchdog, WatchdogEvent
    from chronos.engine import DeviceStatus, Engine, WaitUpdate
    from chronos.errors import (
        BackendError,
        ChronosError,
        InvalidRequestError,
        LeaseNotFoundError,
        NamespaceError,
        NotAllowedError,
        StateError,
        UnavailableError,
    )
    from chronos.lease import Lease
    from chronos.model import Action, LeaseRecord, LeaseState, OnIdle, Priority
    from chronos.run import RunResult
    from chronos.run import run as run_command
    from chronos.stats import DetailedStats, QueueEntry, Suggestion
    from chronos.status import Forecast, GpuStatus, LeaseStatus, MachineStatus
    from chronos.units import format_bytes, format_duration, parse_duration, parse_memory

_EXPORTS = {
    "chronos.api": ("book", "bookings", "claim", "detailed_stats", "extend", "forecast", "get_lease", "gpus",
                    "leases", "limits_for", "machine_status", "metrics", "queue", "release", "report", "reserve",
                    "suggest"),
    "chronos.compat": ("Partition", "PartitionInfo", "Partitioner", "is_stub_mode"),
    "chronos.config": ("ConfigError",),
    "chronos.engine": ("DeviceStatus", "Engine", "WaitUpdate"),
    "chronos.enforce.watchdog": ("Watchdog", "WatchdogEvent"),
    "chronos.errors": ("BackendError", "ChronosError", "InvalidRequestError", "LeaseNotFoundError",
                       "NamespaceError", "NotAllowedError", "StateError", "UnavailableError"),
    "chronos.lease": ("Lease",),
    "chronos.model": ("Action", "LeaseRecord", "LeaseState", "OnIdle", "Priority"),
    "chronos.run": ("RunResult",),
    "chronos.stats": ("DetailedStats", "QueueEntry", "Suggestion"),
    "chronos.status": ("Forecast", "GpuStatus", "LeaseStatus", "MachineStatus"),
    "chronos.units": ("format_bytes", "format_duration", "parse_duration", "parse_memory"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_WHERE["run_command"] = "chronos.run"
_RENAMED = {"run_command": "run"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        try:  # a submodule, as ``chronos.engine`` was when this package imported everything at once
            return importlib.import_module(f"chronos.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"chronos.{name}":
                raise
        raise AttributeError(f"module 'chronos' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE, *__all__})  # ``devices`` too, a subpackage loaded on first use


__all__ = [
    "Action",
    "BackendError",
    "ChronosError",
    "ConfigError",
    "DetailedStats",
    "DeviceStatus",
    "Engine",
    "Forecast",
    "GpuStatus",
    "InvalidRequestError",
    "Lease",
    "LeaseNotFoundError",
    "LeaseRecord",
    "LeaseState",
    "LeaseStatus",
    "MachineStatus",
    "NamespaceError",
    "NotAllowedError",
    "OnIdle",
    "Partition",
    "PartitionInfo",
    "Partitioner",
    "Priority",
    "QueueEntry",
    "RunResult",
    "StateError",
    "Suggestion",
    "UnavailableError",
    "WaitUpdate",
    "Watchdog",
    "WatchdogEvent",
    "__version__",
    "book",
    "bookings",
    "claim",
    "detailed_stats",
    "devices",
    "extend",
    "forecast",
    "format_bytes",
    "format_duration",
    "get_lease",
    "gpus",
    "is_stub_mode",
    "leases",
    "limits_for",
    "machine_status",
    "metrics",
    "parse_duration",
    "parse_memory",
    "queue",
    "release",
    "report",
    "reserve",
    "run_command",
    "suggest",
]

"""Chronos: time-limited, memory-capped GPU leases for people who share GPUs on one machine.

>>> import chronos
>>> with chronos.reserve("8G", "2h") as lease:
...     print(lease.id, lease.devices, lease.remaining)
"""

from chronos.api import extend, get_lease, leases, make_devices_callable, release, reserve
from chronos.compat import Partition, Partitioner, is_stub_mode
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

__version__ = "2.0.0"

# ``chronos.devices`` is the backends package; calling it lists devices with their lease accounting.
make_devices_callable()

__all__ = [
    "BackendError",
    "ChronosError",
    "DeviceStatus",
    "Engine",
    "InvalidRequestError",
    "Lease",
    "LeaseNotFoundError",
    "NotAllowedError",
    "Partition",
    "Partitioner",
    "StateError",
    "UnavailableError",
    "WaitUpdate",
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
    "release",
    "reserve",
]

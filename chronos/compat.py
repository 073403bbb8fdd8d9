"""The original Chronos Python API, so scripts written for it run unchanged.

``Partitioner().create(device=0, memory=0.5, duration=3600)`` is a lease of half of GPU 0 for an
hour, bound to the calling process like every lease made through the Python API. Where the
original behaved differently from a Chronos lease, these classes behave as the original did:
partition ids look like ``partition_0007`` (and every id parser accepts them), ``time_remaining``
is whole seconds, ``release()`` of a partition that already ended raises ``ChronosError``,
``partition_id`` is None once released, and ``list()`` shows the partitions this partitioner made.
A partitioner works on the default engine unless it is given one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from chronos.api import default_engine
from chronos.errors import ChronosError, InvalidRequestError
from chronos.lease import Lease
from chronos.model import LeaseState
from chronos.ops import EngineOps
from chronos.request import partition_id

__all__ = ["Partition", "PartitionInfo", "Partitioner", "is_stub_mode"]


@dataclass
class PartitionInfo:
    """One active partition, as the original's ``list()`` returned it."""

    partition_id: str
    device_index: int
    memory_fraction: float
    duration_seconds: int
    time_remaining_seconds: int
    username: str
    process_id: int
    active: bool


class Partition:
    """A lease seen through the original API's names; a context manager that releases it."""

    def __init__(self, lease: Lease, device_total: int) -> None:
        self._lease = lease
        self._total = device_total
        self.partition_id: str | None = partition_id(lease.id)

    @property
    def lease(self) -> Lease:
        """The Chronos lease behind this partition."""
        return self._lease

    @property
    def device(self) -> int:
        return self._lease.devices[0]

    device_index = device

    @property
    def memory_fraction(self) -> float:
        return self._lease.memory_bytes / self._total if self._total else 0.0

    @property
    def duration(self) -> int:
        """Seconds asked for."""
        return round(self._lease.duration_s)

    duration_seconds = duration

    @property
    def time_remaining(self) -> int:
        """Whole seconds left (0 once ended), read afresh as the original did."""
        if self.partition_id is None:
            return 0
        self._lease.refresh()
        return int(self._lease.remaining)

    time_remaining_seconds = time_remaining

    @property
    def active(self) -> bool:
        return self._lease.refresh().active

    @property
    def username(self) -> str:
        return self._lease.owner

    @property
    def process_id(self) -> int:
        return self._lease.pid or 0

    def info(self) -> PartitionInfo:
        return PartitionInfo(partition_id(self._lease.id), self.device, self.memory_fraction, self.duration,
                             int(self._lease.remaining), self.username, self.process_id, self._lease.active)

    def release(self) -> None:
        """Release the partition; one that already ended raises ChronosError, as the original did."""
        if self.partition_id is None:
            return
        state = self._lease.refresh().state
        if state != LeaseState.ACTIVE:
            self.partition_id = None
            raise ChronosError(f"Failed to release partition: partition {partition_id(self._lease.id)} "
                               f"already ended ({state})")
        self._lease.release()
        self.partition_id = None

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.partition_id is not None and self._lease.refresh().state.live:
            self._lease.release()
        self.partition_id = None

    def __repr__(self) -> str:
        return (f"Partition(id={self.partition_id}, device={self.device}, memory={self.memory_fraction:.2f}, "
                f"remaining={int(self._lease.remaining)}s)")


class Partitioner:
    """Creates, lists and releases partitions (leases) as the original API did."""

    def __init__(self, engine: EngineOps | None = None) -> None:
        self._engine = engine
        self._made: list[Partition] = []

    @property
    def engine(self) -> EngineOps:
        return self._engine if self._engine is not None else default_engine()

    def _total(self, device: int) -> int:
        for d in self.engine.backend.devices():
            if d.index == device:
                return d.memory_total_bytes
        return 0

    def create(self, device: int = 0, memory: float = 0.5, duration: float = 3600,
               user: str | None = None) -> Partition:
        """Reserve ``memory`` (a fraction in (0, 1]) of GPU ``device`` for ``duration`` seconds."""
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 < memory <= 1:
            raise InvalidRequestError(f"memory must be a fraction in (0, 1], got {memory!r}")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
            raise InvalidRequestError(f"duration must be positive seconds, got {duration!r}")
        lease = self.engine.reserve(float(memory), float(duration), device=device, user=user)
        made = Partition(lease, self._total(device))
        self._made.append(made)
        return made

    def create_raw(self, device: int = 0, memory: float = 0.5, duration: float = 3600,
                   user: str | None = None) -> str:
        """Like :meth:`create`, returning only the partition id."""
        made = self.create(device, memory, duration, user)
        assert made.partition_id is not None
        return made.partition_id

    def list(self) -> list[PartitionInfo]:
        """The active partitions this partitioner made, as the original listed them."""
        self._made = [p for p in self._made if p.partition_id is not None and p.lease.refresh().active]
        return [p.info() for p in self._made]

    def release(self, partition: str | int) -> bool:
        """Release a partition by id; True when it was released, ChronosError when it had ended."""
        lease = self.engine.get(str(partition))
        if lease.state != LeaseState.ACTIVE:
            raise ChronosError(f"Failed to release partition: partition {partition} already ended ({lease.state})")
        self.engine.release(lease.id)
        for made in self._made:
            if made.lease.id == lease.id:
                made.partition_id = None
        return True

    def get_available(self, device: int = 0) -> float:
        """Percent of ``device``'s memory still available for new leases."""
        for status in self.engine.devices():
            if status.index == device:
                return 100.0 * status.memory_available_bytes / status.memory_total_bytes
        raise InvalidRequestError(f"unknown GPU {device}")

    def show_stats(self, stream: TextIO | None = None) -> None:
        """Device statistics on stdout, in the original's layout."""
        out = stream or sys.stdout
        mib = 1 << 20
        out.write("Device statistics:\n=================\n")
        for d in self.engine.devices():
            taken = d.memory_total_bytes - d.memory_available_bytes
            usage = 100.0 * taken / d.memory_total_bytes if d.memory_total_bytes else 0.0
            out.write(f"Device {d.index}: {d.name}\n  Type: GPU\n  Memory:\n"
                      f"    Total: {d.memory_total_bytes // mib} MB\n    Used: {taken // mib} MB\n"
                      f"    Available: {d.memory_available_bytes // mib} MB\n    Usage: {usage:.2f}%\n"
                      f"  Chronos management:\n    Active partitions: {d.active_leases}\n\n")

    def get_backend_name(self) -> str:
        """``NVML`` for real GPUs, ``simulated`` for simulated ones."""
        return "NVML" if self.engine.backend.name == "nvml" else "simulated"

    def get_execution_mode(self) -> str:
        """``concurrent`` (leases share a GPU at once) or ``stub`` (simulated GPUs), as the original named them."""
        return "stub" if self.engine.backend.name == "simulated" else "concurrent"


def is_stub_mode() -> bool:
    """True exactly when the GPUs are simulated."""
    return default_engine().backend.name == "simulated"

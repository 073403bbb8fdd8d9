"""The original Chronos Python API, so its users' scripts run unchanged.

``Partitioner().create(device=0, memory=0.5, duration=3600)`` is a lease of half of GPU 0 for an
hour, bound to the calling process like every lease made through the Python API. A partitioner
works on the default engine unless it is given one.
"""

from __future__ import annotations

import time

from chronos.api import default_engine
from chronos.engine import Engine
from chronos.errors import ChronosError
from chronos.lease import Lease
from chronos.model import LeaseState

ACTIVE = LeaseState.ACTIVE

__all__ = ["Partition", "Partitioner", "is_stub_mode"]


class Partition:
    """A lease seen through the original API's names."""

    def __init__(self, lease: Lease, device_total: int) -> None:
        self._lease = lease
        self._total = device_total

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def partition_id(self) -> str:
        return self._lease.id

    @property
    def device_index(self) -> int:
        return self._lease.devices[0]

    @property
    def memory_fraction(self) -> float:
        return self._lease.memory_bytes / self._total if self._total else 0.0

    @property
    def duration_seconds(self) -> int:
        return round(self._lease.duration_s)

    @property
    def time_remaining(self) -> float:
        return self._lease.remaining

    @property
    def time_remaining_seconds(self) -> int:
        return int(self._lease.remaining)

    @property
    def active(self) -> bool:
        return self._lease.state == ACTIVE and (self._lease.expires_at or 0) > time.time()

    @property
    def username(self) -> str:
        return self._lease.owner

    @property
    def process_id(self) -> int:
        return self._lease.pid or 0

    def release(self) -> None:
        self._lease.release()

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lease.state == ACTIVE:
            self._lease.release()

    def __repr__(self) -> str:
        return (
            f"Partition(id={self.partition_id}, device={self.device_index}, "
            f"memory={self.memory_fraction:.2f}, remaining={self.time_remaining:.0f}s)"
        )


class Partitioner:
    """Creates, lists and releases partitions (leases) as the original API did."""

    def __init__(self, engine: Engine | None = None) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine if self._engine is not None else default_engine()

    def _totals(self) -> dict[int, int]:
        return {d.index: d.memory_total_bytes for d in self.engine.backend.devices()}

    def create(
        self, device: int = 0, memory: float = 0.5, duration: float = 3600, user: str | None = None
    ) -> Partition:
        """Reserve ``memory`` (a fraction in (0, 1]) of GPU ``device`` for ``duration`` seconds."""
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 < memory <= 1:
            raise ChronosError(f"memory must be a fraction in (0, 1], got {memory!r}")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
            raise ChronosError(f"duration must be positive seconds, got {duration!r}")
        lease = self.engine.reserve(float(memory), float(duration), device=device, user=user)
        return Partition(lease, self._totals().get(device, 0))

    def list(self) -> list[Partition]:
        """Active partitions of every user."""
        totals = self._totals()
        return [
            Partition(lease, totals.get(lease.devices[0], 0))
            for lease in self.engine.leases()
            if lease.state == ACTIVE
        ]

    def release(self, partition_id: str | int) -> bool:
        """Release a partition by id; True when it was active."""
        lease = self.engine.get(str(partition_id))
        was_active = lease.state == ACTIVE
        self.engine.release(lease.id)
        return was_active

    def get_available(self, device: int = 0) -> float:
        """Percent of ``device``'s memory still available for new leases."""
        for status in self.engine.devices():
            if status.index == device:
                return 100.0 * status.memory_available_bytes / status.memory_total_bytes
        raise ChronosError(f"unknown GPU {device}")


def is_stub_mode() -> bool:
    """True exactly when the GPUs are simulated."""
    return default_engine().backend.name == "simulated"

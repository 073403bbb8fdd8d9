"""The machine as one user sees it now: every GPU, their own leases, the queue, and forecasts.

Front ends that show Chronos live (the JupyterLab extension, through the Jupyter Server's REST
API) ask here once a second, so each figure is the one the CLI shows: devices from
``chronos stats``' accounting, the queue from ``chronos queue``'s plan, and a forecast is what
``reserve`` would decide now (:meth:`chronos.engine.Engine.forecast`), limits included.
Everything is plain data with a ``to_dict()`` for JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from chronos import stats
from chronos.accounting import DeviceStatus
from chronos.enforce.events import DEFAULT_WARN_AT
from chronos.errors import ChronosError
from chronos.identity import current_user
from chronos.lease import Lease
from chronos.model import LeaseState
from chronos.ops import EngineOps
from chronos.request import RequestSpec
from chronos.text import plain

__all__ = [
    "ENDED_WITHIN_S",
    "Forecast",
    "GpuStatus",
    "LeaseStatus",
    "MachineStatus",
    "forecast",
    "lease_status",
    "machine_status",
    "used_total",
]

#: Leases that ended this recently are reported (so a front end can say how a lease it showed ended).
ENDED_WITHIN_S = 600.0
#: At most this many recently ended leases are reported.
ENDED_LIMIT = 20


@dataclass(frozen=True)
class GpuStatus:
    """One GPU: its size, what leases reserve, what is really used, what no lease accounts for, what is free."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    reserved_bytes: int
    used_bytes: int
    unmanaged_bytes: int
    free_bytes: int
    active_leases: int
    utilization_percent: int | None

    @classmethod
    def of(cls, device: DeviceStatus) -> GpuStatus:
        return cls(
            index=device.index, uuid=device.uuid, name=device.name, total_bytes=device.memory_total_bytes,
            reserved_bytes=device.memory_reserved_bytes, used_bytes=device.memory_used_bytes,
            unmanaged_bytes=device.unmanaged_bytes, free_bytes=device.memory_available_bytes,
            active_leases=device.active_leases, utilization_percent=device.utilization_percent,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def used_total(per_device: Mapping[int, int | None]) -> int | None:
    """A lease's memory in use over its devices; None when the driver hides all of it."""
    known = [nbytes for nbytes in per_device.values() if nbytes is not None]
    return sum(known) if known or not per_device else None


def _shown(label: str | None) -> str | None:
    """A label as the panel shows it to anyone: escaped (:func:`chronos.text.plain`), as every table does."""
    return plain(label) if label else label


@dataclass(frozen=True)
class LeaseStatus:
    """A lease with its memory in use now and the marks (seconds before its end) at which it is warned of."""

    lease: Lease
    used_bytes: int | None = None
    warn_at: tuple[float, ...] = DEFAULT_WARN_AT
    position: int | None = None
    estimated_start: float | None = None

    @property
    def cap_bytes(self) -> int:
        """Memory over all the lease's devices (``memory_bytes`` is per device)."""
        return self.lease.memory_bytes * max(1, len(self.lease.devices))

    def to_dict(self) -> dict[str, Any]:
        data = self.lease.to_dict()
        data.update(label=_shown(data.get("label")), used_bytes=self.used_bytes, cap_bytes=self.cap_bytes,
                    warn_at=list(self.warn_at), position=self.position, estimated_start=self.estimated_start)
        return data


def lease_status(lease: Lease, queue: Mapping[str, stats.QueueEntry] | None = None,
                 warn_at: tuple[float, ...] = DEFAULT_WARN_AT) -> LeaseStatus:
    """``lease`` with its memory in use (active leases) or its place in ``queue`` (queued ones)."""
    used: int | None = None
    if lease.state == LeaseState.ACTIVE:
        try:
            used = used_total(lease.usage())
        except ChronosError:
            used = None
    entry = (queue or {}).get(lease.id)
    return LeaseStatus(lease, used, warn_at, entry.position if entry else None,
                       entry.estimated_start if entry else None)


@dataclass(frozen=True)
class Forecast:
    """What a request would get now: ``fits_now`` (on ``devices``), or its queue ``position`` and
    ``estimated_start`` (None: no known end frees enough); ``error`` when it would be refused outright."""

    fits_now: bool
    devices: tuple[int, ...] = ()
    position: int | None = None
    estimated_start: float | None = None
    reason: str = ""
    error: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = list(self.devices)
        return data


def forecast(engine: EngineOps, spec: RequestSpec, *, user: str | None = None) -> Forecast:
    """Whether ``spec`` would be granted now, else when it would start; a refusal becomes ``error``."""
    try:
        decision = engine.forecast(spec, user=user)
    except ChronosError as exc:
        return Forecast(fits_now=False, reason=str(exc), error=str(exc), exit_code=exc.exit_code)
    if decision.granted:
        return Forecast(fits_now=True, devices=decision.devices or (), position=0, reason="fits now")
    start = decision.estimated_start
    return Forecast(fits_now=False, position=decision.position,
                    estimated_start=start if start is not None and math.isfinite(start) else None,
                    reason=decision.reason)


@dataclass(frozen=True)
class MachineStatus:
    """Everything :func:`machine_status` gathers, at ``now`` (the machine's clock: front ends count from it)."""

    now: float
    user: str
    gpus: list[GpuStatus]
    leases: list[LeaseStatus]
    ended: list[LeaseStatus]
    queue: list[stats.QueueEntry]
    forecasts: dict[str, Forecast] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "user": self.user,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "leases": [lease.to_dict() for lease in self.leases],
            "ended": [lease.to_dict() for lease in self.ended],
            "queue": [{**entry.to_dict(), "label": _shown(entry.label)} for entry in self.queue],
            "forecasts": {name: item.to_dict() for name, item in self.forecasts.items()},
        }


def machine_status(engine: EngineOps, *, user: str | None = None, requests: Mapping[str, RequestSpec] | None = None,
                   warn_at: Mapping[str, tuple[float, ...]] | None = None,
                   ended_within: float = ENDED_WITHIN_S) -> MachineStatus:
    """The GPUs, ``user``'s leases (default: the caller's) live and recently ended, the queue, and a
    :func:`forecast` for each of ``requests`` (by name). ``warn_at`` gives leases (by id) other warning
    marks than the watchdog's default."""
    name = user or current_user().name
    marks = warn_at or {}
    gpus = [GpuStatus.of(device) for device in engine.devices()]
    queue = stats.queue(engine)
    by_id = {entry.lease_id: entry for entry in queue}
    mine = [lease_status(lease, by_id, marks.get(lease.id, DEFAULT_WARN_AT)) for lease in engine.leases(user=name)]
    ended = [
        LeaseStatus(lease, warn_at=marks.get(lease.id, DEFAULT_WARN_AT))
        for lease in engine.leases(all=True, user=name, limit=ENDED_LIMIT)
        if not lease.state.live and lease.ended_at is not None and time.time() - lease.ended_at <= ended_within
    ]
    forecasts = {key: forecast(engine, spec, user=name) for key, spec in (requests or {}).items()}
    return MachineStatus(now=time.time(), user=name, gpus=gpus, leases=mine, ended=ended, queue=queue,
                         forecasts=forecasts)

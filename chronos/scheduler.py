"""Pure scheduling decisions: a snapshot and a request in, a decision out. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field

from chronos.errors import InvalidRequestError
from chronos.units import MemorySpec, format_bytes

__all__ = [
    "PRIORITIES",
    "DeviceState",
    "Holding",
    "Request",
    "Snapshot",
    "Decision",
    "priority_rank",
    "validate",
    "decide",
    "queue_order",
    "extend_conflict",
]

#: Priority classes, lowest first; the rank is the index.
PRIORITIES = ("low", "normal", "high")


def priority_rank(priority: str) -> int:
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        raise InvalidRequestError(
            f"unknown priority {priority!r}: use one of {', '.join(PRIORITIES)}"
        ) from None


@dataclass(frozen=True)
class DeviceState:
    """A device as admission sees it: its size and the memory held outside any lease."""

    index: int
    uuid: str
    total_bytes: int
    unmanaged_bytes: int = 0


@dataclass(frozen=True)
class Holding:
    """An active lease: what it holds and until when."""

    lease_id: str
    devices: tuple[int, ...]
    memory_bytes: int
    expires_at: float


@dataclass(frozen=True)
class Request:
    """A request for leases, queued (``lease_id`` set) or new (``lease_id`` None)."""

    memory: MemorySpec
    duration_s: float
    gpus: int = 1
    devices: tuple[int, ...] | None = None
    prefer: tuple[int, ...] = ()
    priority: str = "normal"
    seq: int = 0
    lease_id: str | None = None
    visible: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything a decision may look at, taken at ``now``."""

    now: float
    devices: tuple[DeviceState, ...]
    active: tuple[Holding, ...] = ()
    queue: tuple[Request, ...] = ()
    distances: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome for one request: devices granted now, or why not and when it may start."""

    devices: tuple[int, ...] | None
    memory_bytes: int = 0
    reason: str = ""
    estimated_start: float | None = None
    position: int | None = None
    free_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def granted(self) -> bool:
        return self.devices is not None


def _free(snapshot: Snapshot) -> dict[int, int]:
    free = {d.index: d.total_bytes - d.unmanaged_bytes for d in snapshot.devices}
    for holding in snapshot.active:
        for index in holding.devices:
            if index in free:
                free[index] -= holding.memory_bytes
    return free


def _candidates(snapshot: Snapshot, request: Request) -> list[DeviceState]:
    devices = list(snapshot.devices)
    if request.visible is not None:
        devices = [d for d in devices if d.index in request.visible]
    return devices


def validate(snapshot: Snapshot, request: Request) -> None:
    """Raise InvalidRequestError for a request that could never fit on this machine."""
    by_index = {d.index: d for d in snapshot.devices}
    candidates = _candidates(snapshot, request)
    if request.gpus < 1:
        raise InvalidRequestError(f"gpus must be at least 1, got {request.gpus}")
    if request.devices is not None:
        if len(set(request.devices)) != len(request.devices):
            raise InvalidRequestError(f"GPU listed twice in {','.join(map(str, request.devices))}")
        for index in request.devices:
            if index not in by_index:
                known = ", ".join(str(i) for i in sorted(by_index)) or "none"
                raise InvalidRequestError(f"unknown GPU {index}: this machine has GPUs {known}")
            if request.visible is not None and index not in request.visible:
                raise InvalidRequestError(
                    f"GPU {index} is not visible here (CUDA_VISIBLE_DEVICES allows {_list(request.visible)})"
                )
        chosen = [by_index[i] for i in request.devices]
    else:
        if request.gpus > len(candidates):
            raise InvalidRequestError(
                f"{request.gpus} GPUs asked for, but this machine has {len(candidates)} that may be used"
            )
        chosen = sorted(candidates, key=lambda d: d.total_bytes, reverse=True)[: request.gpus]
    for device in chosen:
        need = request.memory.resolve(device.total_bytes)
        if need > device.total_bytes:
            raise InvalidRequestError(
                f"{format_bytes(need)} can never fit on GPU {device.index}, which has "
                f"{format_bytes(device.total_bytes)} in all"
            )
        if need <= 0:
            raise InvalidRequestError("memory resolves to 0 bytes on GPU {device.index}: ask for more")


def _list(indices: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in indices)


def queue_order(snapshot: Snapshot) -> list[Request]:
    """Queued requests in grant order: higher class first, first come first served within a class."""
    return sorted(snapshot.queue, key=lambda r: (-priority_rank(r.priority), r.seq))


def _place(snapshot: Snapshot, request: Request, free: dict[int, int]) -> tuple[tuple[int, ...], int] | None:
    by_index = {d.index: d for d in snapshot.devices}
    if request.devices is not None:
        chosen = [by_index[i] for i in request.devices]
        need = min(request.memory.resolve(d.total_bytes) for d in chosen)
        if all(free[d.index] >= need for d in chosen):
            return tuple(request.devices), need
        return None
    fitting = []
    for device in _candidates(snapshot, request):
        need = request.memory.resolve(device.total_bytes)
        if free[device.index] >= need:
            preferred = device.index in request.prefer
            fitting.append((not preferred, -free[device.index], device.index, need))
    if len(fitting) < request.gpus:
        return None
    fitting.sort()
    picked = fitting[: request.gpus]
    need = min(p[3] for p in picked)
    return tuple(sorted(p[2] for p in picked)), need


def decide(snapshot: Snapshot, request: Request) -> Decision:
    """Grant ``request`` now if it fits and no earlier request of equal or higher class waits."""
    validate(snapshot, request)
    free = _free(snapshot)
    order = queue_order(snapshot)
    rank = priority_rank(request.priority)
    ahead = [
        r
        for r in order
        if r.lease_id != request.lease_id
        and (priority_rank(r.priority) > rank or (priority_rank(r.priority) == rank and r.seq < request.seq))
    ]
    position = len(ahead) + 1
    placed = _place(snapshot, request, free)
    if placed is not None and not ahead:
        return Decision(devices=placed[0], memory_bytes=placed[1], position=0, free_bytes=free)
    if placed is None:
        reason = _shortage(snapshot, request, free)
    else:
        reason = f"{len(ahead)} earlier request(s) of equal or higher priority wait first"
    return Decision(devices=None, reason=reason, position=position, free_bytes=free)


def _shortage(snapshot: Snapshot, request: Request, free: dict[int, int]) -> str:
    wanted = str(request.memory)
    where = request.devices if request.devices is not None else [d.index for d in _candidates(snapshot, request)]
    frees = ", ".join(f"GPU {i}: {format_bytes(max(0, free[i]))}" for i in where)
    count = f" on each of {request.gpus} GPUs" if request.gpus > 1 else ""
    return f"not enough free memory for {wanted}{count} (free now: {frees})"


def extend_conflict(snapshot: Snapshot, lease_id: str, new_expires_at: float) -> str | None:
    """Why extending ``lease_id`` to ``new_expires_at`` is refused, or None when it is fine."""
    return None

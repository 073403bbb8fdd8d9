"""Pure scheduling decisions: a snapshot and a request in, a decision out. No I/O here.

The model is conservative backfill. Every device's free memory is a step function of time: it
rises as active leases reach their end (``expires_at``) and is held over each booking's window.
Queued requests are placed in grant order (higher priority class first; within a class, with fair
share the owner with less recent use first, then first come first served), each at the earliest
time it fits, and each reserves its future slot. A request may start now only if it fits now *and* does not
overlap the slot reserved by any earlier request of equal or higher class, so granting it never
delays them (no starvation), while small short requests still slip into gaps (backfill).

Placement: named devices are all-or-none; ``gpus=N`` is a gang, all-or-none, on devices close
together (``Snapshot.distances``, smaller is closer), then the least loaded; ``prefer`` wins when the
preferred devices fit; ``visible`` (the caller's CUDA_VISIBLE_DEVICES) limits the candidates.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import combinations
from operator import itemgetter
from typing import Any

from chronos.errors import InvalidRequestError
from chronos.model import Priority
from chronos.units import MemorySpec, format_bytes, format_clock, format_duration

__all__ = [
    "Booked",
    "Decision",
    "DeviceState",
    "Holding",
    "Request",
    "Slot",
    "Snapshot",
    "decide",
    "estimate_start",
    "estimates",
    "extend_conflict",
    "forecast",
    "next_seq",
    "place_booking",
    "plan",
    "queue_order",
    "validate",
]

_INF = math.inf

#: A request that fits now is checked against the slots of the earlier requests that could start
#: before it would end; when there are more than this many it waits its turn instead (as Slurm's
#: backfill bounds the jobs it tests). This bounds the cost of one decision on a long queue.
BACKFILL_DEPTH = 64


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
    priority: Priority = Priority.NORMAL
    seq: int = 0
    lease_id: str | None = None
    visible: tuple[int, ...] | None = None
    #: With fair share, the owner's recent use (smaller goes first within a class); 0 otherwise.
    share: float = 0.0

    def to_json(self, bind: bool | int) -> dict[str, Any]:
        """The form the ledger stores beside a lease (and ``bind``, how its holder was given)."""
        return {
            "nbytes": self.memory.nbytes, "fraction": self.memory.fraction, "gpus": self.gpus,
            "devices": list(self.devices) if self.devices is not None else None, "prefer": list(self.prefer),
            "visible": list(self.visible) if self.visible is not None else None, "bind": bind,
        }

    @classmethod
    def from_json(cls, spec: dict[str, Any], lease_id: str, duration_s: float, priority: Priority) -> Request:
        """A queued lease's request as stored by :meth:`to_json`."""
        return cls(
            memory=MemorySpec(nbytes=spec.get("nbytes"), fraction=spec.get("fraction")),
            duration_s=duration_s,
            gpus=spec.get("gpus", 1),
            devices=tuple(spec["devices"]) if spec.get("devices") is not None else None,
            prefer=tuple(spec.get("prefer") or ()),
            priority=priority,
            seq=int(lease_id),
            lease_id=lease_id,
            visible=tuple(spec["visible"]) if spec.get("visible") is not None else None,
        )


@dataclass(frozen=True)
class Booked:
    """A booking not yet claimed: ``memory_bytes`` on each of ``devices`` over ``[start, end)``."""

    lease_id: str
    devices: tuple[int, ...]
    memory_bytes: int
    start: float
    end: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a decision may look at, taken at ``now``."""

    now: float
    devices: tuple[DeviceState, ...]
    active: tuple[Holding, ...] = ()
    queue: tuple[Request, ...] = ()
    distances: tuple[tuple[int, ...], ...] | None = None
    bookings: tuple[Booked, ...] = ()
    #: Bytes ``active`` holds per device index, when the caller keeps that sum (else it is summed here).
    held: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome for one request: devices granted now, or why not and when it may start.

    ``position`` is 0 when granted, else the 1-based place in the queue the request has (or would
    take). ``estimated_start`` is None when it was not computed (see ``decide(estimate=...)``) and
    ``inf`` when no end time in view lets the request start (memory held outside leases).
    """

    devices: tuple[int, ...] | None
    memory_bytes: int = 0
    reason: str = ""
    estimated_start: float | None = None
    position: int | None = None
    free_bytes: dict[int, int] = field(default_factory=dict)
    #: Why a refused request waits: ``memory`` (not enough free now), ``queue`` (it would delay an
    #: earlier request), ``booking`` (it would run into a booking), ``depth`` (too many to check).
    cause: str = ""

    @property
    def granted(self) -> bool:
        return self.devices is not None


@dataclass(frozen=True)
class Slot:
    """Where and when a queued request is expected to start, as planned from known end times."""

    lease_id: str | None
    position: int
    start: float
    devices: tuple[int, ...]
    memory_bytes: int


# -- validation ----------------------------------------------------------------------------------
def _candidates(snapshot: Snapshot, request: Request) -> list[DeviceState]:
    if request.devices is not None:
        by_index = {d.index: d for d in snapshot.devices}
        return [by_index[i] for i in request.devices]
    if request.visible is not None:
        return [d for d in snapshot.devices if d.index in request.visible]
    return list(snapshot.devices)


def validate(snapshot: Snapshot, request: Request) -> None:
    """Raise InvalidRequestError for a request that could never fit on this machine."""
    by_index = {d.index: d for d in snapshot.devices}
    if request.gpus < 1:
        raise InvalidRequestError(f"gpus must be at least 1, got {request.gpus}")
    if not (request.duration_s > 0) or math.isinf(request.duration_s):
        raise InvalidRequestError(f"duration must be positive seconds, not {request.duration_s!r}")
    for index in request.prefer:  # a preference for no GPU here would be ignored without a word
        if index not in by_index:
            known = ", ".join(str(i) for i in sorted(by_index)) or "none"
            raise InvalidRequestError(f"--prefer {index}: there is no GPU {index} here; this machine has GPUs {known}")
        if request.visible is not None and index not in request.visible:
            raise InvalidRequestError(f"--prefer {index}: GPU {index} is not visible here "
                                      f"(CUDA_VISIBLE_DEVICES allows {_list(request.visible)})")
    if request.devices is not None:
        if len(set(request.devices)) != len(request.devices):
            raise InvalidRequestError(f"GPU listed twice in {_list(request.devices)}")
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
        candidates = _candidates(snapshot, request)
        if request.gpus > len(candidates):
            raise InvalidRequestError(
                f"{request.gpus} GPUs asked for, but this machine has {len(candidates)} that may be used"
            )
        chosen = sorted(candidates, key=lambda d: d.total_bytes, reverse=True)[: request.gpus]
    for device in chosen:
        need = request.memory.resolve(device.total_bytes)
        if need > device.total_bytes:
            if request.devices is not None:
                where = f"GPU {device.index}, which has"
            elif request.gpus == 1:
                where = "any GPU here: the largest has"
            else:
                where = f"each of {request.gpus} GPUs here: GPU {device.index} has"
            raise InvalidRequestError(
                f"{format_bytes(need)} can never fit on {where} {format_bytes(device.total_bytes)} in all"
            )
        if need <= 0:
            raise InvalidRequestError(f"memory resolves to 0 bytes on GPU {device.index}: ask for more")


def _list(indices: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in indices)


def _grant_key(request: Request) -> tuple[int, float, int]:
    return (-request.priority.rank, request.share, request.seq)


class _Order:
    """A queue in grant order, with what lets a decision skip a pass over it: each request's place, the
    class keys (for the prefix a new request goes behind), and per gang size the smallest plain need in
    every prefix (whether any plain request of a prefix could fit by some time, without a pass)."""

    __slots__ = ("index", "keys", "last_seq", "order", "plain_min", "queue", "tangled")

    def __init__(self, queue: tuple[Request, ...]) -> None:
        self.queue = queue
        self.order = sorted(queue, key=_grant_key)
        self.keys = [(-r.priority.rank, r.share) for r in self.order]
        self.index = {r.lease_id: i for i, r in enumerate(self.order) if r.lease_id is not None}
        self.last_seq = max((r.seq for r in queue), default=0)
        #: plain_min[gpus][k]: the smallest byte need of the plain requests (no named or visible devices, a
        #: size in bytes) for ``gpus`` GPUs among the first k; tangled[k]: how many of the first k are not plain.
        self.plain_min: dict[int, list[float]] = {}
        self.tangled = [0]
        for k, r in enumerate(self.order):
            nbytes = r.memory.nbytes
            plain = r.devices is None and r.visible is None and nbytes is not None
            self.tangled.append(self.tangled[-1] + (not plain))
            if plain and nbytes is not None:
                mine = self.plain_min.setdefault(r.gpus, [_INF] * (k + 1))
                mine.append(min(mine[-1], nbytes))
            for column in self.plain_min.values():
                if len(column) < k + 2:
                    column.append(column[-1])


_last_order: list[_Order] = []


def _ordered(snapshot: Snapshot) -> _Order:
    """The grant order of ``snapshot.queue``, kept for the last queue seen: a caller that hands the same
    queue (the same tuple) to one decision after another pays for ordering it once."""
    kept = _last_order[0] if _last_order else None
    if kept is not None and kept.queue is snapshot.queue:
        return kept
    found = _Order(snapshot.queue)
    _last_order[:] = [found]
    return found


def queue_order(snapshot: Snapshot) -> list[Request]:
    """Queued requests in grant order: higher class first; within a class the smaller ``share`` (fair
    share: less recent use) first, then first come first served."""
    return list(_ordered(snapshot).order)


def next_seq(snapshot: Snapshot) -> int:
    """The arrival number a new request gets: after every queued one."""
    return _ordered(snapshot).last_seq + 1


def _ahead(snapshot: Snapshot, request: Request) -> list[Request]:
    """Queued requests that must not be delayed by ``request``, in grant order."""
    found = _ordered(snapshot)
    order = found.order
    rank = request.priority.rank
    if request.lease_id is not None:
        i = found.index.get(request.lease_id)
        if i is not None:
            return order[:i]
        return [r for r in order if _grant_key(r) < (-rank, request.share, request.seq)]
    # A new request comes after every queued request of its class with no more recent use than its own.
    return order[:bisect_right(found.keys, (-rank, request.share))]


# -- the free-memory profile -----------------------------------------------------------------------
def _free_now(snapshot: Snapshot) -> dict[int, int]:
    if snapshot.held is not None:
        held = dict(snapshot.held)
        return {d.index: d.total_bytes - d.unmanaged_bytes - held.get(d.index, 0) for d in snapshot.devices}
    free = {d.index: d.total_bytes - d.unmanaged_bytes for d in snapshot.devices}
    for holding in snapshot.active:
        nbytes = holding.memory_bytes
        for index in holding.devices:
            if index in free:
                free[index] -= nbytes
    return free


def _free_by(snapshot: Snapshot, free_now: dict[int, int], horizon: float) -> dict[int, int]:
    """Free memory per device just before ``horizon``, counting active leases only."""
    free = dict(free_now)
    for holding in snapshot.active:
        if holding.expires_at < horizon:
            nbytes = holding.memory_bytes
            for index in holding.devices:
                if index in free:
                    free[index] += nbytes
    return free


class _Profile:
    """Free memory per device as a step function of time.

    ``free[d][i]`` holds on ``[times[d][i], times[d][i+1])``; the last value holds for ever.
    """

    __slots__ = ("free", "now", "times")

    def __init__(self, snapshot: Snapshot, free_now: dict[int, int],
                 override: tuple[str, float] | None = None) -> None:
        now = snapshot.now
        # A lease already past its end still holds its memory until reclaimed: release it just after now.
        soon = math.nextafter(now, _INF)
        ends = []
        for holding in snapshot.active:
            end = holding.expires_at
            if override is not None and holding.lease_id == override[0]:
                end = override[1]
            ends.append((end if end > now else soon, holding.devices, holding.memory_bytes))
        ends.sort(key=itemgetter(0))
        self.now = now
        self.times: dict[int, list[float]] = {index: [now] for index in free_now}
        self.free: dict[int, list[int]] = {index: [free] for index, free in free_now.items()}
        times_of = self.times
        free_of = self.free
        for end, devices, nbytes in ends:
            for index in devices:
                times = times_of.get(index)
                if times is None:
                    continue
                frees = free_of[index]
                if times[-1] == end:
                    frees[-1] += nbytes
                else:
                    times.append(end)
                    frees.append(frees[-1] + nbytes)
        for booked in snapshot.bookings:  # held over its window, as a queued request's slot is
            if booked.end > now:
                for index in booked.devices:
                    if index in times_of:
                        self.take(index, max(booked.start, now), booked.end, booked.memory_bytes)

    @classmethod
    def flat(cls, snapshot: Snapshot, free_now: dict[int, int]) -> _Profile:
        """Free memory now, held constant: enough to decide with no future reservation to respect."""
        profile = cls.__new__(cls)
        profile.now = snapshot.now
        profile.times = {index: [snapshot.now] for index in free_now}
        profile.free = {index: [free] for index, free in free_now.items()}
        return profile

    def fit(self, index: int, need: int, start: float, length: float, limit: float = _INF) -> float:
        """Earliest time >= ``start`` from which ``need`` bytes stay free on ``index`` for ``length`` s.

        Gives up (returns inf) once the answer would be later than ``limit``.
        """
        times = self.times[index]
        frees = self.free[index]
        n = len(times)
        i = bisect_right(times, start) - 1
        while True:
            if start > limit:
                return _INF
            end = start + length
            k = i
            while k < n and times[k] < end:
                if frees[k] < need:
                    break
                k += 1
            else:
                return start
            k += 1
            while k < n and frees[k] < need:
                k += 1
            if k >= n:
                return _INF
            i = k
            start = times[k]

    def free_at(self, index: int, at: float) -> int:
        times = self.times[index]
        return self.free[index][bisect_right(times, at) - 1]

    def take(self, index: int, start: float, end: float, nbytes: int) -> None:
        """Reserve ``nbytes`` on ``index`` over ``[start, end)``."""
        times = self.times[index]
        frees = self.free[index]
        i = self._split(times, frees, start)
        j = self._split(times, frees, end)
        for k in range(i, j):
            frees[k] -= nbytes

    @staticmethod
    def _split(times: list[float], frees: list[int], at: float) -> int:
        i = bisect_left(times, at)
        if i < len(times) and times[i] == at:
            return i
        times.insert(i, at)
        frees.insert(i, frees[i - 1])
        return i


def _needs(snapshot: Snapshot, request: Request, candidates: list[DeviceState]) -> dict[int, int]:
    memory = request.memory
    if memory.nbytes is not None:
        return {d.index: memory.nbytes for d in candidates}
    gang = request.gpus > 1 or (request.devices is not None and len(request.devices) > 1)
    if gang and candidates:
        # A gang holds the same amount on each device: the fraction of the smallest candidate.
        need = memory.resolve(min(d.total_bytes for d in candidates))
        return {d.index: need for d in candidates}
    return {d.index: memory.resolve(d.total_bytes) for d in candidates}


def _earliest(profile: _Profile, needs: dict[int, int], count: int, length: float,
              not_before: float) -> tuple[float, list[int]]:
    """Earliest start with ``count`` of the devices in ``needs`` free for ``length`` s, and which fit then."""
    if count == 1:
        best = _INF
        at_best: list[int] = []
        for index, need in needs.items():
            at = profile.fit(index, need, not_before, length, best)
            if at < best:
                best, at_best = at, [index]
            elif at == best and at != _INF:
                at_best.append(index)
        return best, at_best
    start = not_before
    while True:
        starts = {index: profile.fit(index, need, start, length) for index, need in needs.items()}
        ordered = sorted(starts.values())
        at = ordered[count - 1]
        if at == _INF:
            return _INF, []
        if at == start:
            return start, [index for index, s in starts.items() if s == start]
        start = at


@lru_cache(maxsize=32)
def _subsets(positions: tuple[int, ...], distances: tuple[tuple[int, ...], ...] | None,
             count: int) -> tuple[tuple[tuple[int, ...], int, int], ...]:
    """Every ``count``-subset of device positions with its widest and summed link distance, closest first."""
    out = []
    for combo in combinations(positions, count):
        widest = 0
        total = 0
        if distances is not None:
            for a, b in combinations(combo, 2):
                link = distances[a][b] if a < len(distances) and b < len(distances[a]) else 0
                widest = max(widest, link)
                total += link
        out.append((combo, widest, total))
    out.sort(key=lambda item: (item[1], item[2]))
    return tuple(out)


def _choose(snapshot: Snapshot, request: Request, profile: _Profile, fitting: list[int], count: int,
            at: float) -> tuple[int, ...]:
    """Among devices that fit at ``at``, pick ``count``: preferred, close together, least loaded."""
    if request.devices is not None:
        return request.devices
    prefer = request.prefer
    if count == 1:
        return (min(fitting, key=lambda i: (i not in prefer, -profile.free_at(i, at), i)),)
    if len(fitting) == count:
        return tuple(sorted(fitting))
    position = {d.index: p for p, d in enumerate(snapshot.devices)}
    index_at = {p: d.index for p, d in enumerate(snapshot.devices)}
    positions = tuple(sorted(position[i] for i in fitting))
    free = {i: profile.free_at(i, at) for i in fitting}
    best_key: tuple[int, int, int, int, int] | None = None
    best: tuple[int, ...] = ()
    if math.comb(len(positions), count) <= 512:
        for combo, widest, total in _subsets(positions, snapshot.distances, count):
            indices = tuple(index_at[p] for p in combo)
            frees = [free[i] for i in indices]
            key = (sum(i not in prefer for i in indices), widest, total, -min(frees), -sum(frees))
            if best_key is None or key < best_key:
                best_key, best = key, indices
        return tuple(sorted(best))
    # Very wide machines: preferred and least loaded first, greedily (topology not searched).
    ranked = sorted(fitting, key=lambda i: (i not in prefer, -free[i], i))
    return tuple(sorted(ranked[:count]))


def _place(snapshot: Snapshot, profile: _Profile, request: Request, not_before: float
           ) -> tuple[float, tuple[int, ...], int]:
    """Earliest start, devices and per-device bytes for ``request`` in ``profile`` (start inf: never)."""
    candidates = _candidates(snapshot, request)
    needs = _needs(snapshot, request, candidates)
    count = len(request.devices) if request.devices is not None else request.gpus
    if count > len(needs):
        return _INF, (), 0
    at, fitting = _earliest(profile, needs, count, request.duration_s, not_before)
    if at == _INF:
        return _INF, (), 0
    chosen = _choose(snapshot, request, profile, fitting, count, at)
    return at, chosen, min(needs[i] for i in chosen)


def _reserve(profile: _Profile, start: float, devices: tuple[int, ...], nbytes: int, length: float) -> None:
    if start == _INF:
        return
    for index in devices:
        profile.take(index, start, start + length, nbytes)


def _plan(snapshot: Snapshot, profile: _Profile, order: list[Request]) -> list[Slot]:
    slots = []
    now = snapshot.now
    for position, queued in enumerate(order, 1):
        try:
            start, devices, nbytes = _place(snapshot, profile, queued, now)
        except (KeyError, InvalidRequestError):  # a device it names is gone: it waits for nothing
            start, devices, nbytes = _INF, (), 0
        _reserve(profile, start, devices, nbytes, queued.duration_s)
        slots.append(Slot(queued.lease_id, position, start, devices, nbytes))
    return slots


def _overlapping_prefix(snapshot: Snapshot, free_now: dict[int, int], ahead: list[Request],
                        horizon: float) -> int:
    """How many of ``ahead`` must be planned to know every slot that starts before ``horizon``.

    Counting active leases only, free memory only grows with time, so a request that does not fit
    by ``horizon`` on that count starts at or after it in any plan. The slots of the requests up to
    the last one that might start earlier are exact only when planned in order, so that prefix is
    the answer. ``ahead`` is drawn from :func:`queue_order`'s order, in that order.
    """
    reach = _free_by(snapshot, free_now, horizon)
    ranked = sorted(reach.values(), reverse=True)
    kept = _ordered(snapshot)
    m = len(ahead)
    # ``ahead`` is in grant order, drawn from the kept order: spanning its first m places, it is that prefix.
    if ahead and ahead[0] is kept.order[0] and ahead[-1] is kept.order[m - 1] and not kept.tangled[m] and all(
            gpus > len(ranked) or column[m] > ranked[gpus - 1] for gpus, column in kept.plain_min.items()):
        return 0  # every one of them is plain, and none fits by the horizon: the pass below would find none
    last = 0
    for i, queued in enumerate(ahead, 1):
        nbytes = queued.memory.nbytes
        if queued.devices is None and queued.visible is None and nbytes is not None:
            if queued.gpus <= len(ranked) and nbytes <= ranked[queued.gpus - 1]:
                last = i
            continue
        try:
            candidates = _candidates(snapshot, queued)
        except KeyError:
            continue
        needs = _needs(snapshot, queued, candidates)
        count = len(queued.devices) if queued.devices is not None else queued.gpus
        if sum(1 for index, need in needs.items() if reach[index] >= need) >= count:
            last = i
    return last


# -- public entry points ---------------------------------------------------------------------------
def plan(snapshot: Snapshot) -> list[Slot]:
    """Every queued request in grant order with the slot it is expected to start in."""
    profile = _Profile(snapshot, _free_now(snapshot))
    return _plan(snapshot, profile, queue_order(snapshot))


def estimates(snapshot: Snapshot) -> dict[str, tuple[int, float | None]]:
    """``lease_id -> (position, estimated start)`` for every queued request.

    The start is None when no known end time frees enough memory (memory held outside leases).
    """
    return {slot.lease_id: (slot.position, _known(slot.start)) for slot in plan(snapshot)
            if slot.lease_id is not None}


def forecast(snapshot: Snapshot, request: Request) -> Slot:
    """Where and when ``request`` would start if it were queued now, behind the requests it must not delay."""
    validate(snapshot, request)
    ahead = _ahead(snapshot, request)
    profile = _Profile(snapshot, _free_now(snapshot))
    _plan(snapshot, profile, ahead)
    start, devices, nbytes = _place(snapshot, profile, request, snapshot.now)
    return Slot(request.lease_id, len(ahead) + 1, start, devices, nbytes)


def estimate_start(snapshot: Snapshot, request: Request) -> float | None:
    """When ``request`` is expected to start (now or later), or None when no known end frees enough."""
    return _known(forecast(snapshot, request).start)


def decide(snapshot: Snapshot, request: Request, *, estimate: bool = False) -> Decision:
    """Grant ``request`` now if it fits and delays no earlier request of equal or higher class.

    With ``estimate`` a refused request also gets its estimated start, which plans every request
    ahead of it (tens of milliseconds on a queue of a thousand); without, it is left None.
    """
    validate(snapshot, request)
    free = _free_now(snapshot)
    ahead = _ahead(snapshot, request)
    position = len(ahead) + 1

    def refuse(reason: str, start: float | None = None, cause: str = "queue") -> Decision:
        if estimate and start is None:
            start = forecast(snapshot, request).start
        later = None if start is None else _known(start)
        return Decision(devices=None, reason=reason, estimated_start=later, position=position,
                        free_bytes=free, cause=cause)

    needs = _needs(snapshot, request, _candidates(snapshot, request))
    count = len(request.devices) if request.devices is not None else request.gpus
    if sum(1 for index, need in needs.items() if free[index] >= need) < count:
        return refuse(_shortage(snapshot, request, free), cause="memory")
    end = snapshot.now + request.duration_s
    booked = any(b.start < end and b.end > snapshot.now for b in snapshot.bookings)
    if not ahead and not booked:
        # Nothing to protect: free memory only grows from now on, so fitting now is fitting throughout.
        start, devices, nbytes = _place(snapshot, _Profile.flat(snapshot, free), request, snapshot.now)
        return Decision(devices=devices, memory_bytes=nbytes, position=0, free_bytes=free)
    relevant = ahead[: _overlapping_prefix(snapshot, free, ahead, end)]
    if len(relevant) > BACKFILL_DEPTH:
        return refuse(f"{len(relevant)} earlier request(s) of equal or higher priority could start before "
                      f"this one would end; it waits its turn", cause="depth")
    if not relevant and not booked:  # none of them can start before this one would end
        start, devices, nbytes = _place(snapshot, _Profile.flat(snapshot, free), request, snapshot.now)
        return Decision(devices=devices, memory_bytes=nbytes, position=0, free_bytes=free)
    profile = _Profile(snapshot, free)
    _plan(snapshot, profile, relevant)
    start, devices, nbytes = _place(snapshot, profile, request, snapshot.now)
    if start == snapshot.now:
        return Decision(devices=devices, memory_bytes=nbytes, position=0, free_bytes=free)
    later = start if len(relevant) == len(ahead) else None
    if booked:
        unbooked = replace(snapshot, bookings=())
        clear = _Profile(unbooked, free)
        _plan(unbooked, clear, relevant)
        if _place(unbooked, clear, request, snapshot.now)[0] == snapshot.now:
            return refuse(_booking_clash(snapshot, request, needs), later, cause="booking")
    return refuse(
        f"it fits now, but would delay one of the {len(relevant)} earlier request(s) of equal or higher "
        f"priority that wait", later,
    )


def _booking_clash(snapshot: Snapshot, request: Request, needs: dict[int, int]) -> str:
    """Why a request that fits now is refused for a booking: the first one it would run into."""
    end = snapshot.now + request.duration_s
    clashes = sorted((b for b in snapshot.bookings if b.start < end and b.end > snapshot.now
                      and any(i in needs for i in b.devices)), key=lambda b: (b.start, b.lease_id))
    if not clashes:
        return "it would run into a booking"
    first = clashes[0]
    where = ",".join(str(i) for i in first.devices)
    room = first.start - snapshot.now
    tail = f"; ask for at most {format_duration(room)} to start now" if room >= 60 else ""
    return (f"it would run into booking {first.lease_id} ({format_bytes(first.memory_bytes)} on GPU {where} "
            f"from {format_clock(first.start)}){tail}")


def place_booking(snapshot: Snapshot, request: Request, start: float) -> Slot:
    """Where ``request`` would be held from ``start`` beside every active lease, booking and queued
    request's planned slot (so a booking delays nobody waiting); ``slot.start`` is later than
    ``start`` when it cannot begin then (inf: no known end frees enough)."""
    validate(snapshot, request)
    begin = max(start, snapshot.now)
    if not snapshot.queue:
        # No queued request's slot to keep: whether it fits from ``begin`` (and where) depends only on the
        # bookings overlapping its window, however many are booked beyond. Where it does not fit, the
        # earliest start it could have is worked out over them all.
        end = begin + request.duration_s
        near = replace(snapshot, bookings=tuple(b for b in snapshot.bookings if b.start < end and b.end > begin))
        at, devices, nbytes = _place(near, _Profile(near, _free_now(near)), request, begin)
        if at == begin:
            return Slot(request.lease_id, 0, at, devices, nbytes)
    return _place_booking_in_full(snapshot, request, start)


def _place_booking_in_full(snapshot: Snapshot, request: Request, start: float) -> Slot:
    """:func:`place_booking` with every booking and queued request in the profile."""
    profile = _Profile(snapshot, _free_now(snapshot))
    _plan(snapshot, profile, queue_order(snapshot))
    at, devices, nbytes = _place(snapshot, profile, request, max(start, snapshot.now))
    return Slot(request.lease_id, 0, at, devices, nbytes)


def _known(start: float) -> float | None:
    return None if start == _INF else start


def _shortage(snapshot: Snapshot, request: Request, free: dict[int, int]) -> str:
    wanted = str(request.memory)
    where = [d.index for d in _candidates(snapshot, request)]
    frees = ", ".join(f"GPU {i}: {format_bytes(max(0, free[i]))}" for i in where)
    count = f" on each of {request.gpus} GPUs" if request.gpus > 1 and request.devices is None else ""
    return f"not enough free memory for {wanted}{count} (free now: {frees})"


def extend_conflict(snapshot: Snapshot, lease_id: str, new_expires_at: float) -> str | None:
    """Why extending ``lease_id`` to ``new_expires_at`` is refused; None when no queued request is delayed.

    The queue is planned as it stands; the extension is fine when the lease's memory, kept on its
    devices from its current end to the new one, fits beside every slot planned there.
    """
    holding = next((h for h in snapshot.active if h.lease_id == lease_id), None)
    booked = [b for b in snapshot.bookings if b.start < new_expires_at and b.end > holding.expires_at
              and set(b.devices) & set(holding.devices)] if holding is not None else []
    if holding is None or not (snapshot.queue or booked) or new_expires_at <= holding.expires_at:
        return None
    order = queue_order(snapshot)
    free = _free_now(snapshot)
    relevant = order[: _overlapping_prefix(snapshot, free, order, new_expires_at)]
    if not relevant and not booked:
        return None
    profile = _Profile(snapshot, free)
    slots = _plan(snapshot, profile, relevant)
    old_end = holding.expires_at if holding.expires_at > snapshot.now else math.nextafter(snapshot.now, _INF)
    for index in holding.devices:
        times = profile.times.get(index)
        if times is None:
            continue
        frees = profile.free[index]
        k = bisect_right(times, old_end) - 1
        while k < len(times) and times[k] < new_expires_at:
            if frees[k] < holding.memory_bytes:
                at = max(times[k], old_end)
                for slot, queued in zip(slots, relevant, strict=True):
                    if index in slot.devices and slot.start <= at < slot.start + queued.duration_s:
                        return (f"it would delay queued request {slot.lease_id} (position {slot.position}), "
                                f"planned to start on GPU {index} in {format_duration(slot.start - snapshot.now)}; "
                                f"extend by less, or release and reserve again later")
                for b in booked:
                    if index in b.devices and b.start <= at < b.end:
                        room = max(0.0, b.start - holding.expires_at)
                        return (f"it would run into booking {b.lease_id} on GPU {index} from {format_clock(b.start)}; "
                                f"extend by at most {format_duration(room)}" if room >= 60 else
                                f"it would run into booking {b.lease_id} on GPU {index} from {format_clock(b.start)}")
                return "it would delay a queued request; extend by less, or release and reserve again later"
            k += 1
    return None

"""Properties of the scheduler over generated machines, leases and queues (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos import scheduler as S
from chronos.model import Priority
from chronos.units import MemorySpec

G = 1 << 30
NOW = 10_000.0
PRIORITY = st.sampled_from(list(Priority))
PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def machines(draw: st.DrawFn) -> tuple[S.DeviceState, ...]:
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.sampled_from([16, 24, 40]), min_size=n, max_size=n))
    return tuple(S.DeviceState(i, f"GPU-{i}", size * G, draw(st.sampled_from([0, 0, 2 * G])))
                 for i, size in enumerate(sizes))


#: Owners' recent use under fair share: a few levels, so that ties (first come, first served) happen too.
SHARES = st.sampled_from([0.0, 0.0, 5.0, 40.0, 312.0])


@st.composite
def requests(draw: st.DrawFn, devices: tuple[S.DeviceState, ...], *, seq: int = 0,
             lease_id: str | None = None, fair: bool = False) -> S.Request:
    smallest = min(d.total_bytes - d.unmanaged_bytes for d in devices) // G
    n = len(devices)
    named = draw(st.booleans()) and n > 1
    if named:
        chosen = tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))))
        gpus = len(chosen)
    else:
        chosen = None
        gpus = draw(st.integers(1, n))
    if draw(st.integers(0, 5)) == 0:
        memory = MemorySpec(fraction=draw(st.sampled_from([0.25, 0.5])))
    else:
        memory = MemorySpec(nbytes=draw(st.integers(1, max(1, smallest))) * G)
    return S.Request(
        memory=memory,
        duration_s=float(draw(st.integers(1, 50)) * 10),
        gpus=gpus,
        devices=chosen,
        prefer=tuple(draw(st.sets(st.integers(0, n - 1), max_size=2))),
        priority=draw(PRIORITY),
        seq=seq,
        lease_id=lease_id,
        share=draw(SHARES) if fair else 0.0,
    )


@st.composite
def snapshots(draw: st.DrawFn, max_queue: int = 6, *, fair: bool = False, booked: bool = False) -> S.Snapshot:
    devices = draw(machines())
    free = {d.index: d.total_bytes - d.unmanaged_bytes for d in devices}
    active = []
    for i in range(draw(st.integers(0, 6))):
        index = draw(st.integers(0, len(devices) - 1))
        if free[index] < G:
            continue
        nbytes = draw(st.integers(1, free[index] // G)) * G
        free[index] -= nbytes
        active.append(S.Holding(f"a{i}", (index,), nbytes, NOW + draw(st.integers(1, 60)) * 10))
    queue = [draw(requests(devices, seq=i + 1, lease_id=f"q{i + 1}", fair=fair))
             for i in range(draw(st.integers(0, max_queue)))]
    bookings = []
    if booked:  # placed as the engine places them: where they fit beside everything known
        for i in range(draw(st.integers(0, 3))):
            want = draw(requests(devices))
            want = replace(want, memory=MemorySpec(nbytes=want.memory.nbytes or G), devices=None, gpus=1)
            start = NOW + draw(st.integers(0, 60)) * 10
            snapshot = S.Snapshot(now=NOW, devices=devices, active=tuple(active), queue=tuple(queue),
                                  bookings=tuple(bookings))
            slot = S.place_booking(snapshot, want, start)
            if slot.start == start:
                bookings.append(S.Booked(f"b{i}", slot.devices, slot.memory_bytes, start, start + want.duration_s))
    return S.Snapshot(now=NOW, devices=devices, active=tuple(active), queue=tuple(queue), bookings=tuple(bookings))


def ahead_of(snapshot: S.Snapshot, request: S.Request) -> list[S.Request]:
    """The queued requests a new request must not delay: its class and above, with no more recent use."""
    key = (-request.priority.rank, request.share)
    return [r for r in S.queue_order(snapshot) if (-r.priority.rank, r.share) <= key]


def used_after(snapshot: S.Snapshot, decision: S.Decision) -> dict[int, int]:
    used = {d.index: d.unmanaged_bytes for d in snapshot.devices}
    for holding in snapshot.active:
        for index in holding.devices:
            used[index] += holding.memory_bytes
    for booked in snapshot.bookings:
        if booked.start <= snapshot.now < booked.end:
            for index in booked.devices:
                used[index] += booked.memory_bytes
    for index in decision.devices or ():
        used[index] += decision.memory_bytes
    return used


def grant(snapshot: S.Snapshot, request: S.Request, decision: S.Decision, lease_id: str) -> S.Snapshot:
    assert decision.devices is not None
    holding = S.Holding(lease_id, decision.devices, decision.memory_bytes, snapshot.now + request.duration_s)
    queue = tuple(r for r in snapshot.queue if r.lease_id != request.lease_id or request.lease_id is None)
    return replace(snapshot, active=(*snapshot.active, holding), queue=queue)


POLICIES = st.sampled_from([(False, False), (True, False), (False, True), (True, True)])  # (fair share, bookings)


@PROPS
@given(st.data(), POLICIES)
def test_a_grant_never_overcommits_and_a_gang_is_all_or_nothing(data: st.DataObject, policy: tuple[bool, bool]
                                                                 ) -> None:
    snapshot = data.draw(snapshots(fair=policy[0], booked=policy[1]))
    request = data.draw(requests(snapshot.devices, fair=policy[0]))
    decision = S.decide(snapshot, request)
    if not decision.granted:
        assert decision.reason
        return
    assert decision.devices is not None
    wanted = len(request.devices) if request.devices is not None else request.gpus
    assert len(decision.devices) == wanted == len(set(decision.devices))
    if request.devices is not None:
        assert set(decision.devices) == set(request.devices)
    totals = {d.index: d.total_bytes for d in snapshot.devices}
    if wanted > 1:
        # A gang holds the same amount on each device: a fraction is of the smallest candidate.
        candidates = request.devices if request.devices is not None else (
            request.visible if request.visible is not None else tuple(totals))
        assert decision.memory_bytes == request.memory.resolve(min(totals[i] for i in candidates))
    else:
        assert decision.memory_bytes == request.memory.resolve(totals[decision.devices[0]])
    for index, used in used_after(snapshot, decision).items():
        assert used <= totals[index], f"GPU {index} over-committed"


@PROPS
@given(st.data(), POLICIES)
def test_backfill_never_delays_the_head_of_the_queue(data: st.DataObject, policy: tuple[bool, bool]) -> None:
    snapshot = data.draw(snapshots(fair=policy[0], booked=policy[1]))
    request = data.draw(requests(snapshot.devices, fair=policy[0]))
    decision = S.decide(snapshot, request)
    if not decision.granted:
        return
    before = S.plan(snapshot)
    after = S.plan(grant(snapshot, request, decision, "new"))
    ahead = {r.lease_id for r in ahead_of(snapshot, request)}
    protected = [(b, a) for b, a in zip(before, after, strict=True) if b.lease_id in ahead]
    if protected:
        head_before, head_after = protected[0]
        assert head_after.start <= head_before.start, "the head of the queue was delayed"


@PROPS
@given(st.data(), POLICIES)
def test_a_grant_never_overlaps_a_slot_reserved_for_an_earlier_request_or_a_booking(
        data: st.DataObject, policy: tuple[bool, bool]) -> None:
    # Conservative backfill: the new lease fits beside the planned slots of every request it must not delay,
    # and beside every booking.
    snapshot = data.draw(snapshots(fair=policy[0], booked=policy[1]))
    request = data.draw(requests(snapshot.devices, fair=policy[0]))
    decision = S.decide(snapshot, request)
    if not decision.granted:
        return
    ahead = ahead_of(snapshot, request)
    slots = S.plan(replace(snapshot, queue=tuple(ahead)))
    end = snapshot.now + request.duration_s
    totals = {d.index: d.total_bytes for d in snapshot.devices}
    # Check every instant where the load can change inside the new lease's window.
    instants = {snapshot.now} | {s.start for s in slots if snapshot.now <= s.start < end} | {
        b.start for b in snapshot.bookings if snapshot.now <= b.start < end}
    for at in instants:
        used = {d.index: d.unmanaged_bytes for d in snapshot.devices}
        for booked in snapshot.bookings:
            if booked.start <= at < booked.end:
                for index in booked.devices:
                    used[index] += booked.memory_bytes
        for holding in snapshot.active:
            if holding.expires_at > at:
                for index in holding.devices:
                    used[index] += holding.memory_bytes
        for slot, queued in zip(slots, ahead, strict=True):
            if slot.start <= at < slot.start + queued.duration_s:
                for index in slot.devices:
                    used[index] += slot.memory_bytes
        for index in decision.devices or ():
            used[index] += decision.memory_bytes
        for index, value in used.items():
            assert value <= totals[index], f"GPU {index} over-committed at +{at - snapshot.now}s"


@st.composite
def same_shape_queues(draw: st.DrawFn, *, one_at_a_time: bool, fair: bool = False) -> tuple[S.Snapshot, list[str]]:
    devices = draw(machines())
    smallest = min(d.total_bytes - d.unmanaged_bytes for d in devices) // G
    if one_at_a_time:  # each request takes every GPU whole: only one can run at a time
        memory = MemorySpec(nbytes=smallest * G)
        gpus = len(devices)
        priorities = draw(st.lists(PRIORITY, min_size=2, max_size=8))
    else:
        memory = MemorySpec(nbytes=draw(st.integers(1, max(1, smallest))) * G)
        gpus = draw(st.integers(1, len(devices)))
        priorities = [draw(PRIORITY)] * draw(st.integers(2, 8))
    duration = float(draw(st.integers(1, 30)) * 10)
    queue = [S.Request(memory=memory, duration_s=duration, gpus=gpus, priority=p, seq=i + 1, lease_id=f"q{i + 1}",
                       share=draw(SHARES) if fair else 0.0)
             for i, p in enumerate(priorities)]
    busy = tuple(S.Holding(f"a{d.index}", (d.index,), d.total_bytes - d.unmanaged_bytes, NOW + 10 * (d.index + 1))
                 for d in devices)
    expected = [r.lease_id for r in sorted(queue, key=lambda r: (-r.priority.rank, r.share, r.seq))]
    return S.Snapshot(now=NOW, devices=devices, active=busy, queue=tuple(queue)), [str(x) for x in expected]


def simulate(snapshot: S.Snapshot, *, limit: int = 400) -> list[str]:
    """Run time forward: leases end at their time, each waiter re-checks (in arrival order) as waiters
    do; returns queued ids in the order they were granted. Asserts no over-commit on the way."""
    granted: list[str] = []
    totals = {d.index: d.total_bytes for d in snapshot.devices}
    for _ in range(limit):
        if not snapshot.queue:
            return granted
        progress = True
        while progress:
            progress = False
            for queued in sorted(snapshot.queue, key=lambda r: r.seq):
                decision = S.decide(snapshot, queued)
                if decision.granted:
                    assert queued.lease_id is not None
                    snapshot = grant(snapshot, queued, decision, queued.lease_id)
                    granted.append(queued.lease_id)
                    for index, used in used_after(snapshot, S.Decision(devices=None)).items():
                        assert used <= totals[index]
                    progress = True
                    break
        moments = [h.expires_at for h in snapshot.active] + [t for b in snapshot.bookings for t in (b.start, b.end)
                                                             if t > snapshot.now]
        if not moments:
            assert not snapshot.queue, f"{len(snapshot.queue)} request(s) stuck on an idle machine"
            return granted
        now = min(moments)
        snapshot = replace(snapshot, now=now, active=tuple(h for h in snapshot.active if h.expires_at > now),
                           bookings=tuple(b for b in snapshot.bookings if b.end > now))
    raise AssertionError("the simulation did not finish")


@PROPS
@given(same_shape_queues(one_at_a_time=False))
def test_first_come_first_served_within_a_class(case: tuple[S.Snapshot, list[str]]) -> None:
    snapshot, expected = case
    assert simulate(snapshot) == expected


@PROPS
@given(same_shape_queues(one_at_a_time=True))
def test_higher_class_first_then_first_come(case: tuple[S.Snapshot, list[str]]) -> None:
    snapshot, expected = case
    assert simulate(snapshot) == expected


@PROPS
@given(same_shape_queues(one_at_a_time=True, fair=True))
def test_fair_share_orders_within_a_class_and_never_across_one(case: tuple[S.Snapshot, list[str]]) -> None:
    # One request at a time fits: the grant order is exactly the class, then less recent use, then arrival.
    snapshot, expected = case
    assert simulate(snapshot) == expected


@PROPS
@given(st.data(), POLICIES)
def test_every_queued_request_is_eventually_granted(data: st.DataObject, policy: tuple[bool, bool]) -> None:
    snapshot = data.draw(snapshots(max_queue=8, fair=policy[0], booked=policy[1]))
    ids = {r.lease_id for r in snapshot.queue}
    assert set(simulate(snapshot)) == ids


@PROPS
@given(st.data())
def test_estimates_cover_the_queue_in_order_and_never_lie_about_now(data: st.DataObject) -> None:
    snapshot = data.draw(snapshots())
    est = S.estimates(snapshot)
    order = S.queue_order(snapshot)
    assert [est[str(r.lease_id)][0] for r in order] == list(range(1, len(order) + 1))
    for queued in order:
        start = est[str(queued.lease_id)][1]
        assert start is not None and start >= snapshot.now
        # A request the plan starts now and that has no one to protect is granted now.
        if start == snapshot.now and queued is order[0]:
            assert S.decide(snapshot, queued).granted


@PROPS
@given(st.data(), POLICIES)
def test_an_allowed_extension_never_delays_the_head_nor_runs_into_a_booking(data: st.DataObject,
                                                                         policy: tuple[bool, bool]) -> None:
    snapshot = data.draw(snapshots(fair=policy[0], booked=policy[1]))
    if not snapshot.active:
        return
    holding = data.draw(st.sampled_from(snapshot.active))
    new_end = holding.expires_at + data.draw(st.integers(1, 60)) * 10
    reason = S.extend_conflict(snapshot, holding.lease_id, new_end)
    if reason is not None:
        return
    extended = replace(snapshot, active=tuple(replace(h, expires_at=new_end) if h is holding else h
                                              for h in snapshot.active))
    for booked in snapshot.bookings:  # the extended lease and every booking fit together on each device
        for index in set(booked.devices) & set(holding.devices):
            if booked.start < new_end and booked.end > holding.expires_at:
                total = next(d.total_bytes - d.unmanaged_bytes for d in snapshot.devices if d.index == index)
                at = max(booked.start, holding.expires_at)
                load = sum(h.memory_bytes for h in extended.active if index in h.devices and h.expires_at > at)
                load += sum(b.memory_bytes for b in snapshot.bookings if index in b.devices and b.start <= at < b.end)
                assert load <= total, f"the extension runs into booking {booked.lease_id}"
    if not snapshot.queue:
        return
    assert S.plan(extended)[0].start <= S.plan(snapshot)[0].start


def test_an_extension_into_a_reserved_slot_is_refused() -> None:
    devices = (S.DeviceState(0, "GPU-0", 40 * G),)
    snapshot = S.Snapshot(now=NOW, devices=devices, active=(S.Holding("a", (0,), 30 * G, NOW + 100),),
                          queue=(S.Request(memory=MemorySpec(nbytes=20 * G), duration_s=50, seq=1, lease_id="q"),))
    assert S.extend_conflict(snapshot, "a", NOW + 101) is not None
    assert S.extend_conflict(snapshot, "a", NOW + 90) is None  # not later: nothing to check


@PROPS
@given(st.data(), st.sampled_from([0, 1, 2]))
def test_a_shallow_backfill_depth_keeps_every_guarantee(data: st.DataObject, depth: int) -> None:
    # With few requests checked exactly, more requests wait their turn; none is over-committed,
    # none overlaps an earlier request's slot, and all are still granted in the end.
    saved = S.BACKFILL_DEPTH
    S.BACKFILL_DEPTH = depth
    try:
        snapshot = data.draw(snapshots(max_queue=8))
        ids = {r.lease_id for r in snapshot.queue}
        assert set(simulate(snapshot)) == ids
        request = data.draw(requests(snapshot.devices))
        decision = S.decide(snapshot, request)
        if decision.granted and snapshot.queue:
            rank = request.priority.rank
            protected = [(b, a) for b, a, r in zip(S.plan(snapshot), S.plan(grant(snapshot, request, decision, "n")),
                                                    S.queue_order(snapshot), strict=True)
                         if r.priority.rank >= rank]
            if protected:
                assert protected[0][1].start <= protected[0][0].start
    finally:
        S.BACKFILL_DEPTH = saved


def _held(snapshot: S.Snapshot) -> tuple[tuple[int, int], ...]:
    held: dict[int, int] = {}
    for holding in snapshot.active:
        for index in holding.devices:
            held[index] = held.get(index, 0) + holding.memory_bytes
    return tuple(sorted(held.items()))


@PROPS
@given(st.data())
def test_kept_order_and_sums_decide_as_a_fresh_pass(data: st.DataObject) -> None:
    """The engine hands the same queue tuple and the per-device sums of the active leases from one write to
    the next; the planner's kept order, its shortcut past a queue none of which fits, and the sums must
    decide exactly as a fresh pass over copies of everything."""
    snapshot = data.draw(snapshots(max_queue=12, fair=data.draw(st.booleans())))
    request = data.draw(requests(snapshot.devices, seq=S.next_seq(snapshot), fair=True))
    fresh = replace(snapshot, queue=tuple(replace(r) for r in snapshot.queue))
    expected = S.decide(fresh, request)
    assert S.decide(snapshot, request) == expected
    assert S.decide(snapshot, request) == expected  # the kept order, this time
    assert S.decide(replace(snapshot, held=_held(snapshot)), request) == expected
    free = S._free_now(snapshot)
    ahead = S._ahead(snapshot, request)
    for horizon in (NOW + 10, NOW + 200, NOW + 700, NOW + 10_000):
        assert S._overlapping_prefix(snapshot, free, ahead, horizon) == \
            S._overlapping_prefix(snapshot, free, [replace(r) for r in ahead], horizon)
    for queued in snapshot.queue:
        assert S._ahead(snapshot, queued) == S._ahead(fresh, queued)
        assert S.decide(snapshot, queued) == S.decide(fresh, queued)


@PROPS
@given(st.data())
def test_a_booking_is_placed_as_over_every_booking_though_only_those_in_its_window_are_looked_at(
        data: st.DataObject) -> None:
    """With no queue, :func:`place_booking` plans only the bookings overlapping the new one's window, and
    all of them only where it does not fit: the slot is the one planned over everything."""
    snapshot = data.draw(snapshots(max_queue=data.draw(st.sampled_from([0, 0, 0, 3]))))
    bookings: list[S.Booked] = []
    for i in range(data.draw(st.integers(0, 12))):  # placed as the engine places them, densely
        want = data.draw(requests(snapshot.devices))
        want = replace(want, memory=MemorySpec(nbytes=want.memory.nbytes or G))
        start = NOW + data.draw(st.integers(0, 80)) * 10
        slot = S._place_booking_in_full(replace(snapshot, bookings=tuple(bookings)), want, start)
        if slot.start == start:
            bookings.append(S.Booked(f"b{i}", slot.devices, slot.memory_bytes, start, start + want.duration_s))
    snapshot = replace(snapshot, bookings=tuple(bookings))
    for _ in range(3):
        want = data.draw(requests(snapshot.devices))
        want = replace(want, memory=MemorySpec(nbytes=want.memory.nbytes or G))
        start = NOW + data.draw(st.integers(0, 100)) * 10
        assert S.place_booking(snapshot, want, start) == S._place_booking_in_full(snapshot, want, start)

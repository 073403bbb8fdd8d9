"""The scheduler as a pure function: placement, priorities, backfill, estimates, extension."""

from __future__ import annotations

import pytest

from chronos import scheduler as S
from chronos.devices.base import LINK_NUMA, LINK_NVLINK, LINK_PCIE_SWITCH, LINK_SAME
from chronos.errors import InvalidRequestError
from chronos.model import Priority
from chronos.units import MemorySpec

G = 1 << 30
NOW = 1_000_000.0


def dev(index: int, total_gib: int = 80, unmanaged_gib: float = 0) -> S.DeviceState:
    return S.DeviceState(index, f"GPU-{index}", total_gib * G, int(unmanaged_gib * G))


def hold(lease_id: str, devices: tuple[int, ...], gib: float, ends_in: float) -> S.Holding:
    return S.Holding(lease_id, devices, int(gib * G), NOW + ends_in)


def req(gib: float | None = None, duration: float = 3600, *, fraction: float | None = None, gpus: int = 1,
        devices: tuple[int, ...] | None = None, prefer: tuple[int, ...] = (), priority: str = "normal",
        seq: int = 0, lease_id: str | None = None, visible: tuple[int, ...] | None = None) -> S.Request:
    memory = MemorySpec(fraction=fraction) if fraction is not None else MemorySpec(nbytes=int((gib or 1) * G))
    return S.Request(memory=memory, duration_s=duration, gpus=gpus, devices=devices, prefer=prefer,
                     priority=Priority.parse(priority), seq=seq, lease_id=lease_id, visible=visible)


def snap(devices: int | list[S.DeviceState] = 2, active: list[S.Holding] | None = None,
         queue: list[S.Request] | None = None, distances: tuple[tuple[int, ...], ...] | None = None) -> S.Snapshot:
    devs = tuple(dev(i) for i in range(devices)) if isinstance(devices, int) else tuple(devices)
    return S.Snapshot(now=NOW, devices=devs, active=tuple(active or ()), queue=tuple(queue or ()),
                      distances=distances)


def eight_gpu_topology() -> tuple[tuple[int, ...], ...]:
    """NVLink pairs (0-1, 2-3, ...), a PCIe switch per four, NUMA between the halves."""
    def link(a: int, b: int) -> int:
        if a == b:
            return LINK_SAME
        if a // 2 == b // 2:
            return LINK_NVLINK
        if a // 4 == b // 4:
            return LINK_PCIE_SWITCH
        return LINK_NUMA
    return tuple(tuple(link(a, b) for b in range(8)) for a in range(8))


# -- fit and placement ----------------------------------------------------------------------------
def test_grants_when_it_fits_and_refuses_with_the_free_memory_when_not() -> None:
    s = snap(2, active=[hold("a", (0,), 70, 600), hold("b", (1,), 75, 600)])
    ok = S.decide(s, req(8))
    assert ok.granted and ok.devices == (0,) and ok.memory_bytes == 8 * G and ok.position == 0
    no = S.decide(s, req(20))
    assert not no.granted
    assert "not enough free memory for 20 GiB" in no.reason and "GPU 0: 10 GiB" in no.reason
    assert no.position == 1 and no.estimated_start is None


def test_least_loaded_device_is_chosen() -> None:
    s = snap(3, active=[hold("a", (0,), 40, 600), hold("b", (1,), 10, 600), hold("c", (2,), 30, 600)])
    assert S.decide(s, req(8)).devices == (1,)


def test_named_devices_are_all_or_none() -> None:
    s = snap(3, active=[hold("a", (1,), 78, 600)])
    assert S.decide(s, req(8, devices=(0, 2), gpus=2)).devices == (0, 2)
    refused = S.decide(s, req(8, devices=(0, 1), gpus=2))
    assert not refused.granted and "GPU 1" in refused.reason


def test_gang_is_all_or_none() -> None:
    s = snap(4, active=[hold("a", (0,), 78, 600), hold("b", (1,), 78, 600)])
    assert S.decide(s, req(10, gpus=2)).devices == (2, 3)
    refused = S.decide(s, req(10, gpus=3))
    assert not refused.granted and "on each of 3 GPUs" in refused.reason


def test_gang_prefers_devices_linked_by_nvlink_over_emptier_distant_ones() -> None:
    # 1 and 4 are the emptiest, but 4-5 share NVLink and 5 is nearly as empty.
    active = [hold("a", (0,), 30, 600), hold("b", (2,), 30, 600), hold("c", (3,), 30, 600),
              hold("d", (5,), 2, 600), hold("e", (6,), 30, 600), hold("f", (7,), 30, 600)]
    s = snap(8, active=active, distances=eight_gpu_topology())
    assert S.decide(s, req(10, gpus=2)).devices == (4, 5)
    four = S.decide(s, req(10, gpus=4))
    assert four.devices is not None and {d // 4 for d in four.devices} == {1}  # one PCIe switch
    # Without topology, the emptiest devices win.
    assert S.decide(snap(8, active=active), req(10, gpus=2)).devices == (1, 4)


def test_prefer_is_honoured_when_it_fits_and_ignored_otherwise() -> None:
    s = snap(3, active=[hold("a", (2,), 50, 600)])
    assert S.decide(s, req(8, prefer=(2,))).devices == (2,)
    assert S.decide(s, req(40, prefer=(2,))).devices in {(0,), (1,)}
    assert S.decide(s, req(8, gpus=2, prefer=(2, 1))).devices == (1, 2)


def test_visible_devices_restrict_the_candidates() -> None:
    s = snap(3, active=[hold("a", (2,), 60, 600)])
    assert S.decide(s, req(8, visible=(2,))).devices == (2,)
    assert not S.decide(s, req(30, visible=(2,))).granted
    with pytest.raises(InvalidRequestError, match="not visible here"):
        S.decide(s, req(8, devices=(0,), visible=(2,)))
    with pytest.raises(InvalidRequestError, match="2 GPUs asked for"):
        S.decide(s, req(8, gpus=2, visible=(2,)))


def test_fraction_resolves_per_device_and_stays_uniform_in_a_gang() -> None:
    s = snap([dev(0, 80), dev(1, 40)])
    one = S.decide(s, req(fraction=0.5, devices=(1,)))
    assert one.memory_bytes == 20 * G
    gang = S.decide(s, req(fraction=0.5, gpus=2))
    assert gang.devices == (0, 1) and gang.memory_bytes == 20 * G


def test_requests_that_can_never_fit_are_bad_input() -> None:
    s = snap(2)
    with pytest.raises(InvalidRequestError, match="can never fit on any GPU here"):
        S.decide(s, req(100))
    with pytest.raises(InvalidRequestError, match="unknown GPU 5"):
        S.decide(s, req(1, devices=(5,)))
    with pytest.raises(InvalidRequestError, match="listed twice"):
        S.decide(s, req(1, devices=(0, 0), gpus=2))
    with pytest.raises(InvalidRequestError, match="unknown priority"):
        S.decide(s, req(1, priority="urgent"))
    with pytest.raises(InvalidRequestError, match="3 GPUs asked for"):
        S.decide(s, req(1, gpus=3))


def test_unmanaged_memory_counts_against_the_device() -> None:
    s = snap([dev(0, 80, unmanaged_gib=75)])
    assert not S.decide(s, req(8)).granted
    assert S.decide(s, req(4)).granted


# -- priorities and the queue ------------------------------------------------------------------------
def test_queue_order_is_class_then_first_come() -> None:
    queue = [req(1, priority="low", seq=1, lease_id="1"), req(1, seq=2, lease_id="2"),
             req(1, priority="high", seq=3, lease_id="3"), req(1, seq=4, lease_id="4"),
             req(1, priority="high", seq=5, lease_id="5")]
    assert [r.lease_id for r in S.queue_order(snap(1, queue=queue))] == ["3", "5", "2", "4", "1"]


def test_a_new_request_waits_behind_an_earlier_one_it_would_delay() -> None:
    # GPU 0 frees 40 GiB in 10 minutes; the queued 60 GiB request takes it then. A new 30 GiB
    # request for an hour fits now but would still hold the memory then.
    s = snap(1, active=[hold("a", (0,), 40, 600), hold("b", (0,), 10, 7200)],
             queue=[req(60, seq=1, lease_id="q1")])
    late = S.decide(s, req(25, 3600))
    assert not late.granted and "would delay" in late.reason and late.position == 2
    # Backfill: one that ends before the queued request can start runs at once.
    quick = S.decide(s, req(25, 300))
    assert quick.granted
    # A higher class is not held back by a lower one.
    assert S.decide(s, req(25, 3600, priority="high")).granted


def test_conservative_backfill_protects_every_earlier_request_not_only_the_head() -> None:
    # Two GPUs. The head waits for GPU 0 (frees in 10 min); the second waits for GPU 1 (frees in 20 min).
    active = [hold("a", (0,), 70, 600), hold("b", (1,), 70, 1200)]
    queue = [req(60, devices=(0,), seq=1, lease_id="q1"), req(75, devices=(1,), seq=2, lease_id="q2")]
    s = snap(2, active=active, queue=queue)
    # 8 GiB for 30 min on GPU 1 would delay the second (not the head): refused.
    assert not S.decide(s, req(8, 1800, devices=(1,))).granted
    # For 15 min it ends before either could start: granted.
    assert S.decide(s, req(8, 900, devices=(1,))).granted


def test_a_queued_request_is_granted_in_its_turn() -> None:
    queue = [req(60, seq=1, lease_id="q1"), req(60, seq=2, lease_id="q2")]
    s = snap(1, active=[hold("a", (0,), 40, 600)], queue=queue)
    assert S.decide(s, queue[0]).position == 1
    assert not S.decide(s, queue[0]).granted  # does not fit yet
    freed = snap(1, queue=queue)
    assert S.decide(freed, queue[0]).granted
    second = S.decide(freed, queue[1])
    assert not second.granted and second.position == 2  # fits, but the first goes first


def test_estimates_follow_known_end_times() -> None:
    active = [hold("a", (0,), 50, 600), hold("b", (0,), 20, 1800), hold("c", (1,), 70, 3600)]
    queue = [req(40, 1200, seq=1, lease_id="q1"), req(60, 600, seq=2, lease_id="q2"),
             req(5, 60, seq=3, lease_id="q3", priority="high")]
    s = snap(2, active=active, queue=queue)
    est = S.estimates(s)
    assert est["q3"] == (1, NOW)  # fits now: its waiter takes it at its next check
    assert est["q1"] == (2, NOW + 600)  # on GPU 0 once "a" ends
    # q2 needs 60 GiB: GPU 1 frees at 3600, GPU 0 only after q1 ends (600 + 1200) and "b" (1800).
    assert est["q2"] == (3, NOW + 1800)
    slots = {slot.lease_id: slot for slot in S.plan(s)}
    assert slots["q1"].devices == (0,) and slots["q2"].devices == (0,)


def test_decide_can_estimate_the_start() -> None:
    s = snap(1, active=[hold("a", (0,), 50, 600)])
    decision = S.decide(s, req(40), estimate=True)
    assert not decision.granted and decision.estimated_start == NOW + 600
    assert S.forecast(s, req(40)).start == NOW + 600


def test_a_request_blocked_by_unmanaged_memory_has_no_estimate_and_does_not_block_others() -> None:
    s = snap([dev(0, 80, unmanaged_gib=50), dev(1, 80)], active=[hold("a", (1,), 70, 600)],
             queue=[req(40, devices=(0,), seq=1, lease_id="q1")])
    assert S.estimates(s)["q1"] == (1, None)
    assert S.decide(s, req(20, 7200, devices=(0,))).granted


def test_a_waiter_is_not_backfilled_past_the_depth_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many small earlier requests that could all start before this one ends: it waits its turn.
    queue = [req(35, 600, seq=i, lease_id=f"q{i}") for i in range(1, 6)]
    s = snap(1, active=[hold("a", (0,), 60, 60)], queue=queue)
    monkeypatch.setattr(S, "BACKFILL_DEPTH", 2)
    refused = S.decide(s, req(15, 3600))
    assert not refused.granted and "waits its turn" in refused.reason
    monkeypatch.setattr(S, "BACKFILL_DEPTH", 64)
    exact = S.decide(s, req(15, 3600))
    assert not exact.granted and "would delay" in exact.reason  # q1 and q2 take 70 GiB at 60 s
    assert S.decide(s, req(5, 3600)).granted  # 70 + 5 still fits beside them
    monkeypatch.setattr(S, "BACKFILL_DEPTH", 2)
    assert S.decide(s, req(15, 30)).granted  # ends before any of them can start: nothing to plan


# -- extension ---------------------------------------------------------------------------------------
def test_extend_conflict_when_it_would_delay_a_queued_request() -> None:
    s = snap(1, active=[hold("a", (0,), 50, 600), hold("b", (0,), 10, 600)],
             queue=[req(60, seq=1, lease_id="q1")])
    reason = S.extend_conflict(s, "a", NOW + 1200)
    assert reason is not None and "delay queued request q1 (position 1)" in reason and "in 10m" in reason
    # "b" may be extended: its 10 GiB is not needed for q1 (80 - 60 >= 10).
    assert S.extend_conflict(s, "b", NOW + 7200) is None
    assert S.extend_conflict(snap(1, active=[hold("a", (0,), 50, 600)]), "a", NOW + 9000) is None


def test_fraction_gang_on_unequal_gpus_takes_the_smallest_share() -> None:
    gib = 1 << 30
    devices = (S.DeviceState(0, "GPU-a", 80 * gib), S.DeviceState(1, "GPU-b", 40 * gib))
    # GPU 0 has 30 GiB free: half of GPU 1 (20 GiB) fits on both, half of GPU 0 (40 GiB) would not.
    busy = S.Snapshot(now=0.0, devices=devices, active=(S.Holding("1", (0,), 50 * gib, 3600.0),))
    decision = S.decide(busy, S.Request(memory=MemorySpec(fraction=0.5), duration_s=60, gpus=2))
    assert decision.devices == (0, 1)
    assert decision.memory_bytes == 20 * gib

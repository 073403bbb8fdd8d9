"""``model.evolve``: the copy every lease operation makes equals what ``dataclasses.replace`` makes."""

from __future__ import annotations

import dataclasses

import pytest

from chronos import scheduler
from chronos.model import IdleNotice, LeaseRecord, LeaseState, OnIdle, evolve
from chronos.units import MemorySpec


def _record() -> LeaseRecord:
    return LeaseRecord(id="7", owner="ann", uid=1000, devices=(0, 1), device_uuids=("GPU-a", "GPU-b"),
                       memory_bytes=1 << 30, created_at=10.0, expires_at=20.0, duration_s=10.0, pid=42,
                       pid_start=3.5, idle_warning=IdleNotice(12.0, OnIdle.RELEASE, 15.0))


def test_evolve_equals_replace() -> None:
    record = _record()
    changes = {"state": LeaseState.RELEASED, "ended_at": 12.5, "end_reason": "released by ann"}
    made = evolve(record, **changes)
    assert made == dataclasses.replace(record, **changes)
    assert hash(made) == hash(dataclasses.replace(record, **changes))
    assert record.state == LeaseState.ACTIVE and record.ended_at is None  # the original is untouched
    assert type(made) is LeaseRecord


def test_evolve_keeps_records_frozen() -> None:
    made = evolve(_record(), id="8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.id = "9"  # type: ignore[misc]


def test_evolve_refuses_an_unknown_field() -> None:
    with pytest.raises(TypeError, match="no field 'colour'"):
        evolve(_record(), colour="red")


def test_evolve_on_a_scheduler_request() -> None:
    request = scheduler.Request(memory=MemorySpec(nbytes=1 << 30), duration_s=60.0)
    assert evolve(request, seq=5, share=0.25) == dataclasses.replace(request, seq=5, share=0.25)

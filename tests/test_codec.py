"""The protocol's codec: records to JSON data and back, the special floats and enums included."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from chronos import scheduler
from chronos.model import IdleNotice, LeaseRecord, LeaseState, OnIdle, Priority
from chronos.service import codec
from chronos.units import MemorySpec


def _record(**changes: object) -> LeaseRecord:
    fields: dict[str, object] = dict(
        id="3", owner="ann", uid=1000, devices=(0, 2), device_uuids=("GPU-a", "GPU-c"), memory_bytes=1 << 30,
        created_at=100.25, expires_at=700.25, duration_s=600.0, priority=Priority.HIGH, state=LeaseState.ACTIVE,
        pid=4242, pid_start=99.5, idle_warning=IdleNotice(150.0, OnIdle.RELEASE, None))
    fields.update(changes)
    return LeaseRecord(**fields)  # type: ignore[arg-type]


def test_a_record_is_plain_json_data() -> None:
    data = codec.encode(_record())
    assert data["devices"] == [0, 2] and data["device_uuids"] == ["GPU-a", "GPU-c"]
    assert data["priority"] == "high" and data["state"] == "active"
    assert data["created_at"] == 100.25 and data["duration_s"] == 600.0 and data["label"] is None
    assert data["idle_warning"] == {"at": 150.0, "action": "release", "action_at": None}
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_a_record_comes_back_as_it_was() -> None:
    record = _record()
    assert codec.decode(LeaseRecord, json.loads(json.dumps(codec.encode(record)))) == record


def test_infinite_and_missing_floats() -> None:
    data = codec.encode(_record(expires_at=math.inf, pid_start=-math.inf, gpu_seconds=math.nan))
    assert (data["expires_at"], data["pid_start"], data["gpu_seconds"]) == ("inf", "-inf", None)
    back = codec.decode(LeaseRecord, data)
    assert back.expires_at == math.inf and back.pid_start == -math.inf and back.gpu_seconds is None
    request = scheduler.Request(memory=MemorySpec(fraction=0.5), duration_s=math.inf)
    assert codec.encode(request)["duration_s"] == "inf"
    assert codec.decode(scheduler.Request, codec.encode(request)) == request


@pytest.mark.parametrize(("field", "value", "message"), [
    ("uid", "1000", "expected int, got str"),
    ("uid", True, "expected int, got bool"),
    ("created_at", "soon", "expected float, got str"),
    ("pid", 1.5, "fits none of"),
    ("label", 7, "fits none of"),
    ("state", "lost", "is not a LeaseState"),
])
def test_a_value_of_the_wrong_type_is_refused(field: str, value: object, message: str) -> None:
    data = codec.encode(_record())
    data[field] = value
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(LeaseRecord, data)


def test_whole_numbers_read_as_floats() -> None:
    data = codec.encode(_record())
    data["duration_s"] = 600
    value = codec.decode(LeaseRecord, data).duration_s
    assert value == 600.0 and type(value) is float


@dataclasses.dataclass(frozen=True)
class _Checked:
    low: int
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise TypeError("low above high")


def test_a_record_with_its_own_checks_is_made_through_them() -> None:
    assert codec.decode(_Checked, {"low": 1, "high": 2}) == _Checked(1, 2)
    with pytest.raises(codec.CodecError, match="low above high"):
        codec.decode(_Checked, {"low": 5, "high": 2})


def test_a_record_given_every_field_equals_the_one_its_init_makes() -> None:
    record = _record(label="train", end_action=None)
    back = codec.decode(LeaseRecord, codec.encode(record))
    assert back == record and hash(back) == hash(record) and type(back) is LeaseRecord
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.label = "other"  # type: ignore[misc]
    partial = codec.encode(record)
    del partial["label"]  # a field left out takes its default, through __init__
    assert codec.decode(LeaseRecord, partial).label is None
    del partial["owner"]
    with pytest.raises(codec.CodecError, match="incomplete LeaseRecord"):
        codec.decode(LeaseRecord, partial)


@dataclasses.dataclass(init=False)
class _Converted:
    count: int

    def __init__(self, count: int) -> None:
        self.count = count * 2


def test_a_record_with_an_init_of_its_own_is_made_through_it() -> None:
    assert codec.decode(_Converted, {"count": 2}).count == 4

"""What a lease request says, read once: memory, duration, devices, gpus, prefer, priority, wait.

The CLI, the magics, kernelspecs, the provisioner, ``chronos run`` and the Python API all read
requests here, so ``--wait forever``, ``wait="5m"`` or ``--gpu 0,1`` mean the same everywhere.
Values arrive as the user typed them (strings) or as Python values; each mistake is one
:class:`~chronos.errors.InvalidRequestError` line that says what to write instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from chronos.errors import InvalidRequestError, LeaseNotFoundError
from chronos.model import OnIdle, Priority
from chronos.units import MemorySpec, parse_duration, parse_memory

__all__ = [
    "FOREVER",
    "MAX_LABEL",
    "RequestSpec",
    "parse_devices",
    "parse_gpus",
    "parse_lease_id",
    "parse_request",
    "parse_wait",
    "partition_id",
]

#: ``wait`` with no limit.
FOREVER = math.inf
MAX_LABEL = 200
_WAIT_YES = ("true", "yes", "forever")
_WAIT_NO = ("", "false", "no")

MemoryValue = str | int | float | MemorySpec
DurationValue = str | int | float
DevicesValue = int | str | Sequence[int]
WaitValue = bool | int | float | str | None


@dataclass(frozen=True)
class RequestSpec:
    """A request as read: ``duration_s`` None means the configured default, ``wait_s`` None no waiting."""

    memory: MemorySpec
    duration_s: float | None = None
    devices: tuple[int, ...] | None = None
    gpus: int | None = None
    prefer: tuple[int, ...] = ()
    priority: Priority | None = None
    wait_s: float | None = None
    label: str | None = None
    #: The request's own idle rule (a kernelspec's): it can only add to the configured one, never lift it.
    idle_after_s: float | None = None
    on_idle: OnIdle | None = None

    @property
    def count(self) -> int:
        """How many devices the request asks for."""
        return len(self.devices) if self.devices is not None else (self.gpus or 1)


def parse_devices(value: DevicesValue | None, option: str = "--gpu") -> tuple[int, ...] | None:
    """``0``, ``"0,1"`` or ``[0, 1]`` as indices; None when nothing was named. ``option`` names the
    setting in messages."""
    if value is None:
        return None
    hint = f"give an index such as {option} 0 or a list such as {option} 0,1"
    if isinstance(value, bool):
        raise InvalidRequestError(f"invalid {option} {value!r}: {hint}")
    if isinstance(value, int):
        items: list[object] = [value]
    elif isinstance(value, str):
        items = [part for part in value.replace(" ", "").split(",")]
    else:
        items = list(value)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.isdigit())):
            if isinstance(item, str) and item.lstrip("-").isdigit():
                raise InvalidRequestError(f"invalid {option} {item}: GPU indices start at 0")
            raise InvalidRequestError(f"invalid {option} {item!r}: {hint}")
        index = int(item)
        if index < 0:
            raise InvalidRequestError(f"invalid {option} {index}: GPU indices start at 0")
        out.append(index)
    if not out:
        raise InvalidRequestError(f"no GPU named in {option}: {hint}")
    return tuple(out)


_PARTITION = "partition_"


def parse_lease_id(lease_id: str | int) -> str:
    """A lease id as the ledger keys it: ``7``, ``"7"``, ``"L7"``, or the original Chronos's
    ``partition_0007``; anything else is no such lease."""
    text = str(lease_id).strip()
    if text.lower().startswith(_PARTITION):
        text = text[len(_PARTITION):]
    elif text[:1] in ("L", "l"):
        text = text[1:]
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise LeaseNotFoundError(f"no lease {lease_id!r}: lease ids are numbers, see `chronos list`")
    return str(int(text))


def partition_id(lease_id: str) -> str:
    """A lease id in the original Chronos's form, ``partition_0007`` (read back by :func:`parse_lease_id`)."""
    return f"{_PARTITION}{int(lease_id):04d}"


def parse_gpus(value: int | str | None) -> int | None:
    """How many devices at once (``--gpus N``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"invalid --gpus {value!r}: give a whole number of GPUs, 1 or more")
    return value


def parse_wait(value: WaitValue) -> float | None:
    """How long to wait in the queue: None (fail at once), seconds, or :data:`FOREVER`.

    ``True``, ``"forever"``, ``"yes"`` wait with no limit; ``False``, ``None``, ``"no"`` do not
    wait; ``"10m"`` or ``600`` wait at most that long.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, float) and value == FOREVER):
        return FOREVER
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _WAIT_YES:
            return FOREVER
        if text in _WAIT_NO:
            return None
    try:
        return parse_duration(value)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"cannot read duration {value!r} for --wait: give a timeout such as --wait 10m, or --wait forever"
        ) from None


def parse_request(
    memory: MemoryValue,
    duration: DurationValue | None = None,
    *,
    device: DevicesValue | None = None,
    gpus: int | str | None = None,
    prefer: DevicesValue | None = None,
    priority: Priority | str | None = None,
    wait: WaitValue = None,
    label: str | None = None,
    idle_after: DurationValue | None = None,
    on_idle: OnIdle | str | None = None,
) -> RequestSpec:
    """Every part of a request checked for form (not against this machine's GPUs)."""
    devices = parse_devices(device)
    count = parse_gpus(gpus)
    if count is not None and devices is not None and len(devices) != count:
        raise InvalidRequestError(
            f"--gpus {count} and --gpu {','.join(map(str, devices))} disagree: give one of them"
        )
    if label is not None and len(label) > MAX_LABEL:
        raise InvalidRequestError(f"label is too long: keep it under {MAX_LABEL} characters")
    return RequestSpec(
        memory=parse_memory(memory),
        duration_s=parse_duration(duration) if duration is not None else None,
        devices=devices,
        gpus=count,
        prefer=parse_devices(prefer, "--prefer") or (),
        priority=Priority.parse(priority, "priority") if priority is not None else None,
        wait_s=parse_wait(wait),
        label=label,
        idle_after_s=parse_duration(idle_after) if idle_after not in (None, "") else None,
        on_idle=OnIdle.parse(on_idle, "idle action") if on_idle not in (None, "") else None,
    )

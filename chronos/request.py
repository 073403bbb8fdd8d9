"""What a lease request says, read once: memory, duration, devices, gpus, prefer, priority, wait.

The CLI, the magics, kernelspecs, the provisioner, ``chronos run`` and the Python API all read
requests here, so ``--wait forever``, ``wait="5m"`` or ``--gpu 0,1`` mean the same everywhere.
Values arrive as the user typed them (strings) or as Python values; each mistake is one
:class:`~chronos.errors.InvalidRequestError` line that says what to write instead.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from chronos.errors import InvalidRequestError, LeaseNotFoundError
from chronos.model import OnIdle, Priority
from chronos.units import DURATION_CEILING_S, SHORTEST_LEASE_S, MemorySpec, parse_duration, parse_memory

__all__ = [
    "FOREVER",
    "MAX_LABEL",
    "RequestSpec",
    "lease_duration",
    "parse_devices",
    "parse_gpus",
    "parse_label",
    "parse_lease_id",
    "parse_request",
    "parse_wait",
    "partition_id",
    "swapped_extend",
]

#: ``wait`` with no limit.
FOREVER = math.inf
MAX_LABEL = 200
_WAIT_YES = ("true", "yes", "forever")
_WAIT_NO = ("", "false", "no")
#: Character classes a label may not hold: controls, format marks (bidi overrides), line separators.
_NOT_IN_LABEL = ("Cc", "Cf", "Zl", "Zp", "Cs")

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
    if len(items) > 1024:
        raise InvalidRequestError(f"invalid {option}: {len(items)} GPUs named; {hint}")
    for item in items:
        if isinstance(item, str) and len(item) > 6 and item.isascii() and item.isdigit():
            raise InvalidRequestError(f"invalid {option} {item[:12]}...: no GPU has such an index; {hint}")
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.isascii()
                                                                     and item.isdigit())):
            if isinstance(item, str) and item.lstrip("-").isdigit():
                raise InvalidRequestError(f"invalid {option} {item}: GPU indices start at 0")
            raise InvalidRequestError(f"invalid {option} {_short(item)}: {hint}")
        index = int(item)
        if index < 0:
            raise InvalidRequestError(f"invalid {option} {index}: GPU indices start at 0")
        out.append(index)
    if not out:
        raise InvalidRequestError(f"no GPU named in {option}: {hint}")
    return tuple(out)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "...'"


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
        raise LeaseNotFoundError(f"no lease {_short(lease_id)}: lease ids are numbers, see `chronos list`")
    return str(int(text))


def partition_id(lease_id: str) -> str:
    """A lease id in the original Chronos's form, ``partition_0007`` (read back by :func:`parse_lease_id`)."""
    return f"{_PARTITION}{int(lease_id):04d}"


def parse_gpus(value: int | str | None) -> int | None:
    """How many devices at once (``--gpus N``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip()) if len(value.strip()) <= 6 else 10**6
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"invalid --gpus {_short(value)}: give a whole number of GPUs, 1 or more")
    return value


def parse_label(value: object) -> str | None:
    """A lease's label: plain text of one line, at most :data:`MAX_LABEL` characters (None: no label).

    A label is shown to every user of the machine, so a control character, a newline or a bidi
    override (which could forge or hide rows of ``chronos list``) is refused here; renderers escape
    whatever an older ledger holds (:func:`chronos.text.plain`).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"invalid label {_short(value)}: give text such as --label training")
    if len(value) > MAX_LABEL:
        raise InvalidRequestError(f"label is too long ({len(value)} characters): keep it to {MAX_LABEL}")
    for position, char in enumerate(value):
        if unicodedata.category(char) in _NOT_IN_LABEL:
            raise InvalidRequestError(f"label has a control character (U+{ord(char):04X} at position {position + 1}): "
                                      "a label is one line of plain text")
    return value or None


def parse_wait(value: WaitValue) -> float | None:
    """How long to wait in the queue: None (fail at once), seconds, or :data:`FOREVER`.

    ``True``, ``"forever"``, ``"yes"`` wait with no limit; ``False``, ``None``, ``"no"`` do not
    wait; ``"10m"`` or ``600`` wait at most that long.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, float) and value == FOREVER):
        return FOREVER
    if isinstance(value, float) and math.isnan(value):
        raise InvalidRequestError("cannot read nan for --wait: give a timeout such as --wait 10m, or --wait forever")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _WAIT_YES:
            return FOREVER
        if text in _WAIT_NO:
            return None
    if not isinstance(value, (str, int, float)):
        raise InvalidRequestError(f"invalid --wait {_short(value)}: give a timeout such as --wait 10m, "
                                  "or --wait forever")
    try:
        return parse_duration(value, what="--wait")
    except InvalidRequestError as exc:
        if "too long" in str(exc):
            raise InvalidRequestError(f"--wait {_short(value)} is longer than Chronos waits: give --wait forever "
                                      "to wait with no limit") from None
        raise InvalidRequestError(
            f"cannot read duration {_short(value)} for --wait: give a timeout such as --wait 10m, or --wait forever"
        ) from None


def lease_duration(value: DurationValue, longest: float = DURATION_CEILING_S) -> float:
    """A lease's length (or an extension's): at least a second, at most ``longest`` (the configuration's
    ``longest_duration``)."""
    return parse_duration(value, shortest=SHORTEST_LEASE_S, longest=longest)


def swapped_extend(lease_id: object, duration: object) -> tuple[str, str] | None:
    """For ``extend 1h 7`` (a duration where the id goes, an id where the duration goes), the two in their
    right order, ``("7", "1h")``; None when the order may be right."""
    first, second = str(lease_id).strip(), str(duration).strip()
    if first.isdigit():
        return None
    try:
        parse_duration(first)
        parse_lease_id(second)
    except (InvalidRequestError, LeaseNotFoundError):
        return None
    return second, first


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
    longest: float = DURATION_CEILING_S,
) -> RequestSpec:
    """Every part of a request checked for form (not against this machine's GPUs). ``longest`` is the
    longest lease the configuration allows (an engine passes its ``longest_duration``)."""
    devices = parse_devices(device)
    count = parse_gpus(gpus)
    if count is not None and devices is not None and len(devices) != count:
        raise InvalidRequestError(
            f"--gpus {count} and --gpu {','.join(map(str, devices))} disagree: give one of them"
        )
    return RequestSpec(
        memory=parse_memory(memory),
        duration_s=lease_duration(duration, longest) if duration is not None else None,
        devices=devices,
        gpus=count,
        prefer=parse_devices(prefer, "--prefer") or (),
        priority=Priority.parse(priority, "priority") if priority is not None else None,
        wait_s=parse_wait(wait),
        label=parse_label(label),
        idle_after_s=parse_duration(idle_after) if idle_after not in (None, "") else None,
        on_idle=OnIdle.parse(on_idle, "idle action") if on_idle not in (None, "") else None,
    )

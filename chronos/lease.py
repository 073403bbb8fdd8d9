"""The lease handle: a :class:`~chronos.model.LeaseRecord` plus the engine it came from.

A handle is always given its engine, so ``lease.release()`` acts on the ledger the lease lives in,
never on whatever the environment happens to name. The engine is only described here by the
calls a handle makes (:class:`LeaseOps`), so this module imports nothing above the model.
Copies share the engine; a pickled handle carries its engine's description and finds it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar, overload

from chronos.model import Action, IdleNotice, LeaseRecord, LeaseState, Priority

__all__ = ["Lease", "LeaseOps"]

T = TypeVar("T")


class LeaseOps(Protocol):
    """What a handle asks of its engine (the local engine and the service's client both answer)."""

    def get(self, lease_id: str) -> Lease: ...

    def release(self, lease_id: str) -> Lease: ...

    def extend(self, lease_id: str, duration: str | int | float) -> Lease: ...

    def bind(self, lease_id: str, pid: int | None) -> Lease: ...

    def lease_env(self, record: LeaseRecord, base: Mapping[str, str] | None = None) -> dict[str, str]: ...

    def apply_caps(self, record: LeaseRecord) -> list[str]: ...

    def lease_usage(self, record: LeaseRecord) -> dict[int, int | None]: ...

    def activate(self, lease: Lease, **options: Any) -> AbstractContextManager[Any]: ...


class _Field(Generic[T]):
    """A read-only view of one record field on the handle."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Field[T]: ...

    @overload
    def __get__(self, obj: Lease, owner: type) -> T: ...

    def __get__(self, obj: Lease | None, owner: type) -> T | _Field[T]:
        if obj is None:
            return self
        value: T = getattr(obj.record, self.name)
        return value


class Lease:
    """A time-limited, memory-capped grant of one or more GPUs, and the calls that act on it.

    Its fields are those of :class:`~chronos.model.LeaseRecord` (``id``, ``devices``,
    ``memory_bytes`` per device, ``expires_at``...). A lease is a context manager: leaving the
    block releases it.
    """

    __slots__ = ("_engine", "record")

    id = _Field[str]()
    owner = _Field[str]()
    uid = _Field[int]()
    devices = _Field[tuple[int, ...]]()
    device_uuids = _Field[tuple[str, ...]]()
    memory_bytes = _Field[int]()
    created_at = _Field[float]()
    expires_at = _Field["float | None"]()
    duration_s = _Field[float]()
    priority = _Field[Priority]()
    state = _Field[LeaseState]()
    label = _Field["str | None"]()
    pid = _Field["int | None"]()
    pid_start = _Field["float | None"]()
    started_at = _Field["float | None"]()
    ended_at = _Field["float | None"]()
    end_reason = _Field["str | None"]()
    peak_memory_bytes = _Field["int | None"]()
    gpu_seconds = _Field["float | None"]()
    starts_at = _Field["float | None"]()
    idle_since = _Field["float | None"]()
    idle_warning = _Field[IdleNotice | None]()
    end_action = _Field[Action | None]()

    def __init__(self, record: LeaseRecord, engine: LeaseOps) -> None:
        self.record = record
        self._engine = engine

    @property
    def engine(self) -> LeaseOps:
        """The engine this lease lives in."""
        return self._engine

    # -- derived -------------------------------------------------------------------------
    @property
    def remaining(self) -> float:
        """Seconds left before expiry (0 once ended; the full duration while queued)."""
        return self.record.remaining

    @property
    def active(self) -> bool:
        return self.record.active

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form used by ``--json``."""
        return self.record.to_dict()

    # -- actions -------------------------------------------------------------------------
    def _adopt(self, other: Lease) -> Lease:
        self.record = other.record
        return self

    def refresh(self) -> Lease:
        """Re-read this lease from its ledger."""
        return self._adopt(self._engine.get(self.id))

    def release(self) -> None:
        """End the lease now; releasing an already ended lease is a no-op."""
        self._adopt(self._engine.release(self.id))

    def extend(self, duration: str | int | float) -> Lease:
        """Push the end back by ``duration`` (``30m``, ``1h`` or seconds)."""
        return self._adopt(self._engine.extend(self.id, duration))

    def bind(self, pid: int | None) -> Lease:
        """Make ``pid`` the holder (the lease ends when it dies); None unbinds."""
        return self._adopt(self._engine.bind(self.id, pid))

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process that should run inside this lease's caps."""
        return self._engine.lease_env(self.record, base)

    def apply_caps(self) -> list[str]:
        """Cap frameworks already imported in this process; returns what was capped."""
        return self._engine.apply_caps(self.record)

    def usage(self) -> dict[int, int | None]:
        """GPU memory the lease's processes use now, per device (None where the driver hides it).

        The same figure the watchdog enforces and admission counts (:mod:`chronos.accounting`).
        """
        return self._engine.lease_usage(self.record)

    def activate(self, **options: Any) -> AbstractContextManager[Any]:
        """Make the lease true in this process (environment, caps, watchdog) until the block ends.

        ``with lease.activate(): ...`` in a script; see :mod:`chronos.enforce.activation`.
        """
        return self._engine.activate(self, **options)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state in (LeaseState.ACTIVE, LeaseState.QUEUED):
            self.release()

    # -- plain-data behaviour --------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lease):
            return self.record == other.record
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.record)

    def __repr__(self) -> str:
        return f"Lease({self.record!r})"

    def __copy__(self) -> Lease:
        return Lease(self.record, self._engine)

    def __deepcopy__(self, memo: dict[int, Any]) -> Lease:
        return Lease(self.record, self._engine)  # the record is immutable; the engine is shared

    def __reduce__(self) -> tuple[Any, ...]:
        return (Lease, (self.record, self._engine))

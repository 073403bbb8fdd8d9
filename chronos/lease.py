"""The lease: plain data about one grant, plus the calls that act on it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chronos.engine import Engine

__all__ = ["ACTIVE", "ENDED_STATES", "EXPIRED", "QUEUED", "RELEASED", "REVOKED", "WITHDRAWN", "Lease"]

QUEUED = "queued"
ACTIVE = "active"
RELEASED = "released"  # ended by release() or its holder's clean exit
EXPIRED = "expired"  # reached expires_at
REVOKED = "revoked"  # its holder process died
WITHDRAWN = "withdrawn"  # a queued request given up (Ctrl-C, timeout, waiter died)
ENDED_STATES = (RELEASED, EXPIRED, REVOKED, WITHDRAWN)


@dataclass
class Lease:
    """A time-limited, memory-capped grant of one or more GPUs.

    ``memory_bytes`` is per device. ``expires_at`` is None while the request is queued.
    A lease is a context manager: leaving the block releases it.
    """

    id: str
    owner: str
    uid: int
    devices: tuple[int, ...]
    device_uuids: tuple[str, ...]
    memory_bytes: int
    created_at: float
    expires_at: float | None
    duration_s: float
    priority: str = "normal"
    state: str = ACTIVE
    label: str | None = None
    pid: int | None = None
    pid_start: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    peak_memory_bytes: int | None = None
    gpu_seconds: float | None = None
    _engine: Engine | None = field(default=None, repr=False, compare=False)

    # -- derived -------------------------------------------------------------------------
    @property
    def remaining(self) -> float:
        """Seconds left before expiry (0 once ended; the full duration while queued)."""
        if self.state == QUEUED or self.expires_at is None:
            return self.duration_s
        if self.state != ACTIVE:
            return 0.0
        return max(0.0, self.expires_at - time.time())

    @property
    def active(self) -> bool:
        return self.state == ACTIVE and self.remaining > 0

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form used by ``--json``."""
        data = asdict(replace(self, _engine=None))
        del data["_engine"]
        del data["pid_start"]
        data["devices"] = list(self.devices)
        data["device_uuids"] = list(self.device_uuids)
        data["remaining_s"] = round(self.remaining, 3)
        return data

    # -- actions -------------------------------------------------------------------------
    def _require_engine(self) -> Engine:
        if self._engine is None:
            from chronos.engine import default_engine

            self._engine = default_engine()
        return self._engine

    def _adopt(self, other: Lease) -> Lease:
        for name in self.__dataclass_fields__:
            if name != "_engine":
                setattr(self, name, getattr(other, name))
        return self

    def refresh(self) -> Lease:
        """Re-read this lease from the ledger."""
        return self._adopt(self._require_engine().get(self.id))

    def release(self) -> None:
        """End the lease now; releasing an already ended lease is a no-op."""
        self._adopt(self._require_engine().release(self.id))

    def extend(self, duration: str | int | float) -> Lease:
        """Push the end back by ``duration`` (``30m``, ``1h`` or seconds)."""
        return self._adopt(self._require_engine().extend(self.id, duration))

    def bind(self, pid: int | None) -> Lease:
        """Make ``pid`` the holder (the lease ends when it dies); None unbinds."""
        return self._adopt(self._require_engine().bind(self.id, pid))

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process that should run inside this lease's caps."""
        from chronos.enforce.caps import lease_env

        return lease_env(self, base)

    def apply_caps(self) -> list[str]:
        """Cap frameworks already imported in this process; returns what was capped."""
        from chronos.enforce.caps import apply_caps

        return apply_caps(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state in (ACTIVE, QUEUED):
            self.release()

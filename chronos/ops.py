"""What an engine answers, whichever runs it: the local :class:`chronos.engine.Engine`, or the
service's client (:class:`chronos.service.client.ServiceEngine`).

The public API, the CLI, the magics, the widget and the provisioner are written against this
protocol only, and mypy checks that both implementations fit it, so no front end can tell (or
needs to know) whether the ledger is in this process or behind a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from chronos import accounting, scheduler
from chronos.accounting import DeviceStatus
from chronos.config import Config
from chronos.devices import Backend
from chronos.lease import Lease, LeaseOps
from chronos.ledger import Event  # noqa: TID251 - the audit log's record type only, no ledger access
from chronos.limits import Limits
from chronos.model import Action, LeaseRecord, Priority, WaitUpdate
from chronos.request import RequestSpec
from chronos.settings import Settings
from chronos.units import MemorySpec

if TYPE_CHECKING:
    from chronos.policy.report import Report

__all__ = ["EngineOps"]


class EngineOps(LeaseOps, Protocol):
    """Every lease operation a front end may ask for (see :class:`chronos.engine.Engine` for each)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def config(self) -> Config: ...

    @property
    def on_expiry(self) -> Action: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def ledger_id(self) -> str: ...

    def close(self) -> None: ...

    def reserve(
        self,
        memory: str | int | float | MemorySpec,
        duration: str | int | float | None = None,
        *,
        device: int | str | Sequence[int] | None = None,
        gpus: int | None = None,
        prefer: int | str | Sequence[int] | None = None,
        priority: Priority | str | None = None,
        label: str | None = None,
        user: str | None = None,
        bind: bool | int = True,
        wait: bool | float | str | None = False,
        on_wait: Callable[[WaitUpdate], None] | None = None,
        idle_after: str | int | float | None = None,
        on_idle: str | None = None,
    ) -> Lease: ...

    def submit(self, spec: RequestSpec, *, user: str | None = None, bind: bool | int = True,
               on_wait: Callable[[WaitUpdate], None] | None = None) -> Lease: ...

    def forecast(self, spec: RequestSpec, *, user: str | None = None) -> scheduler.Decision: ...

    def snapshot(self) -> tuple[scheduler.Snapshot, list[Lease]]: ...

    def book(self, memory: str | int | float | MemorySpec, duration: str | int | float | None, at: str | float, *,
             device: int | str | Sequence[int] | None = None, gpus: int | None = None, label: str | None = None,
             user: str | None = None) -> Lease: ...

    def claim(self, booking_id: str, *, bind: bool | int = True) -> Lease: ...

    def bookings(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
                 after: str | None = None) -> list[Lease]: ...

    def leases(self, *, all: bool = False, user: str | None = None, limit: int | None = None,
               before: str | int | None = None, ended_since: float | None = None) -> list[Lease]: ...

    def active_records(self) -> list[LeaseRecord]: ...

    def devices(self) -> list[DeviceStatus]: ...

    def record_usage(self, lease_id: str, peak_bytes: int, gpu_seconds: float, *, note: str | None = None) -> None: ...

    def events(self, *, since: float | None = None, lease_id: str | None = None, after: int | None = None,
               limit: int | None = None) -> list[Event]: ...

    def membership(self, leases: Sequence[LeaseRecord],
                   roots: dict[str, tuple[int, float | None]] | None = None) -> accounting.Membership: ...

    def report(self, *, since: float, by: str = "user") -> Report: ...

    def metrics(self) -> str: ...

    def limits_for(self, user: str | None = None) -> Limits: ...

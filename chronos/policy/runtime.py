"""The engine's policy helper: what the lab policies need gathered and applied, cheaply.

The engine calls it at clear points: :meth:`Policies.sample` before taking the write lock (at most
one backend call every few seconds, and only while some active lease has an idle rule),
:meth:`Policies.due` to learn whether a write is needed, :meth:`Policies.reclaim` inside the write
transaction that already reclaims expired leases (idle transitions, idle actions, no-shows), and
:meth:`Policies.tick` after a read (the metrics textfile). The decisions are made by the pure
modules beside this one; the service calls the same functions from its own loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from chronos import scheduler
from chronos.accounting import Membership
from chronos.config import Config
from chronos.devices.base import Backend
from chronos.errors import ChronosError
from chronos.identity import User, groups_of
from chronos.limits import Limits, effective
from chronos.model import Action, LeaseRecord, LeaseState, OnIdle
from chronos.policy import fairshare, idle
from chronos.units import format_clock, format_duration

__all__ = ["Host", "LedgerOps", "Policies"]

#: The most often utilisation is sampled (less often when every idle window is long).
SAMPLE_EVERY_S = 2.0
#: How long a user's groups (and so their limits) are remembered.
GROUPS_TTL_S = 30.0
#: How long the list of bookings is reused for the "is a write due" check.
REUSE_S = 2.0
#: The longest a fair-share reading is reused while no lease is added or ends.
SHARES_TTL_S = 30.0
#: A sample older than this decides nothing.
STALE_S = 60.0


class LedgerOps(Protocol):
    """The ledger calls this module makes (the engine's ledger answers them)."""

    def update(self, lease_id: str, **fields: Any) -> None: ...

    def booked(self) -> list[LeaseRecord]: ...

    def request_of(self, lease_id: str) -> dict[str, Any] | None: ...

    def held_since(self, since: float) -> list[LeaseRecord]: ...

    def change_mark(self) -> tuple[Any, ...]: ...

    def transaction(self) -> AbstractContextManager[Any]: ...


class Host(Protocol):
    """What the helper needs of its engine."""

    @property
    def config(self) -> Config: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def ledger(self) -> Any: ...

    def _event(self, lease_id: str, event: str, who: User, detail: dict[str, Any] | None = None) -> None: ...

    def _end(self, lease: LeaseRecord, state: LeaseState, reason: str, who: User, *, at: float) -> LeaseRecord: ...


class Policies:
    """Per-engine policy state: cached limits and idle rules, the latest utilisation sample."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._limits: dict[int, tuple[float, Limits]] = {}
        self._rules: dict[str, tuple[idle.IdleRule, ...]] = {}
        self._membership = Membership()
        self._sample: idle.Sample | None = None
        #: Utilisation samples taken so far (a window tied to what was observed, for tests and the service).
        self.samples = 0
        self._next_sample = 0.0
        self._booked: tuple[float, list[LeaseRecord]] | None = None
        #: What writes ask of the bookings to come, worked out for the last set of them seen.
        self._facts: _Bookings | None = None
        self._shares: tuple[float, tuple[Any, ...], dict[str, float]] | None = None
        self._next_tick = 0.0
        # The service runs operations in several threads: one samples (or writes the metrics) at a
        # time, and the others go on without waiting for it.
        self._sampling = threading.Lock()
        self._ticking = threading.Lock()
        self._global: dict[str, Limits] = {}
        self._write = threading.local()  # the bookings read inside this thread's current write
        #: Called by :meth:`tick` with nothing, at most every ``[metrics] interval``: writes the textfile.
        self.on_tick: Callable[[], None] | None = None

    @property
    def config(self) -> Config:
        return self.host.config

    # -- limits ----------------------------------------------------------------------------
    def limits_of(self, user: User) -> Limits:
        """``user``'s effective limits; their groups are read again every half minute."""
        config = self.config
        if not config.group_limits and not config.user_limits:  # everyone has [limits]: computed once
            found = self._global.get(user.name)
            if found is None:
                found = self._global[user.name] = effective(config, user.name)
            return found
        now = time.monotonic()
        cached = self._limits.get(user.uid)
        if cached is None or now - cached[0] > GROUPS_TTL_S or cached[1].user != user.name:
            groups = groups_of(user) if config.group_limits else set()
            cached = (now, effective(config, user.name, groups))
            self._limits[user.uid] = cached
        return cached[1]

    # -- idle ------------------------------------------------------------------------------
    def rules(self, lease: LeaseRecord) -> tuple[idle.IdleRule, ...]:
        """The idle rules ``lease`` is under: its owner's limits, and its request's own (stricter) rule."""
        found = self._rules.get(lease.id)
        if found is None:
            mine = self.limits_of(User(lease.uid, lease.owner))
            out = []
            if mine.idle_after_s is not None:
                out.append(idle.IdleRule(mine.idle_after_s, OnIdle(mine.on_idle), mine.idle_warning_s))
            own = idle.rule_from_json(self.host.ledger.request_of(lease.id), mine.idle_warning_s)
            if own is not None:
                out.append(own)
            found = tuple(out)
            if len(self._rules) > 4096:
                self._rules.clear()
            self._rules[lease.id] = found
        return found

    def sample(self, live: Sequence[LeaseRecord]) -> None:
        """Sample SM use for the active leases under an idle rule, at most every few seconds (outside locks)."""
        if time.monotonic() < self._next_sample or not self._sampling.acquire(blocking=False):
            return
        try:
            self._sample_now(live)
        finally:
            self._sampling.release()

    def _sample_now(self, live: Sequence[LeaseRecord]) -> None:
        now = time.monotonic()
        if now < self._next_sample:  # another thread sampled meanwhile
            return
        active = [lease for lease in live if lease.state == LeaseState.ACTIVE]
        ruled = [lease for lease in active if self.rules(lease)]
        if not ruled:
            self._next_sample = now + SAMPLE_EVERY_S
            return
        shortest = min(rule.after_s for lease in ruled for rule in self.rules(lease))
        self._next_sample = now + min(SAMPLE_EVERY_S, max(0.2, shortest / 5))
        try:
            samples = self.host.backend.utilization(sorted({i for lease in ruled for i in lease.devices}))
        except ChronosError:
            return  # no sample: nothing is judged idle
        self._membership.ledger = self.host.ledger.identity
        self._membership.update(active)
        self._sample = idle.attribute(samples, ruled, self._membership, time.time())
        self.samples += 1

    @property
    def last_sample(self) -> idle.Sample | None:
        """The latest utilisation sample (which leases it judged and which were busy), if any."""
        return self._sample

    def idle_decisions(self, live: Sequence[LeaseRecord]) -> list[idle.IdleDecision]:
        sample = self._sample
        if sample is None or time.time() - sample.at > STALE_S:
            return []
        rules = {lease.id: self.rules(lease) for lease in live if lease.id in sample.judged}
        return idle.evaluate(live, sample, rules)

    def _apply_idle(self, live: list[LeaseRecord], now: float, who: User) -> list[LeaseRecord]:
        decisions = self.idle_decisions(live)
        if not decisions:
            return live  # the same list: the engine's kept view of it stays usable
        ledger = self.host.ledger
        by_id = {lease.id: lease for lease in live}
        for decision in decisions:
            lease = by_id[decision.lease_id]
            if decision.kind == "active":
                ledger.update(lease.id, idle_since=None, idle_warning=None)
                self.host._event(lease.id, "active", who, {"idle_since": lease.idle_since, "by": "gpu use"})
                by_id[lease.id] = replace(lease, idle_since=None, idle_warning=None)
            elif decision.kind == "idle":
                ledger.update(lease.id, idle_since=decision.idle_since)
                self.host._event(lease.id, "idle", who, {"since": decision.idle_since})
                by_id[lease.id] = lease = replace(lease, idle_since=decision.idle_since)
            if decision.kind == "warn":
                ledger.update(lease.id, idle_since=decision.idle_since, idle_warning=decision.notice)
                assert decision.notice is not None
                self.host._event(lease.id, "idle-warning", who, {
                    "since": decision.idle_since, "action": str(decision.notice.action),
                    "action_at": decision.notice.action_at, "message": decision.message})
                by_id[lease.id] = replace(lease, idle_since=decision.idle_since, idle_warning=decision.notice)
            elif decision.kind in (OnIdle.RELEASE, OnIdle.TERMINATE):
                terminate = decision.kind == OnIdle.TERMINATE
                # release: the processes are left running (their memory is then unmanaged); terminate: stopped
                ledger.update(lease.id, end_action=Action.TERMINATE if terminate else Action.WARN)
                if terminate:
                    self._signal_members(lease)
                self.host._end(lease, LeaseState.RELEASED, decision.message, who, at=now)
                del by_id[lease.id]
        return [by_id[lease.id] for lease in live if lease.id in by_id]

    def _signal_members(self, lease: LeaseRecord) -> None:
        """SIGTERM to the lease's processes this process may signal; their watchdog (or the service) goes on."""
        self._membership.ledger = self.host.ledger.identity
        self._membership.update([lease, *[r for r in self._membership.leases if r.id != lease.id]])
        import signal  # only here: its enums cost every command start ~2.5 ms

        for pid, _started in self._membership.members(lease.id):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)

    # -- bookings --------------------------------------------------------------------------
    def grace_of(self, booking: LeaseRecord) -> float:
        return float(self.limits_of(User(booking.uid, booking.owner)).booking_grace_s)

    def _no_show_at(self, booking: LeaseRecord) -> float:
        assert booking.starts_at is not None
        return min(booking.starts_at + self.grace_of(booking), booking.starts_at + booking.duration_s)

    def _facts_of(self, booked: list[LeaseRecord]) -> _Bookings:
        """:class:`_Bookings` for ``booked``: those of the last set, if it holds the same records (an identity
        walk in C: the open leases' records are kept between writes while unchanged), else worked out."""
        facts = self._facts
        if facts is None or facts.records != booked:
            facts = self._facts = _Bookings.of(booked, facts)
        return facts

    def started(self, now: float) -> list[LeaseRecord]:
        """Inside a write: the unclaimed bookings whose window has begun (those a request may claim)."""
        booked = self.booked(fresh=True)
        if now < self._facts_of(booked).first_start:
            return []
        return [b for b in booked if b.starts_at is not None and b.starts_at <= now]

    def _apply_no_shows(self, booked: list[LeaseRecord], now: float, who: User) -> None:
        if now < self._facts_of(booked).first_start:  # none has begun: none can be a no-show
            self._booked = (time.monotonic(), booked)
            self._write.booked = booked
            return
        left = []
        for booking in booked:
            # A booking not yet started cannot be a no-show: its grace (a limit per owner) is not looked up.
            if booking.starts_at is not None and booking.starts_at <= now and now >= self._no_show_at(booking):
                grace = self.grace_of(booking)
                self.host._end(booking, LeaseState.NO_SHOW,
                               f"not claimed within {format_duration(grace)} of its start "
                               f"({format_clock(booking.starts_at)}): a no-show", who, at=self._no_show_at(booking))
            else:
                left.append(booking)
        self._booked = (time.monotonic(), left)
        self._write.booked = left  # what the rest of this write sees (nobody else writes meanwhile)

    def changed(self, booking_id: str) -> None:
        """A booking was claimed or made in this write: the bookings read are read again when next asked."""
        self._write.booked = None
        self._booked = None

    def forget_write(self) -> None:
        """A read begins: what the last write read is not to be reused."""
        self._write.booked = None

    def booked(self, *, fresh: bool = False) -> list[LeaseRecord]:
        """Unclaimed bookings: with ``fresh``, as this write read them or read now; else reused a moment."""
        now = time.monotonic()
        if fresh:
            inside: list[LeaseRecord] | None = getattr(self._write, "booked", None)
            if inside is not None:
                return inside
        if fresh or self._booked is None or now - self._booked[0] > REUSE_S:
            self._booked = (now, self.host.ledger.booked())
        return self._booked[1]

    def snapshot_bookings(self, now: float) -> tuple[scheduler.Booked, ...]:
        """The bookings the planner must protect, read afresh."""
        facts = self._facts_of(self.booked(fresh=True))
        if now < facts.first_end:
            return facts.planned
        return tuple(b for b in facts.planned if b.end > now)

    # -- the engine's hooks ----------------------------------------------------------------
    def due(self, live: Sequence[LeaseRecord], now: float) -> bool:
        """Whether a write is needed: an idle transition, or a booking past its grace."""
        if self.idle_decisions(live):
            return True
        booked = self.booked()
        if now < self._facts_of(booked).first_start:
            return False
        return any(b.starts_at is not None and b.starts_at <= now and now >= self._no_show_at(b) for b in booked)

    def reclaim(self, live: list[LeaseRecord], booked: list[LeaseRecord], now: float, who: User
                ) -> list[LeaseRecord]:
        """Inside the engine's write: idle transitions and actions, then no-shows among ``booked`` (the
        unclaimed bookings, read with the live leases); returns the leases still live."""
        live = self._apply_idle(live, now, who)
        self._apply_no_shows(booked, now, who)
        return live

    def tick(self) -> None:
        """After a read: the metrics textfile, at most every ``[metrics] interval``."""
        if self.on_tick is None or self.config.metrics_textfile is None or time.monotonic() < self._next_tick:
            return
        if not self._ticking.acquire(blocking=False):  # another thread writes it (or this one, re-entered)
            return
        try:
            now = time.monotonic()
            if now < self._next_tick:
                return
            self._next_tick = now + self.config.metrics_interval_s
            self.on_tick()
        except (ChronosError, OSError):
            pass  # a textfile this process may not write is someone else's to keep
        finally:
            self._ticking.release()

    # -- fair share ------------------------------------------------------------------------
    def use(self, now: float) -> dict[str, float]:
        """Every owner's decayed recent use in GiB·h, read again when a lease was added or ended (and every
        half minute, for the use of leases still running)."""
        cached = self._shares
        mono = time.monotonic()
        mark = self.host.ledger.change_mark()
        if cached is None or cached[1] != mark or mono - cached[0] > SHARES_TTL_S:
            half = self.config.fair_share_half_life_s
            rows = self.host.ledger.held_since(fairshare.horizon(now, half))
            cached = (mono, mark, fairshare.usage(rows, now, half))
            self._shares = cached
        return cached[2]

    def share_of(self, owner: str, now: float) -> float:
        return self.use(now).get(owner, 0.0) if self.config.fair_share else 0.0


class _Bookings:
    """One set of unclaimed bookings and what each write asks of them: their planner forms, the first
    start (before it, none can be claimed or be a no-show) and the first end (before it, every form holds)."""

    __slots__ = ("first_end", "first_start", "forms", "planned", "records")

    def __init__(self, records: list[LeaseRecord], forms: dict[str, tuple[LeaseRecord, scheduler.Booked]]) -> None:
        self.records = records
        self.forms = forms
        self.planned = tuple(form for _record, form in forms.values())
        self.first_start = min((b.start for b in self.planned), default=math.inf)
        self.first_end = min((b.end for b in self.planned), default=math.inf)

    @classmethod
    def of(cls, booked: list[LeaseRecord], before: _Bookings | None) -> _Bookings:
        """The facts of ``booked``; a booking whose record is the one ``before`` had keeps its planner form."""
        known = before.forms if before is not None else {}
        forms = {}
        for b in booked:
            if b.starts_at is None:
                continue
            form = known.get(b.id)
            if form is None or form[0] is not b:
                form = (b, scheduler.Booked(b.id, b.devices, b.memory_bytes, b.starts_at, b.starts_at + b.duration_s))
            forms[b.id] = form
        return cls(list(booked), forms)

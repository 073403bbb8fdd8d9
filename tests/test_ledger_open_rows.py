"""The open leases a write reads: another connection's commit is seen by the next write, and a write
sees its own changes, however many times it reads them (``data_version`` is read once per write)."""

from __future__ import annotations

from pathlib import Path

from chronos.ledger import Ledger
from chronos.model import LeaseRecord, LeaseState


def _lease(owner: str) -> LeaseRecord:
    return LeaseRecord(id="", owner=owner, uid=1000, devices=(0,), device_uuids=("GPU-0",), memory_bytes=1 << 30,
                       created_at=1.0, expires_at=2e9, duration_s=60.0, started_at=1.0)


def _owners(ledger: Ledger) -> list[str]:
    return [lease.owner for lease in ledger.live()]


def test_a_write_sees_the_commits_of_another_connection_made_before_it(tmp_path: Path) -> None:
    mine, other = Ledger(tmp_path), Ledger(tmp_path)
    try:
        with mine.transaction():
            mine.insert(_lease("ann"))
            assert _owners(mine) == ["ann"]
        with other.transaction():
            other.insert(_lease("bob"))
        for _ in range(3):  # each write looks again, once
            with mine.transaction():
                assert _owners(mine) == ["ann", "bob"]
                assert _owners(mine) == ["ann", "bob"]
        with other.transaction():
            bob = next(lease for lease in other.live() if lease.owner == "bob")
            other.update(bob.id, state=LeaseState.RELEASED, ended_at=3.0, end_reason="done")
        with mine.transaction():
            assert _owners(mine) == ["ann"]
    finally:
        mine.close()
        other.close()


def test_a_write_reads_its_own_changes_and_a_failed_one_leaves_none(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    try:
        with ledger.transaction():
            assert _owners(ledger) == []
            lease_id = ledger.insert(_lease("ann"))
            assert _owners(ledger) == ["ann"]
            ledger.update(lease_id, state=LeaseState.RELEASED, ended_at=3.0, end_reason="done")
            assert _owners(ledger) == []
            ledger.insert(_lease("cy"))
        try:
            with ledger.transaction():
                ledger.insert(_lease("dee"))
                assert _owners(ledger) == ["cy", "dee"]
                raise RuntimeError("undone")
        except RuntimeError:
            pass
        with ledger.transaction():
            assert _owners(ledger) == ["cy"]
        assert _owners(ledger) == ["cy"]
    finally:
        ledger.close()

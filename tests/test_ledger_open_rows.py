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


def _open_now(ledger: Ledger, since: tuple[int, int]
              ) -> tuple[tuple[int, int], dict[int, LeaseRecord], list[int] | None]:
    with ledger.transaction(), ledger.locked():
        token, rows, changed = ledger.open_changes(since)
        return token, dict(rows), changed


def test_another_connections_commit_reaches_a_view_as_the_leases_it_changed(tmp_path: Path) -> None:
    """Read again after another connection committed, the open leases come with the ids that changed (so a view
    applies them, not a rebuild); a lease whose row is as it was keeps its record."""
    mine, other = Ledger(tmp_path), Ledger(tmp_path)
    try:
        with mine.transaction():
            ann, bob, cy = (mine.insert(_lease(owner)) for owner in ("ann", "bob", "cy"))
        token, before, _ = _open_now(mine, (-1, 0))
        with other.transaction():
            other.update(bob, memory_bytes=2 << 30)
            other.update(cy, state=LeaseState.RELEASED, ended_at=3.0, end_reason="done")
            dee = other.insert(_lease("dee"))
        token2, after, changed = _open_now(mine, token)
        assert changed is not None and sorted(changed) == sorted(int(i) for i in (bob, cy, dee))
        assert [lease.owner for lease in after.values()] == ["ann", "bob", "dee"]
        assert after[int(bob)].memory_bytes == 2 << 30
        assert after[int(ann)] is before[int(ann)]  # unchanged: the same record
        assert _open_now(mine, token2)[2] == []  # nothing new since
    finally:
        mine.close()
        other.close()


def test_a_row_set_back_by_another_connection_is_not_mistaken_for_the_one_first_read(tmp_path: Path) -> None:
    """This connection changes a lease, another changes it back to the row this one read first: the row is
    equal to that first read, yet the kept record (this connection's change) is not the ledger's."""
    mine, other = Ledger(tmp_path), Ledger(tmp_path)
    try:
        with mine.transaction():
            lease_id = mine.insert(_lease("ann"))
        with other.transaction():  # the row as both read it
            other.update(lease_id, memory_bytes=1 << 30)
        token, _, _ = _open_now(mine, (-1, 0))
        with mine.transaction():
            mine.update(lease_id, memory_bytes=3 << 30)
        with other.transaction():
            other.update(lease_id, memory_bytes=1 << 30)
        _, rows, changed = _open_now(mine, token)
        assert rows[int(lease_id)].memory_bytes == 1 << 30
        assert changed is not None and int(lease_id) in changed
    finally:
        mine.close()
        other.close()

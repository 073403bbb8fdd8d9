"""What ``chronos doctor`` can tell cheaply about faults around the ledger that Chronos cannot prevent.

Each check reads only: the write lock held past a short wait, audit events dated ahead of this clock
(a process with its clock ahead, whose expiries and reclaims are off by as much), and a ``-wal`` or
``-shm`` file removed while processes still have it open (they and new processes no longer share
one view of the ledger). docs/trust-model.md says what each fault does.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from chronos.engine import Engine
from chronos.errors import ChronosError
from chronos.state import write_trouble
from chronos.units import format_duration

__all__ = ["LOCK_WAIT_S", "SKEW_S", "ledger_problems"]

#: How long the doctor waits for the write lock before it reports it held.
LOCK_WAIT_S = 1.0
#: Events dated this far past this clock are reported as written by a clock running ahead.
SKEW_S = 60.0


def ledger_problems(engine: Engine) -> list[str]:
    """One line per fault seen; nothing when the ledger does not exist yet (the doctor creates nothing)."""
    db = Path(engine.config.state_dir) / "chronos.db"
    try:
        if not stat.S_ISREG(os.stat(db).st_mode):
            return []
    except OSError:  # missing, or behind a directory this user may not enter (reported with the directory)
        return []
    problems = _deleted_files(db)
    try:
        ledger = engine.ledger
    except ChronosError as exc:  # whose ledger this user may use is the state directory check's to say
        return [*problems, str(exc)] if write_trouble(db) is not None else problems
    try:
        with engine.patience(LOCK_WAIT_S), ledger.transaction():
            pass
        ahead = engine.events(since=time.time() + SKEW_S)
    except ChronosError as exc:
        return [*problems, str(exc)]
    if ahead:
        latest = max(event.at for event in ahead)
        problems.append(
            f"{len(ahead)} audit event(s) are dated ahead of this machine's clock (the latest by "
            f"{format_duration(latest - time.time())}, from pid {ahead[-1].pid}): a process with its clock ahead "
            "wrote them, and its expiries and reclaims are off by as much; check the clock of every machine and "
            "container that uses this state directory")
    return problems


def _deleted_files(db: Path) -> list[str]:
    """Processes (those this user may inspect) that still map or hold a removed ``-shm`` or ``-wal`` file."""
    wanted = {f"{db}-shm (deleted)", f"{db}-wal (deleted)"}
    holders: dict[str, set[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps", encoding="utf-8", errors="replace") as maps:
                found = {line.split(None, 5)[-1].strip() for line in maps if "(deleted)" in line}
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                found.add(os.readlink(fd.path))
        except OSError:
            continue
        for name in found & wanted:
            holders.setdefault(name.split()[0], set()).add(int(entry.name))
    return [f"{name} was removed while processes {', '.join(map(str, sorted(pids)))} still use it: they and new "
            "processes no longer see each other's writes; stop those processes (see docs/trust-model.md)"
            for name, pids in sorted(holders.items())]

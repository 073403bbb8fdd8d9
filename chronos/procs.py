"""Process identity: a pid plus its start time, so a reused pid is never taken for the holder."""

from __future__ import annotations

import os

import psutil

__all__ = ["start_time", "is_alive", "descendants", "caller"]

# psutil derives create_time from boot time and clock ticks; equal processes agree to far below this.
_TOLERANCE_S = 0.05


def start_time(pid: int) -> float | None:
    """The start time of ``pid`` (epoch seconds), or None when no such live process exists."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return None


def is_alive(pid: int, started: float | None) -> bool:
    """True while ``pid`` runs and, when ``started`` is known, is the same process that started then."""
    now_started = start_time(pid)
    if now_started is None:
        return False
    return started is None or abs(now_started - started) <= _TOLERANCE_S


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it; empty when it is gone."""
    try:
        proc = psutil.Process(pid)
        return {pid} | {child.pid for child in proc.children(recursive=True)}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def caller() -> tuple[int, float]:
    """The calling process as (pid, start time)."""
    pid = os.getpid()
    started = start_time(pid)
    assert started is not None
    return pid, started

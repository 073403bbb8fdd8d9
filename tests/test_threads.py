"""Stopping helper threads where a signal, turned into an exception, may land inside ``Thread.start()``."""

from __future__ import annotations

import threading
import time

from chronos import threads


def test_a_thread_whose_start_never_returned_is_not_waited_for_and_raises_nothing() -> None:
    never = threading.Thread(target=time.sleep, args=(60,), daemon=True)
    begun = time.monotonic()
    threads.join(never, timeout=30)
    assert time.monotonic() - begun < 5 and not never.is_alive()


def test_a_running_thread_is_waited_for_and_the_calling_one_is_not() -> None:
    stop = threading.Event()
    seen: list[bool] = []

    def run() -> None:
        threads.join(threading.current_thread())  # itself: returns at once instead of raising
        seen.append(True)
        stop.wait(30)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    threads.join(worker, timeout=0.2)
    assert worker.is_alive() and seen == [True]  # the timeout passed; it still runs
    stop.set()
    threads.join(worker)
    assert not worker.is_alive()
    threads.join(None)

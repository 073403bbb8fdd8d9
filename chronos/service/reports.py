"""The service's usage reports, each built in a child process of its own at a low CPU priority.

A report reads its whole window of the audit log, seconds of CPU over months of history. Built on a
worker thread it would hold the service's interpreter (one core, the GIL) for that long, and every other
client's round trip would wait its turn for it. In a child process at ``nice`` :data:`NICE` it is
the kernel's scheduler that shares the CPU, and it favours the service. A child may use at most
:data:`CPU_LIMIT_S` seconds of CPU (``RLIMIT_CPU``; past them the report is refused as a limit), so no
report costs the machine more than that.

The child is ``python -m chronos.service.reports``: it reads the engine's settings and the report's
arguments (a pickle) on its standard input, builds the report as embedded mode does
(:meth:`chronos.engine.Engine.report`) over the same ledger, and writes the report, or the error it
raised (in its wire form, :func:`chronos.service.protocol.error_to_wire`), as a pickle on its standard
output. Both ends are this package, run by the service's user.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from chronos.engine import Engine
from chronos.errors import ChronosError, LimitError, UnavailableError
from chronos.policy.report import Report
from chronos.service.protocol import error_from_wire, error_to_wire
from chronos.settings import Settings

__all__ = ["CPU_LIMIT_S", "NICE", "ReportChildren"]

#: How much lower than the service's the children's CPU priority is.
NICE = 10
#: The CPU seconds one report may use; past them the kernel stops it (SIGXCPU).
CPU_LIMIT_S = 600
#: How often a report being built looks whether its client is still there.
GONE_CHECK_S = 0.5

log = logging.getLogger("chronos.service")

_STOPPING = "the service is stopping: ask again once it is back"

#: The directory holding the ``chronos`` package this module is part of: the child imports the same one.
_SOURCE = str(Path(__file__).resolve().parents[2])


class ReportChildren:
    """Reports over one engine's ledger, each built by a child process; :meth:`close` ends those running."""

    def __init__(self, settings: Settings, *, cpu_limit_s: int = CPU_LIMIT_S) -> None:
        self._settings = settings
        self._cpu_limit_s = cpu_limit_s
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def build(self, *, since: float, by: str = "user", gone: Callable[[], bool] = lambda: False) -> Report:
        """The report :meth:`chronos.engine.Engine.report` gives, built in a child; its errors raised here.
        Once ``gone()`` (the client went away), the child is ended: no one would read its report."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_SOURCE, os.environ.get("PYTHONPATH")) if p)}
        with self._lock:
            if self._closed:
                raise UnavailableError(_STOPPING)
            try:  # cwd "/": ``python -m`` puts the working directory first on the path, and "/" is root's alone
                child = subprocess.Popen([sys.executable, "-m", "chronos.service.reports"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env)
            except OSError as exc:  # no process to be had now (a limit on the service's tasks)
                raise UnavailableError(f"the service cannot start a process for the report now ({exc.strerror}): "
                                       "try again later") from None
            self._running.add(child)
        try:
            message: bytes | None = pickle.dumps((self._settings, since, by, self._cpu_limit_s))
            while True:
                try:
                    out, err = child.communicate(message, timeout=GONE_CHECK_S)
                    break
                except subprocess.TimeoutExpired:
                    message = None  # sent already (communicate goes on with what it had begun)
                    if gone():
                        child.kill()
                        child.communicate()
                        raise UnavailableError("the client went away before its report was built") from None
        finally:
            with self._lock:
                self._running.discard(child)
        if child.returncode == 0:
            kind, value = pickle.loads(out)
            if kind == "error":
                raise error_from_wire(value)
            assert isinstance(value, Report)
            return value
        self._failed(child.returncode, err)

    def _failed(self, code: int, err: bytes) -> NoReturn:
        if code == -signal.SIGXCPU:
            raise LimitError("report_cpu_s", f"the report needed more than {self._cpu_limit_s} s of CPU and was "
                             "stopped: ask for a shorter window (a later since)")
        if self._closed:
            raise UnavailableError(_STOPPING)
        text = err.decode(errors="replace").strip()
        log.error("a report's child process failed (exit %s)%s", code, f":\n{text}" if text else "")
        if code < 0:
            what = f"its process was ended by {_signal_name(-code)}"
        else:
            what = text.splitlines()[-1][:200] if text else f"its process exited with {code}"
        raise ChronosError(f"the service failed to build the report ({what}): try again, or see the service's log")

    def close(self) -> None:
        """End the reports still being built (their callers get an error) and refuse new ones."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for child in running:
            child.kill()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _child() -> None:
    """The child: settings and arguments in, the report (or its error) out."""
    settings, since, by, cpu_limit_s = pickle.loads(sys.stdin.buffer.read())
    os.nice(NICE)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit_s, cpu_limit_s + 5))
    engine = Engine(settings=settings)
    outcome: tuple[str, Any]
    try:
        outcome = ("report", engine.report(since=since, by=by))
    except ChronosError as exc:
        outcome = ("error", error_to_wire(exc))  # as an answer carries it: the class, the message, the rule
    finally:
        engine.close()
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    _child()

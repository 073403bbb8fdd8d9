"""The Chronos service for tests: ``chronos serve`` as a real process on a temporary socket.

:func:`running_service` starts it (as whoever runs the tests: root in CI) with its own private state
directory and the test's simulated GPUs, waits until it answers, and stops it afterwards. The
``service`` fixture also points this process at it (``CHRONOS_SERVER``), so every API call, CLI
command and kernel started by the test goes through the socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.waiting import wait_for


@dataclass
class Service:
    """A running ``chronos serve``: its socket, its state directory, its process."""

    socket: Path
    state_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    #: Variables the service runs with on top of this process's (its system file, say).
    env: dict[str, str] | None = None

    def start(self) -> Service:
        env = {**{k: v for k, v in os.environ.items() if k != "CHRONOS_SERVER"}, **(self.env or {})}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chronos", "serve", "--socket", str(self.socket), "--state-dir",
                 str(self.state_dir)], env=env, stdout=log, stderr=log)
        wait_for(self.answers, timeout=30, what=lambda: f"the service to answer on {self.socket}: {self.logs()}")
        return self

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the service exited with {self.process.returncode}: {self.logs()}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def restart(self) -> Service:
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@contextmanager
def running_service(directory: Path, env: dict[str, str] | None = None) -> Iterator[Service]:
    """A service with its socket and state under ``directory``, stopped afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    service = Service(socket=directory / "run" / "chronos.sock", state_dir=directory / "state",
                      log=directory / "serve.log", env=env).start()
    try:
        yield service
    finally:
        if service.process is not None and service.process.poll() is None:
            service.stop()


@pytest.fixture
def service(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
            chronos_env: Path) -> Iterator[Service]:
    """A running service, and this process (and its children) pointed at it."""
    from chronos import api

    with running_service(tmp_path_factory.mktemp("service")) as running:
        monkeypatch.setenv("CHRONOS_SERVER", str(running.socket))
        api.reset_default_engine()
        yield running
        api.reset_default_engine()
    # the client side never opened a ledger of its own, whatever CHRONOS_STATE_DIR says
    assert not (chronos_env / "chronos.db").exists()


@pytest.fixture(params=["embedded", "service"])
def both_modes(request: pytest.FixtureRequest) -> str:
    """Run a test twice: with the ledger in this process, and through a running service."""
    if request.param == "service":
        request.getfixturevalue("service")
    return str(request.param)

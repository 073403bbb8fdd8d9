"""Every test gets its own state directory, simulated GPUs and no system config."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pytest-jupyter's in-process Jupyter Server (tests/test_server_extension.py). A plugin named here
# applies to the whole session, so its two autouse fixtures are narrowed below to the tests that
# use its server. A GPU machine runs only the ``gpu`` tests, without the Jupyter extras installed.
try:
    import pytest_jupyter  # noqa: F401
except ImportError:
    pytest_plugins: list[str] = []
else:
    pytest_plugins = ["pytest_jupyter.jupyter_server"]


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAS_GPU = _has_gpu()


def pytest_configure(config: pytest.Config) -> None:
    """SIGHUP and SIGINT as a terminal gives them, wherever the suite was started. Under ``nohup``, or as a
    background job of a script, they arrive ignored, every process the tests start inherits that, and the
    tests that stop a command, a kernel or a server with one of them would wait for it in vain."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU found")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def jp_asyncio_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop | None]:
    """pytest-jupyter's event loop (this overrides its autouse fixture), only for the tests that use
    its server: the browser tests' Playwright runs a loop of its own, which this must not close."""
    if "jp_serverapp" not in request.fixturenames:
        yield None
        return
    from jupyter_core.utils import ensure_event_loop

    loop = ensure_event_loop(prefer_selector_loop=True)
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def jp_server_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    """pytest-jupyter's server cleanup (overridden likewise): only after a test that ran its server."""
    yield
    if "jp_serverapp" not in request.fixturenames:
        return
    from jupyter_server.serverapp import ServerApp

    app = ServerApp.instance()
    loop = request.getfixturevalue("jp_asyncio_loop")
    try:
        loop.run_until_complete(app._cleanup())
    except (RuntimeError, SystemExit):
        pass
    if hasattr(app, "kernel_manager"):
        app.kernel_manager.context.destroy()
    ServerApp.clear_instance()


@pytest.fixture(autouse=True)
def chronos_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated state directory; simulated GPUs unless the test is marked ``gpu``."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
    monkeypatch.setenv("CHRONOS_CONFIG", str(state / "no-config.toml"))
    monkeypatch.setenv("CHRONOS_USER_CONFIG", str(state / "no-user-config.toml"))
    for key in ("CUDA_VISIBLE_DEVICES", "CHRONOS_LEASE_ID"):
        # setenv first: monkeypatch then knows the key's state before the test and puts it back after,
        # also when the test itself set it (in-process caps, an activation). delenv alone of an unset
        # key remembers nothing, and what a test set leaked into every later one.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("NO_COLOR", "1")
    if "gpu" in request.keywords:
        monkeypatch.setenv("CHRONOS_BACKEND", "nvml")
    else:
        monkeypatch.setenv("CHRONOS_BACKEND", "simulated")
        monkeypatch.setenv("CHRONOS_SIM_GPUS", "2x80G")
    from chronos import api

    api.reset_default_engine()
    yield state
    api.reset_default_engine()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``chronos ARGS`` as a real subprocess with the test's environment."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "chronos", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, input=input,
    )


# The running service (``service``) and the two modes (``both_modes``), for every test module.
from tests.service_fixture import both_modes, service  # noqa: E402, F401

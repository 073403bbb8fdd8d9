"""A real JupyterLab server and a headless Debian Chromium for the browser tests.

The server runs on a free localhost port in its own runtime, config and data directories, loads
the Chronos server extension, and finds this checkout's prebuilt lab extension and the given
kernelspecs through ``JUPYTER_PATH`` (a ``share/jupyter`` directory of the test's own). The
notebook package being installed, the same server also serves Notebook 7 (``/notebooks/...``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LABEXTENSION = ROOT / "chronos_jupyter" / "labextension"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def notebook(cells: list[str], kernel: str = "python3", display_name: str = "Python 3 (ipykernel)") -> dict[str, Any]:
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {},
                   "outputs": [], "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": display_name, "language": "python", "name": kernel}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


class Lab:
    """A JupyterLab server on a free localhost port, in its own directories under ``base``."""

    def __init__(self, base: Path, env: dict[str, str] | None = None, *, chronos: bool = False) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir(exist_ok=True)
        self.share = base / "share" / "jupyter"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        config = base / "config"
        config.mkdir(exist_ok=True)
        # Not this process's lease or GPUs: a module-scoped server starts before the per-test
        # fixtures have cleaned the environment, and an earlier test may have left them set.
        full = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CHRONOS_LEASE_ID")}
        full.update({
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
            "IPYTHONDIR": str(base / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
        })
        if chronos:
            # The extension as the wheel installs it: the server extension enabled by config, the
            # prebuilt lab extension under share/jupyter/labextensions.
            (config / "jupyter_server_config.json").write_text(
                json.dumps({"ServerApp": {"jpserver_extensions": {"chronos_jupyter": True}}}))
            target = self.share / "labextensions" / "@chronos-gpu" / "jupyterlab"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(LABEXTENSION, target_is_directory=True)
            full["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(self.share), full.get("JUPYTER_PATH")]))
        full.update(env or {})
        self.env = full
        self.log_path = base / "lab.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--ServerApp.port_retries=0",
             "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class="
             "jupyterlab.handlers.announcements.NeverCheckForUpdate",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            env=full, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """A REST call with the token (as a script would make it)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                raw = reply.read()
                return reply.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            err.close()
            return err.code, json.loads(raw) if raw else None

    def wait_ready(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for(up, timeout=timeout, interval=0.2,
                 what=lambda: f"jupyter lab to be ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

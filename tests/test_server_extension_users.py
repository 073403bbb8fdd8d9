"""Permissions through the REST API between OS users: a Jupyter Server run as another user.

CI runs as root, and so does this test; it is skipped elsewhere. The fixture creates the OS user
``chrlab-rest`` (removed afterwards) and a virtual environment that user can read,
/var/tmp/chrlab-venv, made with Debian's /usr/bin/python3 and holding jupyter_server at this
environment's version (the test interpreter may live under /root, which other users cannot read;
the venv is kept between runs and remade when the versions change). A copy of this checkout's
packages sits beside it for that user to import, and a sticky shared state directory holds the
one ledger both users use. The server is started as that user with ``runuser``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import chronos
from chronos.api import reset_default_engine
from tests.conftest import ROOT
from tests.jupyter_lab import free_port

USER = "chrlab-rest"
VENV = Path("/var/tmp/chrlab-venv")
SYSTEM_PYTHON = Path("/usr/bin/python3")
PACKAGES = ("jupyter_server", "jupyter_client", "psutil", "nvidia-ml-py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second OS user"),
    pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs Debian's /usr/bin/python3 for the second user"),
    pytest.mark.skipif(shutil.which("runuser") is None, reason="needs runuser (util-linux)"),
]


def _venv() -> Path:
    """A virtual environment any user can run, with the Chronos server extension's dependencies."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    marker = VENV / ".chrlab-deps"
    if not marker.exists() or marker.read_text() != "\n".join(pins):
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *pins], check=True, timeout=300)
        marker.write_text("\n".join(pins))
    return VENV / "bin" / "python"


@dataclass
class OtherServer:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path
    state: Path

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            err.close()
            return err.code, json.loads(raw or b"null")


@pytest.fixture(scope="module")
def other() -> Iterator[OtherServer]:
    python = _venv()
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        created = True
    entry = pwd.getpwnam(USER)
    work = Path("/var/tmp") / f"chrlab-rest-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    for package in ("chronos", "chronos_jupyter"):
        shutil.copytree(ROOT / package, work / "src" / package,
                        ignore=shutil.ignore_patterns("__pycache__", "labextension"))
    home = work / "home"
    (home / "root").mkdir(parents=True)
    state = work / "state"
    state.mkdir()
    os.chmod(work, 0o755)
    os.chmod(state, 0o1777)
    for path in [home, *home.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(work / "src"), "NO_COLOR": "1",
        "CHRONOS_STATE_DIR": str(state), "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "1x16G",
        "CHRONOS_CONFIG": "/nonexistent/chronos/config.toml",
        "CHRONOS_USER_CONFIG": "/nonexistent/chronos/user-config.toml",
        "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_PLATFORM_DIRS": "1",
    }
    log = work / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), str(python),
             "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={home / 'root'}", "--ServerApp.jpserver_extensions={'chronos_jupyter': True}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
        )
    server = OtherServer(f"http://127.0.0.1:{port}", token, process, log, state)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.request("GET", "api/status")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server as {USER} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(work, ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], check=False)


@pytest.fixture
def shared(other: OtherServer, monkeypatch: pytest.MonkeyPatch) -> OtherServer:
    """This test process (root) on the other server's ledger and GPUs."""
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(other.state))
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x16G")
    reset_default_engine()
    return other


def test_another_users_server_cannot_touch_my_lease(shared: OtherServer) -> None:
    mine = chronos.reserve("4G", "1h", bind=False, label="root's")
    try:
        code, doc = shared.request("GET", "chronos/api/status")
        assert code == 200 and doc["user"] == USER
        assert doc["leases"] == []  # only the caller's own leases
        assert doc["gpus"][0]["reserved_bytes"] == 4 << 30  # but the machine as it is
        for method, path, body, verb in (("DELETE", f"chronos/api/leases/{mine.id}", None, "release"),
                                         ("POST", f"chronos/api/leases/{mine.id}/extend", {"duration": "1h"},
                                          "extend")):
            code, reply = shared.request(method, path, body)
            assert code == 403, reply
            assert reply["message"] == (f"lease {mine.id} belongs to root; only its owner or an admin may "
                                        f"{verb} it")
            assert reply["exit_code"] == 4
        assert chronos.get_lease(mine.id).state == "active"
        assert chronos.get_lease(mine.id).expires_at == mine.expires_at
    finally:
        mine.release()


def test_a_users_own_lease_is_theirs_to_extend_and_release(shared: OtherServer) -> None:
    theirs = chronos.reserve("2G", "1h", bind=False, user=USER)  # root may reserve for another user
    assert theirs.expires_at is not None
    code, doc = shared.request("GET", "chronos/api/status")
    assert [lease["id"] for lease in doc["leases"]] == [theirs.id] and doc["leases"][0]["owner"] == USER
    code, reply = shared.request("POST", f"chronos/api/leases/{theirs.id}/extend", {"duration": "30m"})
    assert code == 200 and reply["expires_at"] == pytest.approx(theirs.expires_at + 1800)
    code, reply = shared.request("DELETE", f"chronos/api/leases/{theirs.id}")
    assert code == 200 and reply["state"] == "released"
    assert chronos.get_lease(theirs.id).end_reason == f"released by {USER}"

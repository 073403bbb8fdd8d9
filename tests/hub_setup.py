"""A real JupyterHub for tests, set up from docs/admin-guide.md's own commands.

* the hub: this Python's ``jupyterhub`` (the dev extra), run as root with ``configurable-http-proxy``
  from the npm registry, installed once into a local prefix (:data:`CHP_PREFIX`), never globally;
* the single-user servers: JupyterHub's default LocalProcessSpawner, real OS users, and a virtual
  environment of Debian's ``/usr/bin/python3`` under /var/tmp (readable by every user; its
  dependencies are installed once and kept, Chronos is installed into it from this checkout on each
  test session);
* every shell command of the guide's Install, Kernelspecs and state-directory sections is run as the
  guide writes it, with only names and paths put to the test's (:func:`guide_commands`), so the
  guide cannot drift from what works.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.os_users import system_venv
from tests.waiting import wait_for

GUIDE = ROOT / "docs" / "admin-guide.md"
HUB_VENV = Path("/var/tmp/chronos-test-hub-venv")
CHP_PREFIX = Path("/var/tmp/chronos-test-chp")
CHP_VERSION = "5"
#: What the single-user environment needs besides Chronos (the guide's own pip line installs that).
USER_PACKAGES = ("jupyterhub", "jupyter_server", "ipykernel", "ipywidgets", "psutil", "nvidia-ml-py")


def code_blocks(language: str) -> list[str]:
    """The guide's fenced code blocks of ``language``, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def block_with(language: str, needle: str) -> str:
    found = [b for b in code_blocks(language) if needle in b]
    assert found, f"docs/admin-guide.md has no {language} block with {needle!r}"
    return found[0]


def guide_commands(block: str, replace: Mapping[str, str]) -> list[str]:
    """The block's commands, continuation lines joined and comments dropped, with ``replace`` applied
    (longest first) and ``sudo`` left out (the test runs as root)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        for old in sorted(replace, key=len, reverse=True):
            line = line.replace(old, replace[old])
        commands.append(re.sub(r"(^|\|\s*)sudo\s+", r"\1", line))
    return commands


def run_commands(commands: list[str], *, umask: str, env: Mapping[str, str]) -> None:
    for command in commands:
        done = subprocess.run(["bash", "-c", f"umask {umask} && {command}"], capture_output=True, text=True,
                              env=dict(env), timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"


def user_venv() -> Path:
    """The single-user servers' environment, its dependencies installed once (see the module doc)."""
    system_venv(HUB_VENV, USER_PACKAGES, " ".join(USER_PACKAGES))
    return HUB_VENV


def proxy_command() -> Path:
    """configurable-http-proxy from the npm registry, in a local prefix."""
    exe = CHP_PREFIX / "node_modules" / ".bin" / "configurable-http-proxy"
    if not exe.exists():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed for configurable-http-proxy (.ci/run installs it)"
        CHP_PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--prefix", str(CHP_PREFIX), "--no-audit", "--no-fund", "--silent",
                        f"configurable-http-proxy@{CHP_VERSION}"], check=True, timeout=600)
    return exe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HUB_CONFIG = '''
from jupyterhub.auth import Authenticator

PASSWORDS = {passwords!r}


class FixedPasswords(Authenticator):
    """Each test user has one fixed password; nobody else gets in."""

    async def authenticate(self, handler, data):
        name = data.get("username", "")
        return name if name in PASSWORDS and data.get("password") == PASSWORDS[name] else None


c.JupyterHub.authenticator_class = FixedPasswords
c.Authenticator.allowed_users = set(PASSWORDS)
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.db_url = "sqlite:///{home}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{home}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{home}/jupyterhub.pid"
c.JupyterHub.services = [{{"name": "chronos-test", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "chronos-test", "services": ["chronos-test"],
                             "scopes": ["admin:users", "admin:servers", "access:servers", "read:users"]}}]
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.environment = {environment!r}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.cleanup_servers = True
'''


@dataclass
class Hub:
    """A running hub: its URL, an admin service token, its process and log."""

    url: str
    token: str
    process: subprocess.Popen[str]
    log: Path
    venv: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                timeout: float = 120) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"token {token or self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                raw = reply.read()
                return reply.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            err.close()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def login(self, user: str, password: str) -> int:
        """A form login as a browser does it; the status of the reply (302: logged in)."""
        opener = urllib.request.build_opener(_NoRedirect())
        with opener.open(self.url + "/hub/login", timeout=60) as page:
            cookie = page.headers.get("Set-Cookie", "")
        xsrf = re.search(r"_xsrf=([^;]+)", cookie)
        assert xsrf is not None, cookie
        form = urllib.parse.urlencode({"username": user, "password": password, "_xsrf": xsrf.group(1)}).encode()
        req = urllib.request.Request(self.url + "/hub/login", data=form, method="POST",
                                     headers={"Cookie": f"_xsrf={xsrf.group(1)}"})
        try:
            with opener.open(req, timeout=60) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as err:
            err.close()
            return int(err.code)

    def start_server(self, user: str) -> None:
        status, reply = self.request("POST", f"/hub/api/users/{user}/server")
        assert status in (201, 202), (status, reply)

        def ready() -> bool:
            info = self.request("GET", f"/hub/api/users/{user}")[1]
            server = info["servers"].get("", {})
            return bool(server.get("ready"))

        wait_for(ready, timeout=120, interval=0.2, what=lambda: f"{user}'s server to start:\n{self.tail()}")

    def stop_server(self, user: str) -> None:
        status, reply = self.request("DELETE", f"/hub/api/users/{user}/server")
        assert status in (202, 204), (status, reply)
        wait_for(lambda: self.request("GET", f"/hub/api/users/{user}")[1]["servers"] == {}, timeout=120,
                 interval=0.2, what=lambda: f"{user}'s server to stop:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def start_hub(home: Path, venv: Path, passwords: dict[str, str], environment: dict[str, str]) -> Hub:
    port, token = free_port(), secrets.token_hex(24)
    config = home / "jupyterhub_config.py"
    config.write_text(HUB_CONFIG.format(
        passwords=passwords, port=port, hub_port=free_port(), proxy=str(proxy_command()),
        proxy_api_port=free_port(), home=home, token=token, singleuser=str(venv / "bin" / "jupyterhub-singleuser"),
        environment=environment))
    log = home / "jupyterhub.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=home,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                   env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16)})
    hub = Hub(f"http://127.0.0.1:{port}", token, process, log, venv, passwords)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"jupyterhub exited:\n{log.read_text()}")
        try:
            return hub.request("GET", "/hub/api/")[0] == 200
        except OSError:
            return False

    wait_for(up, timeout=120, interval=0.2, what=lambda: f"jupyterhub to start:\n{log.read_text()}")
    return hub


def stop_hub(hub: Hub) -> None:
    if hub.process.poll() is None:
        hub.process.terminate()  # cleanup_servers: the hub stops every server first
        try:
            hub.process.wait(120)
        except subprocess.TimeoutExpired:
            hub.process.kill()
            hub.process.wait()


@dataclass
class Output:
    """What one execution published on IOPub: stream text, error tracebacks, whether it went idle."""

    text: str = ""
    errors: list[str] = field(default_factory=list)
    idle: bool = False
    closed: bool = False


async def execute(hub: Hub, user: str, kernel_id: str, code: str, *, timeout: float = 120,
                  output: Output | None = None, until: str | None = None) -> Output:
    """Run ``code`` in a kernel of ``user``'s server through the hub's proxy (the kernel websocket)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws_url = hub.url.replace("http://", "ws://") + f"/user/{user}/api/kernels/{kernel_id}/channels"
    conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {hub.token}"}))
    out = output if output is not None else Output()
    msg_id = secrets.token_hex(8)
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": user, "session": secrets.token_hex(8),
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not out.idle and not (until and until in out.text):
            try:
                raw = await asyncio.wait_for(conn.read_message(), timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if raw is None:
                out.closed = True
                break
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id or msg.get("channel") != "iopub":
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                out.text += content["text"]
            elif kind == "error":
                out.errors.append("\n".join(content.get("traceback") or [content.get("evalue", "")]))
            elif kind == "status" and content["execution_state"] == "idle":
                out.idle = True
    finally:
        conn.close()
        with contextlib.suppress(asyncio.TimeoutError):  # let the closing handshake end the socket
            while await asyncio.wait_for(conn.read_message(), timeout=5) is not None:
                pass
        stream = getattr(conn, "stream", None)
        if stream is not None and not stream.closed():
            stream.close()
    return out

"""A real `jupyter server` subprocess: kernels started over its REST API run inside Chronos leases."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import chronos
from chronos_jupyter.kernelspec import install_kernel
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

# Only the server itself and Chronos's extension (enabled by the file the package installs, which an
# editable install elsewhere may lack): the front-end extensions add seconds to every start.
_NO_EXTENSIONS = {
    "ServerApp": {
        "jpserver_extensions": {
            **{name: False
               for name in ("jupyterlab", "jupyter_lsp", "jupyter_server_terminals", "notebook_shim", "notebook",
                            "nbclassic", "jupyter_server_ydoc", "jupyter_collaboration")},
            "chronos_jupyter": True,
        }
    }
}


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen[str]
    log: Path

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as reply:
                raw = reply.read()
                return reply.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            err.close()
            return err.code, json.loads(raw) if raw else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    """Start `jupyter server` (as this user, with the test's Chronos state) with extra CLI settings."""
    prefix = tmp_path / "prefix"
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(_NO_EXTENSIONS))
    (tmp_path / "root").mkdir()
    for key, value in {
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }.items():
        monkeypatch.setenv(key, value)
    install_kernel("gpu-8g", "8G", "1h", prefix=prefix)
    started: list[Server] = []

    def start(*extra: str) -> Server:
        port, token = _free_port(), secrets.token_hex(16)
        log = tmp_path / f"server-{len(started)}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                 "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                 f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path / 'root'}", *extra],
                stdout=out, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                stdin=subprocess.DEVNULL,  # as under JupyterHub or a service manager: no terminal
            )
        server = Server(f"http://127.0.0.1:{port}", token, process, log)
        started.append(server)

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"jupyter server exited:\n{log.read_text()}")
            try:
                return server.request("GET", "/api/status")[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=90, interval=0.1, what=lambda: f"jupyter server to start:\n{log.read_text()}")
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                server.process.wait(30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def test_rest_kernel_holds_a_lease_and_delete_releases_it(start_server: Callable[..., Server]) -> None:
    server = start_server()
    status, model = server.request("POST", "/api/kernels", {"name": "gpu-8g"})
    assert status == 201, model
    kernel_id = model["id"]
    [lease] = chronos.leases()
    assert lease.state == "active" and lease.memory_bytes == 8 << 30
    assert lease.label is not None and kernel_id in lease.label
    kernel = psutil.Process(lease.pid)  # the holder is the kernel, a child of the server
    assert kernel.ppid() == server.process.pid
    assert kernel.environ()["CHRONOS_LEASE_ID"] == lease.id
    assert kernel.environ()["CUDA_VISIBLE_DEVICES"] == ",".join(lease.device_uuids)

    status, _ = server.request("DELETE", f"/api/kernels/{kernel_id}")
    assert status == 204
    assert chronos.get_lease(lease.id).state == "released"
    assert chronos.leases() == []


def test_no_capacity_reaches_the_front_end_as_a_message(start_server: Callable[..., Server]) -> None:
    server = start_server()
    chronos.reserve("80G", "1h", gpus=2, bind=False)
    status, reply = server.request("POST", "/api/kernels", {"name": "gpu-8g"})
    assert status == 503
    assert reply["message"].startswith("no GPU capacity for this kernel (8 GiB for 1h)\nnot enough free memory")
    # JupyterLab opens notebooks through sessions; that handler passes str(error) on as the message
    status, reply = server.request(
        "POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "gpu-8g"}}
    )
    assert status == 500
    assert reply["message"].startswith("no GPU capacity for this kernel (8 GiB for 1h)\nnot enough free memory")
    _, kernels = server.request("GET", "/api/kernels")
    assert kernels == []
    log = server.log.read_text()
    refusals = [line for line in log.splitlines() if "Chronos refused a kernel start: no GPU capacity" in line]
    assert len(refusals) == 2 and "Traceback" not in log, log  # one line, once, for each request


def test_expired_kernel_is_ended_and_dropped_by_the_server(start_server: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    install_kernel("short", "4G", "3s", prefix=tmp_path / "prefix")
    spec = tmp_path / "prefix" / "share" / "jupyter" / "kernels" / "short" / "kernel.json"
    doc = json.loads(spec.read_text())
    doc["metadata"]["kernel_provisioner"]["config"]["check_interval"] = 0.25
    spec.write_text(json.dumps(doc))
    server = start_server("--KernelRestarter.time_to_dead=0.5")
    status, model = server.request("POST", "/api/kernels", {"name": "short"})
    assert status == 201, model
    [lease] = chronos.leases()
    kernel_pid = lease.pid
    assert kernel_pid is not None

    def dropped() -> bool:
        return server.request("GET", "/api/kernels")[1] == []

    wait_for(dropped, timeout=30, interval=0.1, what="the server to drop the expired kernel")
    assert not psutil.pid_exists(kernel_pid) or psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE
    assert chronos.get_lease(lease.id).state == "expired"
    # Three restarter periods: no new kernel, no new lease. A fixed wait: the kernel's restarter, the one
    # thing in the server that could start it again, has been stopped, so it makes no polls to count.
    time.sleep(1.5)
    assert chronos.leases() == []
    assert [c for c in psutil.Process(server.process.pid).children() if c.status() != psutil.STATUS_ZOMBIE] == []
    log = server.log.read_text()
    assert f"lease {lease.id} has expired; start a new kernel to take a new lease" in log


def test_culled_kernel_releases_its_lease(start_server: Callable[..., Server], tmp_path: Path) -> None:
    # The culler runs only when the server-wide timeout is positive; the kernelspec's own
    # metadata.cull_idle_timeout then overrides it for kernels of that spec.
    install_kernel("gpu-cull", "4G", "1h", cull_idle="2s", prefix=tmp_path / "prefix")
    server = start_server(
        "--MappingKernelManager.cull_idle_timeout=3600", "--MappingKernelManager.cull_interval=1",
    )
    status, culled = server.request("POST", "/api/kernels", {"name": "gpu-cull"})
    assert status == 201, culled
    status, kept = server.request("POST", "/api/kernels", {"name": "gpu-8g"})
    assert status == 201, kept
    by_label = {lease.label: lease for lease in chronos.leases()}
    cull_lease = next(v for k, v in by_label.items() if k and culled["id"] in k)
    kept_lease = next(v for k, v in by_label.items() if k and kept["id"] in k)

    def gone() -> bool:
        return [k["id"] for k in server.request("GET", "/api/kernels")[1]] == [kept["id"]]

    wait_for(gone, timeout=30, interval=0.1, what="the idle culler to shut the kernel down")
    assert chronos.get_lease(cull_lease.id).state == "released"
    assert chronos.get_lease(kept_lease.id).state == "active"
    assert re.search(r"Culling '\w+' kernel 'gpu-cull' .* due to \d+ seconds of inactivity", server.log.read_text())


def _run_in_kernel(kernel_id: str, code: str) -> str:
    """Execute ``code`` in a running kernel of the server (through its connection file); its stdout."""
    from jupyter_client.blocking.client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(Path(os.environ["JUPYTER_RUNTIME_DIR"]) /
                                                      f"kernel-{kernel_id}.json"))
    client.load_connection_file()
    # A busy machine can miss one heartbeat (1 s by default), which this client would read as a dead kernel.
    client.hb_channel.time_to_dead = 20.0
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = client.execute_interactive(code, timeout=60, output_hook=lambda msg: out.append(
            msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""))
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        client.stop_channels()


_CHILDREN = """
import subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
in_group = subprocess.Popen(sleeper)
own_session = subprocess.Popen(sleeper, start_new_session=True)  # left the kernel's process group
print(in_group.pid, own_session.pid)
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "api-shutdown"])
def test_stopping_the_server_ends_every_kernel_its_processes_and_releases_the_leases(
    start_server: Callable[..., Server], how: str
) -> None:
    """JupyterHub stops a server with SIGINT first (stop button, API, idle culler), then SIGTERM."""
    server = start_server()
    kernels = [server.request("POST", "/api/kernels", {"name": "gpu-8g"})[1]["id"] for _ in range(2)]
    children = [int(pid) for pid in _run_in_kernel(kernels[0], _CHILDREN).split()]
    leases = chronos.leases()
    assert len(leases) == 2
    pids = [lease.pid for lease in leases] + children
    if how == "api-shutdown":
        assert server.request("POST", "/api/shutdown")[0] == 200
    else:
        server.process.send_signal(getattr(signal, how))
    server.process.wait(60)

    def gone(pid: int | None) -> bool:
        assert pid is not None
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    assert [pid for pid in pids if not gone(pid)] == [], server.log.read_text()
    assert {chronos.get_lease(lease.id).state for lease in leases} == {"released"}, server.log.read_text()


@contextmanager
def waiting_kernel_start(server: Server, kernel: str) -> Iterator[chronos.Lease]:
    """POST a kernel start on a raw connection held open while the block runs (the client waiting for the
    answer) and yield the request it queued; leaving the block closes the connection."""
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"name": kernel}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: token {server.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        [request] = wait_for(lambda: [x for x in chronos.leases() if x.state == "queued"], timeout=60,
                             what="the kernel's request in the queue")
        yield request


def test_a_client_that_gives_up_on_a_queued_start_withdraws_it(start_server: Callable[..., Server],
                                                               tmp_path: Path) -> None:
    install_kernel("gpu-wait", "8G", "1h", wait=True, prefix=tmp_path / "prefix")
    server = start_server()
    blocker = chronos.reserve("80G", "1h", gpus=2, bind=False)
    with waiting_kernel_start(server, "gpu-wait") as request:
        wait_for(lambda: "waits in the queue: request" in server.log.read_text(), timeout=30,
                 what=lambda: f"the queue position in the log:\n{server.log.read_text()}")
    # the client is gone: the request leaves the queue, and no kernel is started for nobody
    wait_for(lambda: chronos.get_lease(request.id).state == "withdrawn", timeout=30,
             what=lambda: f"the request to be withdrawn:\n{server.log.read_text()}")
    log = server.log.read_text()
    assert f"waits in the queue: request {request.id}, number 1 in line" in log
    assert "went away; its queued request" in log and "Traceback" not in log
    blocker.release()
    assert server.request("GET", "/api/kernels")[1] == []
    assert [x for x in chronos.leases() if x.state in ("active", "queued")] == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_server_stopped_while_a_kernel_start_waits_withdraws_the_request(
        start_server: Callable[..., Server], tmp_path: Path, signum: int) -> None:
    """The server (a hub's stop button, a service manager) exits under a kernel start that waits in the
    queue: the request is withdrawn by the server itself as it exits, not left for the next command to
    find its waiter gone."""
    install_kernel("gpu-wait", "8G", "1h", wait=True, prefix=tmp_path / "prefix")
    server = start_server()
    blocker = chronos.reserve("80G", "1h", gpus=2, bind=False)
    with waiting_kernel_start(server, "gpu-wait") as request:
        server.process.send_signal(signum)
        assert server.process.wait(timeout=60) is not None
    ended = chronos.get_lease(request.id)
    assert ended.state == "withdrawn", server.log.read_text()
    assert ended.end_reason is not None and ended.end_reason.startswith("released by"), \
        (ended.end_reason, server.log.read_text())
    assert "Traceback" not in server.log.read_text()
    blocker.release()


def test_a_kernel_that_waited_says_so_in_its_first_cell(start_server: Callable[..., Server], tmp_path: Path) -> None:
    install_kernel("gpu-wait", "8G", "1h", wait=True, prefix=tmp_path / "prefix")
    server = start_server()
    blocker = chronos.reserve("80G", "1h", gpus=2, bind=False)
    import threading

    started: list[tuple[int, Any]] = []
    thread = threading.Thread(target=lambda: started.append(server.request("POST", "/api/kernels",
                                                                           {"name": "gpu-wait"})))
    thread.start()
    wait_for(lambda: "waits in the queue: request" in server.log.read_text(), timeout=60, what="the wait")
    blocker.release()
    thread.join(60)
    [(status, model)] = started
    assert status == 201, model
    out = _run_in_kernel(model["id"], "print('hello')")
    assert out.startswith("chronos: this kernel waited ") and "in the queue for its lease" in out, out
    assert out.endswith("hello\n")

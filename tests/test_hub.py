"""A real JupyterHub, set up as docs/admin-guide.md says, with real OS users (one hub for the module).

The hub runs as root with ``configurable-http-proxy`` from the npm registry, a fixed-password
authenticator and the default LocalProcessSpawner; the users ``chrhub-ann`` and ``chrhub-ben`` are in
the GPU group, ``chrhub-out`` is not. Chronos is installed into the single-user environment (Debian's
``/usr/bin/python3`` in a virtual environment under /var/tmp) with the guide's own pip line, the
kernelspecs with the guide's own ``jupyter chronos install-kernel`` lines (under ``umask 077``), and
the state directory with the guide's own commands; see tests/hub_setup.py. Kernels are started
through the users' servers' REST API and driven over their websockets, through the hub's proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, run_cli
from tests.hub_setup import (
    Hub,
    Output,
    block_with,
    execute,
    guide_commands,
    run_commands,
    start_hub,
    stop_hub,
    user_venv,
)
from tests.os_users import CAN_RUN, WHY_NOT, OsUsers, run_as
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CAN_RUN or shutil.which("npm") is None,
                                                   reason=f"{WHY_NOT}, and npm")]


class Setup:
    """The module's hub and what the tests need to know about it."""

    def __init__(self, hub: Hub, users: dict[str, str], state: Path, config: Path, venv: Path) -> None:
        self.hub, self.users, self.state, self.config, self.venv = hub, users, state, config, venv

    def chronos(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` as root against the hub's ledger."""
        return run_cli(*args, env={"CHRONOS_CONFIG": str(self.config), "CHRONOS_STATE_DIR": str(self.state),
                                   "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "2x80G"})

    def leases(self, *extra: str) -> list[dict[str, Any]]:
        done = self.chronos("list", "--json", *extra)
        assert done.returncode == 0, done.stderr
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found

    def lease(self, lease_id: str) -> dict[str, Any]:
        done = self.chronos("show", lease_id, "--json")
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def as_user(self, who: str, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{self.venv}/bin:/usr/bin:/bin", "HOME": f"/home/{self.users[who]}",
               "CHRONOS_CONFIG": str(self.config), "CHRONOS_USER_CONFIG": "/nonexistent/user.toml",
               "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "2x80G", "NO_COLOR": "1"}
        return run_as(self.users[who], list(argv), env=env, cwd="/tmp")

    def kernel(self, who: str, name: str) -> str:
        status, model = self.hub.request("POST", f"/user/{self.users[who]}/api/kernels", {"name": name})
        assert status == 201, (status, model, self.hub.tail())
        kernel_id: str = model["id"]
        return kernel_id

    def run(self, who: str, kernel_id: str, code: str, timeout: float = 120, until: str | None = None) -> Output:
        return asyncio.run(execute(self.hub, self.users[who], kernel_id, code, timeout=timeout, until=until))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    accounts = OsUsers()
    home = tmp_path_factory.mktemp("hub")
    base = Path("/var/tmp") / f"chrhub-{os.getpid()}"
    hub: Hub | None = None
    try:
        gpu, admins = accounts.group("gpu"), accounts.group("admin")
        users = {who: accounts.user(who, home=True) for who in ("ann", "ben", "out")}
        venv = user_venv()
        state, etc = base / "lib" / "chronos", base / "etc" / "chronos"
        env = {**os.environ, "PATH": f"{venv}/bin:{os.environ['PATH']}"}
        replace = {"/opt/jupyterhub/bin/python": str(venv / "bin" / "python"),
                   "'chronos-gpu[jupyter]'": shlex.quote(f"{ROOT}[jupyter]"), "/var/lib/chronos": str(state),
                   "/etc/chronos": str(etc), "gpu-users": gpu, "chronos-admin": admins, "alice": users["ann"]}
        run_commands(guide_commands(block_with("bash", "pip install 'chronos-gpu[jupyter]'"), replace),
                     umask="022", env=env)
        # The state directory, as the guide makes it; its `usermod` line stands for each GPU user.
        state_block = guide_commands(block_with("bash", "init-state-dir"), replace)
        state_block += [c.replace(users["ann"], users["ben"]) for c in state_block if c.startswith("usermod")]
        run_commands(state_block, umask="022", env=env)
        # The kernelspecs, under an admin's strict umask: users must see them all the same.
        run_commands(guide_commands(block_with("bash", "install-kernel --name gpu-8g "), replace), umask="077", env=env)
        run_commands(["jupyter chronos install-kernel --name gpu-short --memory 1G --time 10s --sys-prefix"],
                     umask="077", env=env)
        short = venv / "share" / "jupyter" / "kernels" / "gpu-short" / "kernel.json"
        doc = json.loads(short.read_text())
        doc["metadata"]["kernel_provisioner"]["config"].update(warn_before="6s", check_interval=0.25)
        short.write_text(json.dumps(doc))
        # The guide's server-wide defaults, where it says they may live.
        server_config = venv / "etc" / "jupyter" / "jupyter_server_config.py"
        server_config.parent.mkdir(parents=True, exist_ok=True)
        server_config.write_text(block_with("python", "c.ChronosProvisioner.memory"))
        passwords = {name: f"pw-{name}-{os.getpid()}" for name in users.values()}
        hub = start_hub(home, venv, passwords, {
            "CHRONOS_CONFIG": str(etc / "config.toml"), "CHRONOS_USER_CONFIG": "/nonexistent/user.toml",
            "CHRONOS_BACKEND": "simulated", "CHRONOS_SIM_GPUS": "2x80G"})
        for name in users.values():
            hub.start_server(name)
        yield Setup(hub, users, state, etc / "config.toml", venv)
    finally:
        if hub is not None:
            stop_hub(hub)
        accounts.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_the_guides_checks_pass_for_a_member_and_an_outsider_is_told_the_group(setup: Setup) -> None:
    listed = setup.as_user("ann", "jupyter", "kernelspec", "provisioners")
    assert listed.returncode == 0, listed.stderr
    expected = block_with("console", "jupyter kernelspec provisioners")
    for line in expected.splitlines()[1:3]:
        assert line.strip() in {x.strip() for x in listed.stdout.splitlines()}, listed.stdout
    extensions = setup.as_user("ann", "jupyter", "server", "extension", "list")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", extensions.stdout + extensions.stderr)
    assert re.search(r"chronos_jupyter\s+enabled", plain), plain
    assert setup.as_user("ann", "chronos", "doctor").returncode == 0
    outside = setup.as_user("out", "chronos", "doctor")
    assert outside.returncode == 1 and f"members of group {setup.state.parent.name}" not in outside.stderr
    assert "is for members of group chrhub-gpu" in outside.stderr, outside.stderr
    assert setup.hub.login(setup.users["ann"], setup.hub.passwords[setup.users["ann"]]) == 302
    assert setup.hub.login(setup.users["ann"], "wrong") != 302


def test_every_user_sees_the_kernelspecs_under_distinct_names(setup: Setup) -> None:
    for who in ("ann", "out"):
        status, specs = setup.hub.request("GET", f"/user/{setup.users[who]}/api/kernelspecs")
        assert status == 200
        names = {name: spec["spec"]["display_name"] for name, spec in specs["kernelspecs"].items()}
        assert {"gpu-8g", "gpu-40g", "gpu-2x80", "gpu-short"} <= set(names), names
        assert len(set(names.values())) == len(names), names
    spec_dir = setup.venv / "share" / "jupyter" / "kernels" / "gpu-8g"
    assert stat.S_IMODE(spec_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((spec_dir / "kernel.json").stat().st_mode) == 0o644


def test_members_share_one_ledger_and_an_outsiders_kernel_is_refused_in_words(setup: Setup) -> None:
    ann = setup.kernel("ann", "gpu-8g")
    ben = setup.kernel("ben", "gpu-8g")
    owners = {lease["owner"] for lease in setup.leases()}
    assert {setup.users["ann"], setup.users["ben"]} <= owners
    status, reply = setup.hub.request("POST", f"/user/{setup.users['out']}/api/kernels", {"name": "gpu-8g"})
    assert status == 403, (status, reply)
    first, *rest = reply["message"].splitlines()
    assert first == "cannot start this kernel"
    assert "is for members of group chrhub-gpu" in " ".join(line.strip() for line in rest)
    for who, kernel in (("ann", ann), ("ben", ben)):
        assert setup.hub.request("DELETE", f"/user/{setup.users[who]}/api/kernels/{kernel}")[0] == 204
    log = setup.hub.log.read_text().splitlines()
    refused = [i for i, line in enumerate(log) if "Chronos refused a kernel start: cannot start this kernel" in line]
    assert len(refused) == 1, "\n".join(log[-40:])  # one line, once, with no traceback after it
    assert "is for members of group chrhub-gpu: ask an admin to add you" in log[refused[0]]
    assert not log[refused[0] + 1].startswith((" ", "\t", "Traceback"))


def test_release_inside_a_gpu_kernel_is_refused_with_the_way_out(setup: Setup) -> None:
    kernel = setup.kernel("ann", "gpu-8g")
    [lease] = [x for x in setup.leases() if kernel in (x["label"] or "")]
    out = setup.run("ann", kernel, "%chronos release")
    assert out.idle and "releasing it stops this kernel" in out.text and "--stop-kernel" in out.text, out
    assert setup.lease(lease["id"])["state"] == "active"
    assert setup.hub.request("DELETE", f"/user/{setup.users['ann']}/api/kernels/{kernel}")[0] == 204
    assert setup.lease(lease["id"])["state"] == "released"


def test_the_end_of_a_kernels_lease_reaches_its_notebook_and_the_next_kernel_says_so(setup: Setup) -> None:
    user = setup.users["ben"]
    session = {"path": "end.ipynb", "type": "notebook", "kernel": {"name": "gpu-short"}}
    status, model = setup.hub.request("POST", f"/user/{user}/api/sessions", session)
    assert status == 201, model
    kernel = model["kernel"]["id"]
    [lease] = [x for x in setup.leases() if kernel in (x["label"] or "")]
    out = setup.run("ben", kernel, "%chronos status\nimport time; time.sleep(120)", timeout=60,
                    until="this kernel is being stopped")
    assert f"chronos: lease {lease['id']} ends in " in out.text, out
    assert "this kernel is being stopped and its variables are lost" in out.text, out
    wait_for(lambda: setup.lease(lease["id"])["state"] == "expired", timeout=30, what="the lease to expire")

    def gone() -> bool:
        return kernel not in [k["id"] for k in setup.hub.request("GET", f"/user/{user}/api/kernels")[1]]

    wait_for(gone, timeout=60, interval=0.2, what="the server to drop the ended kernel")
    status, again = setup.hub.request("POST", f"/user/{user}/api/sessions", session)
    assert status == 201 and again["kernel"]["id"] != kernel
    first = setup.run("ben", again["kernel"]["id"], "print('ran')")
    assert first.errors and "new kernel, with a new lease" in first.errors[0] and "ran" not in first.text, first
    assert "ran" in setup.run("ben", again["kernel"]["id"], "print('ran')").text
    assert setup.hub.request("DELETE", f"/user/{user}/api/sessions/{again['id']}")[0] == 204


def test_a_queued_start_whose_client_goes_away_is_withdrawn(setup: Setup) -> None:
    blocker = setup.chronos("reserve", "75G", "1h", "--gpus", "2", "--json")
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = json.loads(blocker.stdout)["id"]
    try:
        user = setup.users["ben"]
        body = json.dumps({"name": "gpu-40g"}).encode()
        port = int(setup.hub.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST /user/{user}/api/kernels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Authorization: token {setup.hub.token}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            [queued] = wait_for(lambda: [x for x in setup.leases() if x["state"] == "queued"], timeout=60,
                                what="the kernel's request in the queue")
            assert queued["owner"] == user
        wait_for(lambda: setup.lease(queued["id"])["state"] == "withdrawn", timeout=60,
                 what="the request to be withdrawn once its client went away")
        log = setup.hub.log.read_text()
        assert f"waits in the queue: request {queued['id']}, number 1 in line" in log
        assert "its client went away; its queued request was withdrawn" in log
    finally:
        assert setup.chronos("release", blocker_id).returncode == 0
    assert [x for x in setup.leases() if x["state"] in ("queued", "active") and x["owner"] == user] == []


CHILDREN = """
import subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
print(subprocess.Popen(sleeper).pid, subprocess.Popen(sleeper, start_new_session=True).pid)
"""


def test_stopping_a_server_through_the_hub_ends_its_kernels_processes_and_leases(setup: Setup) -> None:
    user = setup.users["ann"]
    kernels = [setup.kernel("ann", "gpu-8g") for _ in range(2)]
    children = [int(pid) for pid in setup.run("ann", kernels[0], CHILDREN).text.split()]
    leases = [x for x in setup.leases() if x["owner"] == user and x["state"] == "active"]
    assert len(leases) == 2
    pids = [x["pid"] for x in leases] + children
    setup.hub.stop_server(user)  # the hub: SIGINT, then SIGTERM after its interrupt_timeout

    def alive(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    wait_for(lambda: not [p for p in pids if alive(p)], timeout=30, what="the kernels and their children to end")
    assert {setup.lease(x["id"])["state"] for x in leases} == {"released"}, setup.hub.tail()
    setup.hub.start_server(user)

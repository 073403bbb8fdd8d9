"""The REST API of the Jupyter Server extension, through a real Jupyter Server (pytest-jupyter).

The server runs in this process, as this OS user, on this test's ledger and simulated GPUs;
kernels are started through its own REST API from Chronos kernelspecs. Permissions between OS
users are tested with a second server run as another user in tests/test_server_extension_users.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.auth.authorizer import Authorizer
from tornado.httpclient import HTTPClientError, HTTPResponse

import chronos
from chronos.api import reset_default_engine
from chronos.identity import current_user
from chronos.request import parse_request
from chronos_jupyter.kernelspec import install_kernel
from chronos_jupyter.server import HTTP_STATUS

Fetch = Callable[..., Awaitable[HTTPResponse]]
GIB = 1 << 30


class ReadOnly(Authorizer):
    """A user who may look but not change anything (as a read-only share of a server would be)."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return action == "read"


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"chronos_jupyter": True}}}


READ_ONLY = {"ServerApp": {"jpserver_extensions": {"chronos_jupyter": True}, "authorizer_class": ReadOnly}}


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "1x16G")
    reset_default_engine()


@pytest.fixture
def kernels(jp_environ: None, jp_data_dir: Path, gpus: None) -> Path:
    """Chronos kernelspecs in the server's data directory (``--user``, as a user would install them)."""
    install_kernel("gpu-4g", "4G", "1h", user=True)
    install_kernel("gpu-12g", "12G", "30m", user=True, wait="forever")
    install_kernel("gpu-bad", "4G", "1h", user=True)
    spec = jp_data_dir / "kernels" / "gpu-bad" / "kernel.json"
    doc = json.loads(spec.read_text())
    doc["metadata"]["kernel_provisioner"]["config"]["priority"] = "urgent"
    spec.write_text(json.dumps(doc))
    return jp_data_dir


async def call(fetch: Fetch, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
    try:
        reply = await fetch(*path.split("/"), method=method, body=data, allow_nonstandard_methods=True, **kwargs)
    except HTTPClientError as exc:
        assert exc.response is not None
        return exc.code, json.loads(exc.response.body or b"null")
    return reply.code, json.loads(reply.body or b"null")


async def status(fetch: Fetch) -> dict[str, Any]:
    code, doc = await call(fetch, "GET", "chronos/api/status")
    assert code == 200, doc
    return doc  # type: ignore[no-any-return]


def test_the_extension_is_found_where_jupyter_looks() -> None:
    import chronos_jupyter

    assert chronos_jupyter._jupyter_server_extension_points() == [{"module": "chronos_jupyter"}]
    config = Path(__file__).parent.parent / "jupyter-config" / "jupyter_server_config.d" / "chronos_jupyter.json"
    assert json.loads(config.read_text()) == {"ServerApp": {"jpserver_extensions": {"chronos_jupyter": True}}}
    # Every exit code of the CLI has its HTTP status.
    assert {int(code) for code in HTTP_STATUS.values()} == {400, 403, 404, 409, 503}


async def test_status_shows_the_gpus_my_leases_the_queue_and_each_kernelspec(jp_fetch: Fetch, kernels: Path) -> None:
    doc = await status(jp_fetch)
    assert doc["user"] == current_user().name  # the OS user the server runs as
    [gpu] = doc["gpus"]
    assert gpu["total_bytes"] == 16 * GIB and gpu["free_bytes"] == 16 * GIB and gpu["reserved_bytes"] == 0
    assert doc["leases"] == [] and doc["queue"] == [] and doc["kernels"] == []
    specs = {spec["name"]: spec for spec in doc["kernelspecs"]}
    assert set(specs) == {"gpu-4g", "gpu-12g", "gpu-bad"}  # pytest-jupyter's echo kernel is no Chronos kernel
    assert specs["gpu-4g"]["forecast"]["fits_now"] and specs["gpu-4g"]["summary"] == "4 GiB for 1h"
    assert specs["gpu-4g"]["display_name"] == "Python 3 (GPU 4 GiB, 1h)"
    assert specs["gpu-bad"]["forecast"] is None and "urgent" in specs["gpu-bad"]["problem"]

    held = chronos.reserve("8G", "20m", bind=False)
    doc = await status(jp_fetch)
    specs = {spec["name"]: spec for spec in doc["kernelspecs"]}
    big = specs["gpu-12g"]["forecast"]
    assert not big["fits_now"] and big["position"] == 1
    assert held.expires_at is not None and big["estimated_start"] == pytest.approx(held.expires_at, abs=1)
    [mine] = doc["leases"]
    assert mine["id"] == held.id and mine["cap_bytes"] == 8 * GIB and mine["warn_at"] == [600.0, 60.0]
    assert doc["now"] == pytest.approx(time.time(), abs=5)


async def test_a_kernel_is_matched_to_its_own_lease_and_to_leases_its_process_holds(jp_fetch: Fetch,
                                                                                 kernels: Path) -> None:
    code, model = await call(jp_fetch, "POST", "api/kernels", {"name": "gpu-4g"})
    assert code == 201, model
    try:
        [own] = chronos.leases()
        assert own.pid is not None
        # A `%chronos reserve` in the kernel binds a lease to the kernel's process: the same as this.
        magic = chronos.reserve("1G", "10m", bind=own.pid, label="magic")
        doc = await status(jp_fetch)
        [kernel] = doc["kernels"]
        assert kernel["kernel_id"] == model["id"] and kernel["kernel_name"] == "gpu-4g"
        assert kernel["lease_ids"] == [own.id, magic.id] and kernel["own_lease_id"] == own.id
        assert kernel["on_expiry"] == "terminate" and not kernel["starting"]
        by_id = {lease["id"]: lease for lease in doc["leases"]}
        assert by_id[own.id]["label"] == f"jupyter gpu-4g {model['id']}"
        assert by_id[own.id]["warn_at"] == [600.0, 60.0]  # the kernelspec's warn_before (10m) and a minute
    finally:
        await call(jp_fetch, "DELETE", f"api/kernels/{model['id']}")
    assert chronos.get_lease(own.id).state == "released"


async def test_extend_moves_the_end_and_bad_input_is_one_line(jp_fetch: Fetch, gpus: None) -> None:
    lease = chronos.reserve("4G", "1h", bind=False)
    assert lease.expires_at is not None
    code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/{lease.id}/extend", {"duration": "30m"})
    assert code == 200 and reply["expires_at"] == pytest.approx(lease.expires_at + 1800)
    assert chronos.get_lease(lease.id).expires_at == pytest.approx(lease.expires_at + 1800)
    code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/L{lease.id}/extend", {"duration": 60})
    assert code == 200 and reply["expires_at"] == pytest.approx(lease.expires_at + 1860)

    cases = [
        ({"duration": "soon"}, 400, "cannot read duration 'soon': use 2h, 90m, 1h30m, 45s, 1d or seconds"),
        ({"duration": -5}, 400, "duration must be more than 0, got -5"),
        ({"duration": True}, 400, 'say how long to extend by, e.g. {"duration": "30m"}'),
        ({}, 400, 'say how long to extend by, e.g. {"duration": "30m"}'),
        (["30m"], 400, 'say how long to extend by, e.g. {"duration": "30m"}'),
        ("not json", 400, 'the body must be JSON such as {"duration": "30m"}'),
        ({"duration": "1" * 100}, 400, "duration is too long: write it as 30m, 1h or 1h30m (at most 32 characters)"),
        ({"duration": "30m", "pad": "x" * 5000}, 400,
         'the body is too long: send {"duration": "30m"} (at most 1024 bytes)'),
    ]
    for body, expected, message in cases:
        code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/{lease.id}/extend", body)
        assert (code, reply["message"], reply["exit_code"]) == (expected, message, 2), body
    for lease_id in ("999", "x", "9" * 30):
        code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/{lease_id}/extend", {"duration": "1m"})
        assert code == 404 and reply["exit_code"] == 5 and reply["message"].startswith("no lease")
        assert "\n" not in reply["message"]


async def test_an_extension_that_would_delay_the_queue_is_refused_as_the_cli_refuses_it(jp_fetch: Fetch,
                                                                                        gpus: None) -> None:
    lease = chronos.reserve("16G", "10m", bind=False)
    engine = chronos.api.default_engine()
    # A request waits in the queue behind the lease (its waiter is a thread of this process).
    waiting = threading.Thread(target=lambda: _quietly(engine.submit, parse_request("8G", "1h", wait="20s"),
                                                       bind=False), daemon=True)
    waiting.start()
    try:
        deadline = time.monotonic() + 10
        while not chronos.queue() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/{lease.id}/extend", {"duration": "1h"})
        assert code == 409 and reply["exit_code"] == 3
        assert reply["message"].startswith(f"cannot extend lease {lease.id}: it would delay queued request")
    finally:
        lease.release()
        waiting.join(20)


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except chronos.ChronosError:
        pass


async def test_release_ends_the_lease_and_an_ended_lease_cannot_be_extended(jp_fetch: Fetch, gpus: None) -> None:
    lease = chronos.reserve("4G", "1h", bind=False)
    code, reply = await call(jp_fetch, "DELETE", f"chronos/api/leases/{lease.id}")
    assert code == 200 and reply["state"] == "released"
    assert chronos.get_lease(lease.id).state == "released"
    code, reply = await call(jp_fetch, "DELETE", f"chronos/api/leases/{lease.id}")
    assert code == 200 and reply["state"] == "released"  # releasing again changes nothing, as in the CLI
    code, reply = await call(jp_fetch, "POST", f"chronos/api/leases/{lease.id}/extend", {"duration": "1m"})
    assert code == 409 and reply["message"] == f"lease {lease.id} has ended (released); reserve a new one"
    code, reply = await call(jp_fetch, "DELETE", "chronos/api/leases/12345")
    assert code == 404 and reply["message"] == "no lease 12345; see `chronos list --all`"
    doc = await status(jp_fetch)
    assert [item["id"] for item in doc["ended"]] == [lease.id]


async def test_a_configured_limit_shows_in_the_kernelspec_forecast(jp_fetch: Fetch, kernels: Path,
                                                                   chronos_env: Path) -> None:
    Path(os.environ["CHRONOS_CONFIG"]).write_text('[limits]\nmax_memory_per_lease = "8G"\n')
    reset_default_engine()
    doc = await status(jp_fetch)
    big = next(spec for spec in doc["kernelspecs"] if spec["name"] == "gpu-12g")["forecast"]
    assert big["exit_code"] == 4 and "more than the maximum of 8 GiB per lease" in big["error"]


async def test_cookie_sessions_need_the_xsrf_token_as_jupyter_s_own_handlers_do(
        jp_fetch: Fetch, jp_serverapp: Any, http_server_client: Any, jp_base_url: str, gpus: None) -> None:
    lease = chronos.reserve("4G", "1h", bind=False)
    token = jp_serverapp.identity_provider.token
    login = await http_server_client.fetch(f"{jp_base_url}?{urllib.parse.urlencode({'token': token})}",
                                           follow_redirects=False, raise_error=False)
    cookies = {}
    for header in login.headers.get_list("Set-Cookie"):
        name, _, rest = header.partition("=")
        cookies[name] = rest.split(";")[0]
    xsrf = cookies["_xsrf"]
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    path = f"{jp_base_url}chronos/api/leases/{lease.id}/extend"
    body = json.dumps({"duration": "1m"})
    refused = await http_server_client.fetch(path, method="POST", body=body, headers={"Cookie": cookie},
                                             raise_error=False)
    assert refused.code == 403
    assert chronos.get_lease(lease.id).expires_at == lease.expires_at
    allowed = await http_server_client.fetch(path, method="POST", body=body, raise_error=False,
                                             headers={"Cookie": cookie, "X-XSRFToken": xsrf})
    assert allowed.code == 200, allowed.body
    # Without any credentials, nothing is answered.
    anonymous = await http_server_client.fetch(f"{jp_base_url}chronos/api/status", raise_error=False)
    assert anonymous.code == 403


@pytest.mark.parametrize("jp_server_config", [READ_ONLY])
async def test_the_server_s_authorizer_decides_who_may_change_leases(jp_fetch: Fetch, gpus: None) -> None:
    lease = chronos.reserve("4G", "1h", bind=False)
    doc = await status(jp_fetch)  # reading is allowed
    assert [item["id"] for item in doc["leases"]] == [lease.id]
    for method, path, body in (("POST", f"chronos/api/leases/{lease.id}/extend", {"duration": "1m"}),
                               ("DELETE", f"chronos/api/leases/{lease.id}", None)):
        code, reply = await call(jp_fetch, method, path, body)
        assert code == 403 and reply["message"] == "User is not authorized to write on resource: kernels."
    assert chronos.get_lease(lease.id).state == "active"

"""The Jupyter Server extension: Chronos's REST API under the server's base URL, for the lab extension.

``GET chronos/api/status`` is the machine as the server's user sees it (:mod:`chronos.status`)
plus the Jupyter facts (:mod:`chronos_jupyter.kernels`): which kernel holds which lease, and for
every Chronos kernelspec whether it fits now or when it would start. ``POST
chronos/api/leases/ID/extend`` (``{"duration": "30m"}``) and ``DELETE chronos/api/leases/ID`` act
on a lease. The server runs as one OS user, and every call is made as that user, so the
permissions are the CLI's: your own leases, or any lease for an admin. Mistakes come back as JSON
``{"message": ..., "exit_code": ...}`` with the HTTP status that fits the CLI's exit code.

Handlers are Jupyter's own ``APIHandler`` (authenticated, XSRF-checked for POST and DELETE) and
authorized against the ``kernels`` resource: stopping a kernel's lease stops the kernel, so
whoever may manage kernels may manage their leases.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

import chronos
from chronos import errors
from chronos import status as machine
from chronos.api import default_engine
from chronos.lease import Lease
from chronos.request import parse_lease_id
from chronos_jupyter import server_hooks
from chronos_jupyter.kernels import chronos_kernelspecs, kernel_leases, warning_marks
from chronos_jupyter.threads import in_thread

__all__ = ["HTTP_STATUS", "load_jupyter_server_extension", "status_document"]

#: The HTTP status for each CLI exit code.
HTTP_STATUS = {
    errors.EXIT_BAD_INPUT: HTTPStatus.BAD_REQUEST,
    errors.EXIT_NOT_ALLOWED: HTTPStatus.FORBIDDEN,
    errors.EXIT_NO_SUCH_LEASE: HTTPStatus.NOT_FOUND,
    errors.EXIT_UNAVAILABLE: HTTPStatus.CONFLICT,
    errors.EXIT_ERROR: HTTPStatus.SERVICE_UNAVAILABLE,
}
#: The longest duration text an extension request may carry (``"1h30m"`` is 5), and the longest body.
MAX_DURATION_TEXT = 32
MAX_BODY = 1024
#: Lease ids in URLs: a number (``7``) or the CLI's ``L7``; anything longer is no lease.
_ID = r"(?P<lease_id>[^/]{1,32})"


async def status_document(serverapp: Any) -> dict[str, Any]:
    """Everything ``GET chronos/api/status`` answers, as JSON-ready data."""
    specs = await ensure_async(serverapp.kernel_spec_manager.get_all_specs())
    kernelspecs = chronos_kernelspecs(specs, serverapp.config)
    requests = {k.name: k.request for k in kernelspecs if k.request is not None}
    marks = warning_marks(serverapp.kernel_manager)
    engine = default_engine()
    status = await in_thread(machine.machine_status, engine, requests=requests, warn_at=marks)
    on_expiry = str(engine.on_expiry)
    kernels = await kernel_leases(serverapp.kernel_manager, getattr(serverapp, "session_manager", None),
                                  [item.lease for item in status.leases], on_expiry,
                                  getattr(serverapp, "root_dir", None))
    document = status.to_dict()
    document["kernels"] = [kernel.to_dict() for kernel in kernels]
    document["kernelspecs"] = [
        {"name": k.name, "display_name": k.display_name, "summary": k.summary, "problem": k.problem,
         "forecast": status.forecasts[k.name].to_dict() if k.name in status.forecasts else None}
        for k in kernelspecs
    ]
    del document["forecasts"]
    document["on_expiry"] = on_expiry
    document["version"] = chronos.__version__
    return document


class ChronosHandler(APIHandler):
    """Shared error handling: a Chronos mistake is one JSON line with the status its exit code maps to."""

    auth_resource = "kernels"

    def fail(self, exc: errors.ChronosError) -> None:
        code = HTTP_STATUS.get(exc.exit_code, HTTPStatus.SERVICE_UNAVAILABLE)
        self.set_status(int(code))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": str(exc), "reason": code.phrase, "exit_code": exc.exit_code}))

    def bad_input(self, message: str) -> None:
        self.fail(errors.InvalidRequestError(message))

    def reply(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(payload))

    def lease_id(self, raw: str) -> str | None:
        try:
            return parse_lease_id(raw)
        except errors.ChronosError as exc:
            self.fail(exc)
            return None


class StatusHandler(ChronosHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            document = await status_document(self.serverapp)
        except errors.ChronosError as exc:
            self.fail(exc)
            return
        self.reply(document)


class ExtendHandler(ChronosHandler):
    @web.authenticated
    @authorized
    async def post(self, lease_id: str) -> None:
        key = self.lease_id(lease_id)
        if key is None:
            return
        if len(self.request.body) > MAX_BODY:
            self.bad_input(f'the body is too long: send {{"duration": "30m"}} (at most {MAX_BODY} bytes)')
            return
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            self.bad_input('the body must be JSON such as {"duration": "30m"}')
            return
        duration = body.get("duration") if isinstance(body, dict) else None
        if isinstance(duration, bool) or not isinstance(duration, (str, int, float)):
            self.bad_input('say how long to extend by, e.g. {"duration": "30m"}')
            return
        if isinstance(duration, str) and len(duration) > MAX_DURATION_TEXT:
            self.bad_input(f"duration is too long: write it as 30m, 1h or 1h30m (at most {MAX_DURATION_TEXT} "
                           "characters)")
            return
        try:
            lease: Lease = await in_thread(default_engine().extend, key, duration)
        except errors.ChronosError as exc:
            self.fail(exc)
            return
        self.reply(lease.to_dict())


class LeaseHandler(ChronosHandler):
    @web.authenticated
    @authorized
    async def delete(self, lease_id: str) -> None:
        key = self.lease_id(lease_id)
        if key is None:
            return
        try:
            lease: Lease = await in_thread(default_engine().release, key)
        except errors.ChronosError as exc:
            self.fail(exc)
            return
        self.reply(lease.to_dict())


def load_jupyter_server_extension(serverapp: Any) -> None:
    """Add the handlers under the server's base URL (``jupyter server extension list`` shows it)."""
    base = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(".*$", [
        (url_path_join(base, "chronos/api/status"), StatusHandler),
        (url_path_join(base, f"chronos/api/leases/{_ID}/extend"), ExtendHandler),
        (url_path_join(base, f"chronos/api/leases/{_ID}"), LeaseHandler),
    ])
    serverapp.log.info("Chronos: REST API at %s", url_path_join(base, "chronos/api/"))
    server_hooks.install(serverapp)

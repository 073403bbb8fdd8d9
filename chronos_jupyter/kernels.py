"""What a Jupyter server knows about Chronos: which kernel holds which lease, and the Chronos kernelspecs.

Kernels are matched to leases from the server's own facts, never by a rule of our own: a kernel
started by the Chronos provisioner names its lease in its provisioner info (``chronos_lease_id``);
a lease taken with ``%chronos reserve`` is held by the kernel's process, so its holder is the
kernel's pid (with its start time, as everywhere in Chronos); and a kernel still being started is
a provisioner in this process waiting for its lease, whose queued lease carries the kernel's label
(:func:`~chronos_jupyter.provisioner.kernel_label`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jupyter_core.utils import ensure_async
from traitlets import TraitError

from chronos import procs
from chronos.enforce.watchdog import DEFAULT_WARN_AT
from chronos.errors import ChronosError
from chronos.lease import Lease
from chronos.request import RequestSpec
from chronos.units import format_bytes, format_duration
from chronos_jupyter.provisioner import ChronosProvisioner, kernel_label

__all__ = ["ChronosKernelspec", "KernelLeases", "api_path", "chronos_kernelspecs", "kernel_leases", "warning_marks"]

#: The provisioner settings a kernelspec's ``metadata.kernel_provisioner.config`` may give.
_SETTINGS = frozenset(ChronosProvisioner.class_trait_names(config=True)) | {"wait"}


@dataclass(frozen=True)
class KernelLeases:
    """One kernel (running or still starting) and the leases it holds or waits for, its own first."""

    kernel_id: str
    kernel_name: str
    path: str | None
    lease_ids: tuple[str, ...]
    starting: bool = False
    #: The lease the provisioner took for this kernel (None for a kernel of another kernelspec).
    own_lease_id: str | None = None
    #: What the provisioner does to the kernel when its own lease ends or is released (None: not a Chronos kernel).
    on_expiry: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "kernel_name": self.kernel_name, "path": self.path,
                "lease_ids": list(self.lease_ids), "starting": self.starting, "own_lease_id": self.own_lease_id,
                "on_expiry": self.on_expiry}


@dataclass(frozen=True)
class ChronosKernelspec:
    """A kernelspec that starts its kernels through the Chronos provisioner, and the lease each asks for."""

    name: str
    display_name: str
    request: RequestSpec | None
    problem: str | None = None

    @property
    def summary(self) -> str:
        """``8 GiB for 2h`` (``2 GPUs x 8 GiB for 2h``); empty when the kernelspec is unusable."""
        spec = self.request
        if spec is None:
            return ""
        size = format_bytes(spec.memory.nbytes) if spec.memory.nbytes is not None else str(spec.memory)
        count = f"{spec.count} GPUs x " if spec.count > 1 else ""
        length = f" for {format_duration(spec.duration_s)}" if spec.duration_s is not None else ""
        return f"{count}{size}{length}"


def _provisioner(config: Mapping[str, Any], server_config: Any) -> ChronosProvisioner:
    """A provisioner built as jupyter_client builds one for a kernel: server config, then kernel.json."""
    known = {key: value for key, value in config.items() if key in _SETTINGS}
    return ChronosProvisioner(config=server_config, **known)


def chronos_kernelspecs(specs: Mapping[str, Any], server_config: Any = None) -> list[ChronosKernelspec]:
    """The Chronos kernelspecs among ``specs`` (``KernelSpecManager.get_all_specs()``), by name.

    A kernelspec whose settings cannot be read is listed with ``problem`` saying why, in the words a
    kernel start from it would fail with.
    """
    out = []
    for name in sorted(specs):
        spec = (specs[name] or {}).get("spec") or {}
        provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
        if not isinstance(provisioner, dict) or provisioner.get("provisioner_name") != "chronos":
            continue
        display = str(spec.get("display_name") or name)
        config = provisioner.get("config") or {}
        unknown = sorted(str(key) for key in config if key not in _SETTINGS) if isinstance(config, dict) else []
        try:
            if not isinstance(config, dict):
                raise ValueError("metadata.kernel_provisioner.config must be an object")
            request: RequestSpec | None = _provisioner(config, server_config).request()
            problem = f"ignores unknown setting(s) {', '.join(unknown)}" if unknown else None
        except (ChronosError, TraitError, ValueError, TypeError) as exc:
            request, problem = None, str(exc).splitlines()[0][:300]
        out.append(ChronosKernelspec(name, display, request, problem))
    return out


def warning_marks(kernel_manager: Any) -> dict[str, tuple[float, ...]]:
    """The warning marks of every Chronos kernel's own lease, by lease id (others warn at the default)."""
    out: dict[str, tuple[float, ...]] = {}
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        with contextlib.suppress(KeyError):
            provisioner = getattr(kernel_manager.get_kernel(kernel_id), "provisioner", None)
            if isinstance(provisioner, ChronosProvisioner) and provisioner.lease_id is not None:
                out[provisioner.lease_id] = provisioner.warning_marks() or DEFAULT_WARN_AT
    return out


def api_path(path: str | None, root_dir: str | None) -> str | None:
    """A session's file path as the front end names it: relative to the server's root, ``/``-separated.

    Jupyter Server hands a kernel its notebook's path on disk (``JPY_SESSION_NAME``).
    """
    if not path or not root_dir or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, root_dir)
    return path if relative.startswith("..") else relative.replace(os.sep, "/")


async def kernel_leases(kernel_manager: Any, session_manager: Any, leases: Iterable[Lease],
                        on_expiry: str | None = None, root_dir: str | None = None) -> list[KernelLeases]:
    """Every kernel of this server, running or starting, with the leases it holds or waits for.

    ``leases`` are the live leases to match against (a user's own, from the machine status);
    ``on_expiry`` is the machine's default action, for provisioners that set none; ``root_dir`` the
    server's root, against which a starting kernel's notebook path is given.
    """
    live = list(leases)
    paths: dict[str, str] = {}
    if session_manager is not None:
        with contextlib.suppress(Exception):
            for session in await ensure_async(session_manager.list_sessions()):
                kernel = session.get("kernel") or {}
                if kernel.get("id") and session.get("path"):
                    paths[str(kernel["id"])] = str(session["path"])
    out = []
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            manager = kernel_manager.get_kernel(kernel_id)
        except KeyError:
            continue
        provisioner = getattr(manager, "provisioner", None)
        info: dict[str, Any] = {}
        if provisioner is not None:
            with contextlib.suppress(Exception):
                info = dict(await provisioner.get_provisioner_info())
        own = info.get("chronos_lease_id")
        own_id = str(own) if own is not None else None
        pid = info.get("pid")
        held = [own_id] if own_id is not None else []
        if isinstance(pid, int):
            held += [lease.id for lease in live
                     if lease.pid == pid and lease.id not in held and procs.is_alive(pid, lease.pid_start)]
        policy = None
        if isinstance(provisioner, ChronosProvisioner):
            policy = str(provisioner.on_expiry or on_expiry or "") or None
        out.append(KernelLeases(str(kernel_id), str(getattr(manager, "kernel_name", "") or ""), paths.get(kernel_id),
                                tuple(held), own_lease_id=own_id, on_expiry=policy))
    by_label = {lease.label: lease.id for lease in live if lease.label}
    for provisioner in ChronosProvisioner.starting():
        kernel_id = str(provisioner.kernel_id or "")
        name = str(getattr(provisioner.parent, "kernel_name", "") or "")
        waiting = by_label.get(kernel_label(name, kernel_id))
        out.append(KernelLeases(kernel_id, name, api_path(provisioner.session_path, root_dir),
                                (waiting,) if waiting else (),
                                starting=True, own_lease_id=waiting,
                                on_expiry=str(provisioner.on_expiry or on_expiry or "") or None))
    return out

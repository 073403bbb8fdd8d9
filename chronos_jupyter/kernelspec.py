"""Install kernel specs whose kernels run inside a Chronos lease.

``jupyter chronos install-kernel --name gpu-8g --memory 8G --time 2h`` writes a
kernel.json that launches the current Python's ipykernel through the ``chronos``
kernel provisioner, so every kernel started from it takes its own lease.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from chronos.errors import ChronosError, InvalidRequestError, NotAllowedError
from chronos.model import Action, OnIdle, Priority
from chronos.request import FOREVER, parse_request
from chronos.units import duration_text, format_bytes, format_duration, parse_duration, parse_memory

__all__ = ["default_display_name", "install_kernel", "kernel_json", "main"]

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def _check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_OK:
        raise InvalidRequestError(
            f"invalid kernel name {name!r}: use letters, digits, '-', '.' and '_' (e.g. gpu-8g)"
        )
    return name.lower()


def kernel_json(
    *,
    memory: str | int | float,
    duration: str | int | float,
    display_name: str,
    gpus: int | None = None,
    device: int | str | Sequence[int] | None = None,
    priority: str | None = None,
    wait: str | int | float | bool | None = None,
    on_expiry: str | None = None,
    cull_idle: str | int | float | None = None,
    python: str | None = None,
    idle_after: str | int | float | None = None,
    on_idle: str | None = None,
) -> dict[str, Any]:
    """The kernel.json document, with every value validated (InvalidRequestError on bad input)."""
    if gpus is not None and device is not None:
        raise InvalidRequestError("give either --gpus (how many) or --device (which ones), not both")
    spec = parse_request(memory, duration, device=device, gpus=gpus, priority=priority, wait=wait,
                         idle_after=idle_after, on_idle=on_idle)
    if spec.on_idle is not None and spec.idle_after_s is None:
        raise InvalidRequestError("--on-idle needs --idle-after (how long a kernel may use no GPU time)")
    assert spec.duration_s is not None
    config: dict[str, Any] = {
        "memory": memory.strip() if isinstance(memory, str) else memory,  # the admin's own spelling
        "duration": duration_text(spec.duration_s),
    }
    if spec.gpus is not None:
        config["gpus"] = spec.gpus
    if spec.devices is not None:
        config["device"] = spec.devices[0] if len(spec.devices) == 1 else list(spec.devices)
    if spec.priority is not None:
        config["priority"] = str(spec.priority)
    if spec.wait_s is not None:
        config["wait"] = True if spec.wait_s == FOREVER else duration_text(spec.wait_s)
    if on_expiry is not None:
        config["on_expiry"] = str(Action.parse(on_expiry, "on-expiry action"))
    if spec.idle_after_s is not None:
        config["idle_after"] = duration_text(spec.idle_after_s)
        config["on_idle"] = str(spec.on_idle or "release")
    metadata: dict[str, Any] = {
        "kernel_provisioner": {"provisioner_name": "chronos", "config": config},
        "debugger": True,
    }
    if cull_idle is not None:
        # Read by jupyter_server's MappingKernelManager culler (per-kernelspec override).
        metadata["cull_idle_timeout"] = int(parse_duration(cull_idle))
    return {
        "argv": [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


def default_display_name(doc: dict[str, Any]) -> str:
    """The launcher's label for a kernel.json: every setting a user would choose by is in it.

    Two kernelspecs that differ in waiting, culling, the action at the end, priority or devices must
    not look alike in the launcher, so each of those that is set is named.
    """
    meta = doc["metadata"]
    config = meta["kernel_provisioner"]["config"]
    mem = parse_memory(config["memory"])
    size = format_bytes(mem.nbytes) if mem.nbytes is not None else str(mem)
    gpus, device = config.get("gpus"), config.get("device")
    if device is not None:
        devices = device if isinstance(device, list) else [device]
        where = f"GPU {','.join(map(str, devices))}: {size}" + (" each" if len(devices) > 1 else "")
    elif gpus and gpus > 1:
        where = f"{gpus} GPUs x {size}"
    else:
        where = f"GPU {size}"
    parts = [where, format_duration(parse_duration(config["duration"]))]
    if "priority" in config:
        parts.append(f"{config['priority']} priority")
    wait = config.get("wait")
    if wait is True:
        parts.append("waits for a free GPU")
    elif wait:
        parts.append(f"waits up to {format_duration(parse_duration(wait))}")
    if "cull_idle_timeout" in meta:
        parts.append(f"culled after {format_duration(meta['cull_idle_timeout'])} idle")
    if "idle_after" in config:
        parts.append(f"GPU idle {format_duration(parse_duration(config['idle_after']))}: {config['on_idle']}")
    if "on_expiry" in config:
        parts.append(f"{config['on_expiry']} at the end")
    return f"Python 3 ({', '.join(parts)})"


def install_kernel(
    name: str,
    memory: str | int | float,
    duration: str | int | float = "1h",
    *,
    gpus: int | None = None,
    device: int | str | Sequence[int] | None = None,
    display_name: str | None = None,
    priority: str | None = None,
    wait: str | int | float | bool | None = None,
    on_expiry: str | None = None,
    cull_idle: str | int | float | None = None,
    idle_after: str | int | float | None = None,
    on_idle: str | None = None,
    user: bool = False,
    sys_prefix: bool = False,
    prefix: str | os.PathLike[str] | None = None,
    python: str | None = None,
) -> str:
    """Install a kernelspec that takes a lease for each kernel; returns the installed directory.

    Where it goes follows ``jupyter kernelspec install``: ``user`` for the calling user,
    ``sys_prefix`` for this environment, ``prefix`` for ``PREFIX/share/jupyter/kernels``,
    and the system-wide directory when none is given.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if sum(bool(x) for x in (user, sys_prefix, prefix is not None)) > 1:
        raise InvalidRequestError("give at most one of --user, --sys-prefix and --prefix")
    kernel_name = _check_name(name)
    doc = kernel_json(
        memory=memory, duration=duration, gpus=gpus, device=device, priority=priority, wait=wait,
        on_expiry=on_expiry, cull_idle=cull_idle, python=python, idle_after=idle_after, on_idle=on_idle,
        display_name=display_name or "",
    )
    if not display_name:
        doc["display_name"] = default_display_name(doc)
    target_prefix = sys.prefix if sys_prefix else (os.fspath(prefix) if prefix is not None else None)
    manager = KernelSpecManager()
    destination = manager._get_destination_dir(kernel_name, user=user, prefix=target_prefix)
    created = _missing_dirs(os.path.dirname(destination))
    with tempfile.TemporaryDirectory(prefix="chronos-kernelspec-") as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        try:
            path: str = manager.install_kernel_spec(tmp, kernel_name=kernel_name, user=user, prefix=target_prefix)
            _make_readable(path, created)
        except PermissionError as exc:
            where = exc.filename or "the system kernel directory"
            raise NotAllowedError(
                f"cannot write {where}: permission denied; "
                "run as root, or use --user, --sys-prefix or --prefix DIR"
            ) from None
    return path


def _missing_dirs(directory: str) -> list[str]:
    """``directory`` and those of its ancestors that do not exist yet (the install will create them)."""
    missing: list[str] = []
    current = os.path.abspath(directory)
    while not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


def _make_readable(path: str, created: Sequence[str]) -> None:
    """Every user must see the kernel: 0755 directories, 0644 files, whatever the umask.

    jupyter_client copies the private staging directory with its mode, and creates missing parent
    directories through the umask; an admin's ``umask 077`` would hide the kernel from everyone else.
    """
    for directory in created:
        if os.path.isdir(directory):
            os.chmod(directory, 0o755)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter chronos", description="Jupyter kernels that run inside a Chronos GPU lease."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inst = sub.add_parser(
        "install-kernel",
        help="install a kernelspec whose kernels each take a lease",
        description="Install a kernelspec whose kernels each take a GPU lease (chronos provisioner).",
    )
    inst.add_argument("--name", required=True, help="kernelspec name, e.g. gpu-8g")
    inst.add_argument("--memory", required=True, help="GPU memory per device: 8G, 512M, 50%%")
    inst.add_argument("--time", dest="duration", default="1h",
                      help="lease duration: 2h, 90m, 1h30m (default 1h)")
    inst.add_argument("--gpus", type=int, default=None, help="number of devices, granted together")
    inst.add_argument("--device", default=None, help="which device index(es), e.g. 0 or 0,1")
    inst.add_argument("--display-name", default=None,
                      help="name shown in the launcher (default: from the settings, e.g. Python 3 (GPU 8 GiB, 2h))")
    inst.add_argument("--priority", default=None, choices=Priority.choices())
    inst.add_argument("--wait", default=None, metavar="TIME",
                      help="wait in the queue up to TIME (or 'forever') when no capacity is free")
    inst.add_argument("--on-expiry", default=None, choices=Action.choices(),
                      help="what happens to the kernel when its lease ends (default terminate)")
    inst.add_argument("--idle-after", default=None, metavar="TIME",
                      help="this kernelspec's idle rule: act on a kernel whose GPU is unused this long (it adds "
                           "to the system's idle_after, never lifts it)")
    inst.add_argument("--on-idle", default=None, choices=OnIdle.choices(),
                      help="what the idle rule does: warn, release (default) or terminate")
    inst.add_argument("--cull-idle", default=None, metavar="TIME",
                      help="per-kernelspec idle culling timeout (needs the server's culler on)")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python environment")
    where.add_argument("--prefix", default=None, help="install into PREFIX/share/jupyter/kernels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``jupyter chronos`` entry point; bad input prints one line and exits 2."""
    from chronos.cli import exit_code_of

    return exit_code_of(lambda: _run(argv))


def _run(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command != "install-kernel":
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        path = install_kernel(
            args.name, args.memory, args.duration, gpus=args.gpus, device=args.device,
            display_name=args.display_name, priority=args.priority, wait=args.wait,
            on_expiry=args.on_expiry, cull_idle=args.cull_idle, idle_after=args.idle_after, on_idle=args.on_idle,
            user=args.user, sys_prefix=args.sys_prefix, prefix=args.prefix,
        )
    except ChronosError as exc:
        print(f"jupyter chronos: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"Installed kernelspec {args.name.lower()} in {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

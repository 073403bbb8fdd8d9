"""``chronos admin``: set-up that needs root: the hardened state directory (``init-state-dir DIR --group G``)
and the systemd unit of the service (``install-service``)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "admin", help="set up the machine (root): the shared state directory, the service's systemd unit",
        description="Administration that needs root.",
    )
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init-state-dir", help="create or repair a state directory shared by one group",
        description="Create DIR root:GROUP mode 3770 (setgid, sticky) and the ledger, SQLite's -wal and -shm "
                    "files and the simulated GPUs' usage file and lock as root:GROUP 0660, so that every member "
                    "of GROUP and root can use it whoever comes first and no member can remove or replace a "
                    "file for the others. Run again to repair modes and owners; it never removes a file.",
    )
    init.add_argument("directory", metavar="DIR", help="the state directory, e.g. /var/lib/chronos")
    init.add_argument("--group", required=True, help="the group of GPU users, e.g. gpu-users")
    init.set_defaults(func=init_state_dir)
    unit = sub.add_parser(
        "install-service", help="write the Chronos service's systemd unit (chronos serve, restarted on failure)",
        description="Write chronos.service, which runs `chronos serve` as root with this Python, into DIR "
                    "(default /etc/systemd/system), and print the systemctl commands that start it.",
    )
    unit.add_argument("--dir", default=None, metavar="DIR",
                      help="where to write the unit (default /etc/systemd/system)")
    unit.add_argument("--python", default=None, metavar="PATH",
                      help="the interpreter ExecStart runs (default: this one)")
    unit.set_defaults(func=install_service)


def init_state_dir(args: argparse.Namespace) -> int:
    from chronos.state_admin import init_state_dir as init

    result = init(args.directory, args.group)
    made = ", ".join(p.name for p in result.created) or "nothing new"
    fixed = ", ".join(p.name for p in result.fixed)
    print(f"state directory {result.directory} is ready for group {result.group} "
          f"(created: {made}{'; owner and mode put right: ' + fixed if fixed else ''})")
    return 0


def install_service(args: argparse.Namespace) -> int:
    from chronos.service.install import DEFAULT_UNIT_DIR
    from chronos.service.install import install_service as install

    result = install(args.dir or DEFAULT_UNIT_DIR, args.python)
    for path in result.paths:
        print(f"{'replaced' if path in result.replaced else 'wrote'} {path}")
    print("now run:")
    for command in result.commands:
        print(f"  {command}")
    return 0

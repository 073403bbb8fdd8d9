"""``chronos serve [--socket PATH] [--state-dir DIR]``: the service, in the foreground."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run the Chronos service (one process owns the ledger; clients use the socket)",
        description="Serve every lease operation on a Unix socket, in the foreground, logging to stderr "
        "(systemd runs it; see docs/admin-guide.md). Clients use it when CHRONOS_SERVER or the system "
        "file's `server` names the socket. Run it as root (or a user of its own): the state directory "
        "must be the service's alone.",
    )
    p.add_argument("--socket", default="/run/chronos/chronos.sock", metavar="PATH",
                   help="the socket to listen on (default: %(default)s)")
    p.add_argument("--state-dir", default="/var/lib/chronos", metavar="DIR",
                   help="where the ledger lives, writable by the service alone (default: %(default)s)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import logging

    from chronos.service.server import serve as run

    logging.basicConfig(level=logging.INFO, format="chronos serve: %(levelname)s %(message)s")
    run(args.socket, args.state_dir)
    return 0

"""``chronos config``: the effective settings and where each one came from."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="effective settings (defaults, limits, state directory) and where each came from",
        description="Show the effective settings: built-in defaults, the system file (CHRONOS_CONFIG or "
                    "/etc/chronos/config.toml), the user's file (CHRONOS_USER_CONFIG or "
                    "~/.config/chronos/config.toml, personal defaults only) and the environment.",
    )
    p.add_argument("--json", action="store_true", help="a JSON object: files read, and every setting")
    p.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    from chronos import settings as snapshot
    from chronos.cli import render
    from chronos.config import describe, system_config_path, user_config_path

    config = snapshot.current().config
    settings = describe(config)
    system = str(system_config_path())
    user = str(user_config_path())
    if args.json:
        render.dump_json({
            "system_file": {"path": system, "read": config.system_file is not None},
            "user_file": {"path": user, "read": config.user_file is not None},
            "settings": {s.name: {"value": s.value, "text": s.text, "source": s.source} for s in settings},
        })
        return 0
    print(f"system file: {system}{'' if config.system_file else ' (not present)'}")
    print(f"user file:   {user}{'' if config.user_file else ' (not present)'}")
    print()
    render.table(["SETTING", "VALUE", "FROM"], [[s.name, s.text, s.source] for s in settings])
    return 0

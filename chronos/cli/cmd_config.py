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
    p.add_argument("--user", metavar="NAME",
                   help="the limits in effect for this user (their groups' and their own tables applied), "
                        "each with the rule that set it")
    p.set_defaults(func=show)


def show_user(args: argparse.Namespace) -> int:
    import chronos
    from chronos.cli import render
    from chronos.config import show_value
    from chronos.identity import groups_of, lookup_user
    from chronos.limits import LIMIT_FIELDS

    user = lookup_user(args.user)
    mine = chronos.limits_for(user.name)
    rows = []
    for name in LIMIT_FIELDS:
        value = getattr(mine, name)
        if name == "high_priority" and value is None:
            groups = mine.high_priority_groups
            text = "yes (anyone may)" if groups is None else f"if in {', '.join(groups) or 'the admin group'}"
            plain: object = None
        else:
            plain, text = show_value(name, value)
            if name == "high_priority":
                text = "yes" if value else "no"
        rows.append((name, plain, text, mine.rule(name)))
    if args.json:
        render.dump_json({"user": user.name, "uid": user.uid, "groups": sorted(groups_of(user)),
                          "limits": {_key(n): {"value": v, "text": t, "rule": r} for n, v, t, r in rows}})
        return 0
    print(f"limits for {user.name} (uid {user.uid}; groups: {', '.join(sorted(groups_of(user))) or 'none'})")
    print()
    render.table(["LIMIT", "VALUE", "SET BY"], [[_key(n), t, r] for n, _v, t, r in rows])
    return 0


def _key(field_name: str) -> str:
    from chronos.config import OVERRIDE_NAMES

    return OVERRIDE_NAMES[field_name]


def show(args: argparse.Namespace) -> int:
    from chronos import settings as snapshot
    from chronos.cli import render
    from chronos.config import describe, system_config_path, user_config_path

    if args.user is not None:
        return show_user(args)
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

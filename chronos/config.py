"""Settings: the system file, the user's file (personal defaults only) and the environment.

The system file (``/etc/chronos/config.toml``, or ``CHRONOS_CONFIG``) is the administrator's: the
state directory, the admin group, defaults and limits. The user's file
(``~/.config/chronos/config.toml``, or ``CHRONOS_USER_CONFIG``) may only set personal defaults, so a
user cannot lift a limit. ``CHRONOS_STATE_DIR`` overrides the state directory. A file that cannot be
read, or names a setting Chronos does not know, is an error naming the file and line: a typo in a
limit must never silently leave the machine unlimited.

    state_dir = "/var/lib/chronos"
    admin_group = "chronos-admin"
    longest_duration = "366d"   # the longest lease, extension or booking anyone may ask for
    server = "/run/chronos/chronos.sock"   # clients go through the service (docs/protocol.md)

    [defaults]            # also allowed in a user's file
    duration = "1h"
    priority = "normal"
    on_expiry = "terminate"

    [limits]
    max_duration = "8h"
    max_memory_per_lease = "40G"
    max_memory_per_user = "80G"
    max_leases_per_user = 4
    high_priority_groups = ["ml-leads"]
    idle_after = "30m"

    [limits.groups.students]   # a group's own limits (see chronos.limits for the precedence)
    max_memory_per_user = "24G"

    [limits.users.ann]         # one user's own limits: they win over every group's
    max_duration = "none"

    [scheduling]
    fair_share = true

    [metrics]
    textfile = "/var/lib/node_exporter/textfile/chronos.prom"

    [history]
    keep = "180d"         # ended leases and their audit lines older than this are pruned ("none": never)

    [enforce]             # the service's enforcer (chronos serve); see docs/enforcement.md
    unmanaged = "report"
    gate_devices = false
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chronos.config_trust import untrusted
from chronos.errors import InvalidRequestError
from chronos.model import Action, OnIdle, OnUnmanaged, Priority
from chronos.units import (
    LONGEST_DURATION_S,
    SHORTEST_LEASE_S,
    check_duration,
    format_bytes,
    format_duration,
    parse_duration,
    parse_memory,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "OVERRIDE_NAMES",
    "SYSTEM_CONFIG",
    "Config",
    "ConfigError",
    "Setting",
    "describe",
    "load_config",
    "system_config_path",
    "user_config_path",
]

SYSTEM_CONFIG = Path("/etc/chronos/config.toml")
#: Shared by every user of the machine with no setup; see docs/trust-model.md for hardening.
DEFAULT_STATE_DIR = Path("/var/tmp/chronos")
DEFAULT = "default"


class ConfigError(InvalidRequestError):
    """A configuration file that cannot be used as written (exit 2); the message names file and line."""


@dataclass(frozen=True)
class Config:
    """Effective settings. ``sources`` says where each non-default setting came from."""

    state_dir: Path = DEFAULT_STATE_DIR
    state_dir_explicit: bool = False
    default_duration_s: float = 3600.0
    #: The longest lease (its whole length, extensions included), booking or wait anyone may ask for.
    longest_duration_s: float = LONGEST_DURATION_S
    max_duration_s: float | None = None
    max_memory_per_lease_bytes: int | None = None
    max_memory_per_user_bytes: int | None = None
    max_leases_per_user: int | None = None
    high_priority_groups: tuple[str, ...] | None = None
    admin_group: str = "chronos-admin"
    #: The service's socket: set, every client goes through ``chronos serve`` and never opens the ledger.
    server: Path | None = None
    on_expiry: Action = Action.TERMINATE
    default_priority: Priority = Priority.NORMAL
    max_gpus_per_user: int | None = None
    idle_after_s: float | None = None
    on_idle: OnIdle = OnIdle.RELEASE
    idle_warning_s: float = 300.0
    booking_grace_s: float = 900.0
    max_booking_lead_s: float | None = None
    max_booked_s_per_week: float | None = None
    max_bookings_per_user: int | None = None
    fair_share: bool = False
    fair_share_half_life_s: float = 7 * 86400.0
    metrics_textfile: Path | None = None
    metrics_interval_s: float = 5.0
    #: ``[history] keep``: how long an ended lease and its audit lines are kept (None: for ever).
    history_keep_s: float | None = 180 * 86400.0
    #: ``[enforce]``: the service's one enforcement loop (:mod:`chronos.service.enforcer`) and device gating.
    unmanaged: OnUnmanaged = OnUnmanaged.REPORT
    unmanaged_grace_s: float = 60.0
    unmanaged_exempt: tuple[str, ...] = ()
    on_overuse: Action = Action.TERMINATE
    overuse_grace_s: float = 2.0
    kill_wait_s: float = 30.0
    enforce_interval_s: float = 0.5
    gate_devices: bool = False
    device_dir: Path = Path("/dev")
    #: With gating on, the mode the enforcer keeps the ``nvidiaN`` files at (None: leave it alone).
    device_mode: int | None = None
    #: ``[limits.users.NAME]`` and ``[limits.groups.NAME]``: (name, ((Config field or "high_priority", value), ...)),
    #: a value of None lifting the limit for them.
    user_limits: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    group_limits: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    system_file: str | None = None
    user_file: str | None = None

    def source(self, name: str) -> str:
        """Where setting ``name`` (a Config field) came from: ``default``, a file path, or ``env NAME``."""
        return self.sources.get(name, DEFAULT)


@dataclass(frozen=True)
class _Key:
    field: str
    parse: Callable[[Any], Any]
    show: Callable[[Any], str]
    user_allowed: bool = False


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("give a duration such as \"2h\", \"90m\" or a number of seconds")
    return parse_duration(value)


def _bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("give a size such as \"40G\" or \"512M\"")
    spec = parse_memory(value)
    if spec.nbytes is None:
        raise ValueError("give an absolute size such as \"40G\"; a fraction of a GPU is not a limit here")
    return spec.nbytes


def _lease_duration(value: Any) -> float:
    """A lease's length: at least :data:`~chronos.units.SHORTEST_LEASE_S`."""
    return check_duration(_duration(value), shortest=SHORTEST_LEASE_S, text=value)


def _seconds0(value: Any) -> float:
    """A duration that may be zero (``0`` or ``"0"``: none)."""
    if not isinstance(value, bool) and (value == 0 or (isinstance(value, str) and value.strip() in ("0", "0s"))):
        return 0.0
    return _duration(value)


def _hours(value: Any) -> float:
    """A number of hours (``12``), or a duration (``"12h"``, ``"90m"``): seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ValueError("give a positive number of hours, or a duration such as \"12h\"")
        return float(value) * 3600.0
    return _duration(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("give true or false")
    return value


#: Spellings that lift a limit (in ``[limits]`` they are the default; in a user's or group's table they
#: lift the global limit for them).
NO_LIMIT = ("none", "off", "unlimited")


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def inner(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in NO_LIMIT:
            return None
        return parse(value)

    return inner


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("give a whole number of at least 1")
    return value


def _groups(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("give a list of group names such as [\"ml-leads\"]")
    return tuple(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("give a non-empty name")
    return value.strip()


def _choice(kind: type[Action] | type[Priority] | type[OnIdle] | type[OnUnmanaged]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value not in kind.choices():
            raise ValueError(f"use one of {', '.join(kind.choices())}")
        return kind(value)

    return parse


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("give an absolute path such as \"/var/lib/chronos\"")
    return Path(value)


def _device_mode(value: Any) -> int:
    """A device file's mode for gating: read-write for the group (the group bits are the ACL's mask,
    so less would take away what a lease's ACL entry gives) and nothing for others."""
    hint = "give a mode such as \"0660\": read-write for the group, nothing for others"
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value.strip()):
        raise ValueError(hint)
    mode = int(value.strip(), 8)
    if (mode >> 3) & 0o7 != 0o6 or mode & 0o7:
        raise ValueError(hint)
    return mode


def _show_mode(value: Any) -> str:
    return "none" if value is None else f"{value:04o}"


def _users(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("give a list of user names such as [\"root\"]")
    return tuple(v.strip() for v in value)


def _interval(value: Any) -> float:
    """A poll interval: a duration from 0.05 s to 1 minute."""
    seconds = _duration(value)
    if not 0.05 <= seconds <= 60:
        raise ValueError("give an interval from 0.05s to 1m, such as \"0.5s\"")
    return seconds


def _show_duration(value: Any) -> str:
    return format_duration(value)


def _show_seconds(value: Any) -> str:
    """A short duration as people write it, fractions of a second kept (``0.25s``)."""
    return f"{value:g}s" if value < 60 else format_duration(value)


def _show_bytes(value: Any) -> str:
    return format_bytes(value)


def _show_groups(value: Any) -> str:
    return ", ".join(value) if value else "nobody but admins"


def _show_users(value: Any) -> str:
    return ", ".join(value) if value else "nobody"


def _show_bool(value: Any) -> str:
    return "true" if value else "false"


_SCHEMA: dict[str, dict[str, _Key]] = {
    "": {
        "state_dir": _Key("state_dir", _path, str),
        "admin_group": _Key("admin_group", _name, str),
        "longest_duration": _Key("longest_duration_s", _lease_duration, _show_duration),
        "server": _Key("server", _path, str),
    },
    "defaults": {
        "duration": _Key("default_duration_s", _lease_duration, _show_duration, user_allowed=True),
        "priority": _Key("default_priority", _choice(Priority), str, user_allowed=True),
        "on_expiry": _Key("on_expiry", _choice(Action), str, user_allowed=True),
    },
    "limits": {
        "max_duration": _Key("max_duration_s", _optional(_duration), _show_duration),
        "max_memory_per_lease": _Key("max_memory_per_lease_bytes", _optional(_bytes), _show_bytes),
        "max_memory_per_user": _Key("max_memory_per_user_bytes", _optional(_bytes), _show_bytes),
        "max_leases_per_user": _Key("max_leases_per_user", _optional(_count), str),
        "max_gpus_per_user": _Key("max_gpus_per_user", _optional(_count), str),
        "high_priority_groups": _Key("high_priority_groups", _groups, _show_groups),
        "idle_after": _Key("idle_after_s", _optional(_duration), _show_duration),
        "on_idle": _Key("on_idle", _choice(OnIdle), str),
        "idle_warning": _Key("idle_warning_s", _seconds0, _show_duration),
        "booking_grace": _Key("booking_grace_s", _duration, _show_duration),
        "max_booking_lead": _Key("max_booking_lead_s", _optional(_duration), _show_duration),
        "max_booked_hours_per_week": _Key("max_booked_s_per_week", _optional(_hours), _show_duration),
        "max_bookings_per_user": _Key("max_bookings_per_user", _optional(_count), str),
    },
    "scheduling": {
        "fair_share": _Key("fair_share", _bool, _show_bool),
        "fair_share_half_life": _Key("fair_share_half_life_s", _duration, _show_duration),
    },
    "metrics": {
        "textfile": _Key("metrics_textfile", _path, str),
        "interval": _Key("metrics_interval_s", _duration, _show_duration),
    },
    "history": {
        "keep": _Key("history_keep_s", _optional(_duration), _show_duration),
    },
    "enforce": {
        "unmanaged": _Key("unmanaged", _choice(OnUnmanaged), str),
        "unmanaged_grace": _Key("unmanaged_grace_s", _seconds0, _show_seconds),
        "unmanaged_exempt": _Key("unmanaged_exempt", _users, _show_users),
        "on_overuse": _Key("on_overuse", _choice(Action), str),
        "grace": _Key("overuse_grace_s", _seconds0, _show_seconds),
        "kill_wait": _Key("kill_wait_s", _seconds0, _show_seconds),
        "interval": _Key("enforce_interval_s", _interval, _show_seconds),
        "gate_devices": _Key("gate_devices", _bool, _show_bool),
        "device_dir": _Key("device_dir", _path, str),
        "device_mode": _Key("device_mode", _optional(_device_mode), _show_mode),
    },
}

#: What ``[limits.users.NAME]`` and ``[limits.groups.NAME]`` may set: every limit but the list of
#: high-priority groups, and ``high_priority`` (may they use it).
_OVERRIDES: dict[str, _Key] = {
    **{name: key for name, key in _SCHEMA["limits"].items() if name != "high_priority_groups"},
    "high_priority": _Key("high_priority", _bool, _show_bool),
}
#: Override field -> its key in a user's or group's table.
OVERRIDE_NAMES = {key.field: name for name, key in _OVERRIDES.items()}
_TABLES = {"users": "user_limits", "groups": "group_limits"}


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


#: Config field -> its name in a file (``limits.max_duration``).
SETTING_NAMES = {k.field: _dotted(section, name) for section, keys in _SCHEMA.items() for name, k in keys.items()}


def system_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("CHRONOS_CONFIG") or SYSTEM_CONFIG)


def user_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get("CHRONOS_USER_CONFIG")
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "chronos" / "config.toml"


def _read(path: Path, *, user: bool = False) -> tuple[dict[str, Any], str] | None:
    """The parsed file and its text, or None when there is no such file.

    A file that is there but cannot be read is an error. A user's file behind a directory this
    process may not search (a service account whose HOME is someone else's) counts as absent: it
    holds personal defaults only, never limits.
    """
    if user:
        try:
            os.stat(path)
        except PermissionError:
            return None
        except OSError:
            pass
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        if user:  # e.g. XDG_CONFIG_HOME naming a file: there is no user file, and it holds no limits
            return None
        raise ConfigError(f"{path}: a directory on this path is a file, so it cannot be a configuration "
                          "file; fix CHRONOS_CONFIG or unset it") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot be read (permission denied); ask the administrator") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    tomllib = _toml()
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        col = getattr(exc, "colno", None)
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        if line is None and found:  # older tomllib/tomli keep the position in the message only
            line, col = int(found.group(1)), int(found.group(2))
        elif line is None and "end of document" in str(exc):
            line, col = text.count("\n") + 1, len(text.rsplit("\n", 1)[-1]) + 1
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        where = f"{path}:{line}:{col}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid TOML: {message}") from None


def _toml() -> Any:
    """tomllib (3.11+) or its backport tomli, which has the same API and error positions."""
    import importlib

    return importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")


def _parts(dotted: str) -> tuple[str, ...]:
    """A TOML table header's names, quotes removed: ``limits.users."j.doe"`` -> (limits, users, j.doe)."""
    return tuple(p.strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', dotted))


def _line_of(text: str, section: str | tuple[str, ...], key: str) -> int | None:
    """The line where ``key`` is set inside ``[section]`` (tomllib keeps no positions)."""
    wanted = section if isinstance(section, tuple) else _parts(section)
    current: tuple[str, ...] = ()
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = _parts(header.group(1))
            if current[:len(wanted) + 1] == (*wanted, key):  # [section.key] or a table under it
                return number
            continue
        if current == wanted and pattern.match(line):
            return number
    return None


def _where(path: Path, text: str, section: str | tuple[str, ...], key: str) -> str:
    line = _line_of(text, section, key)
    if line is None and isinstance(section, tuple) and section:
        line = _line_of(text, section[:-1], section[-1])  # an inline table: the line that names it
    return f"{path}:{line}" if line is not None else str(path)


def _admin_only(path: Path, text: str, section: str | tuple[str, ...], key: str, name: str) -> ConfigError:
    allowed = ", ".join(_dotted(s, k) for s, ks in _SCHEMA.items() for k, v in ks.items() if v.user_allowed)
    return ConfigError(
        f"{_where(path, text, section, key)}: {name} may only be set by the administrator in "
        f"{system_config_path()}; a user's file holds personal defaults only ({allowed})"
    )


def _apply_tables(path: Path, text: str, kind: str, tables: Any, values: dict[str, Any],
                  sources: dict[str, str], *, user: bool) -> None:
    """``[limits.users.NAME]`` or ``[limits.groups.NAME]`` tables, each key checked as in ``[limits]``."""
    if user:
        raise _admin_only(path, text, "limits", kind, f"limits.{kind}")
    if not isinstance(tables, dict):
        raise ConfigError(f"{_where(path, text, 'limits', kind)}: limits.{kind} must be tables: write "
                          f"[limits.{kind}.NAME] on its own line")
    found = dict(values.get(_TABLES[kind], ()))
    for name, table in tables.items():
        section = ("limits", kind, name)
        if not isinstance(table, dict):
            raise ConfigError(f"{_where(path, text, ('limits', kind), name)}: limits.{kind}.{name} must be a table: "
                              f"write [limits.{kind}.{name}] on its own line")
        if not name.strip():
            raise ConfigError(f"{path}: limits.{kind} has a table with an empty name")
        pairs = dict(found.get(name, ()))
        for key, raw in table.items():
            dotted = f"limits.{kind}.{name}.{key}"
            spec = _OVERRIDES.get(key)
            if spec is None:
                hint = _close_matches(key, list(_OVERRIDES), n=1)
                tip = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(_OVERRIDES)}"
                raise ConfigError(f"{_where(path, text, section, key)}: unknown setting {dotted!r}{tip}")
            try:
                pairs[spec.field] = spec.parse(raw)
            except (ValueError, InvalidRequestError) as exc:
                raise ConfigError(f"{_where(path, text, section, key)}: bad value for {dotted} ({raw!r}): {exc}") \
                    from None
        found[name] = tuple(sorted(pairs.items()))
        sources[f"{kind}.{name}"] = str(path)
    values[_TABLES[kind]] = tuple(sorted(found.items()))


def _apply(path: Path, data: dict[str, Any], text: str, values: dict[str, Any], sources: dict[str, str],
           *, user: bool) -> None:
    for top, value in data.items():
        if isinstance(value, dict) and top in _SCHEMA and top:
            entries = [(top, key, v) for key, v in value.items() if not (top == "limits" and key in _TABLES)]
            if top == "limits":
                for kind in _TABLES:
                    if kind in value:
                        _apply_tables(path, text, kind, value[kind], values, sources, user=user)
        elif top in _SCHEMA[""]:
            entries = [("", top, value)]
        elif top in _SCHEMA:
            raise ConfigError(f"{_where(path, text, '', top)}: {top} must be a table: write [{top}] on its own line")
        else:
            known = [k for k in _SCHEMA if k] + list(_SCHEMA[""])
            hint = _close_matches(top, known, n=1)
            for section, keys in _SCHEMA.items():
                if top in keys and section:
                    hint = [f"[{section}] {top}"]
            tip = f"; did you mean {hint[0]}?" if hint else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"{_where(path, text, '', top)}: unknown setting {top!r}{tip}")
        for section, key, raw in entries:
            keys = _SCHEMA[section]
            name = _dotted(section, key)
            if key not in keys:
                hint = _close_matches(key, list(keys), n=1)
                tip = f"; did you mean {hint[0]!r}?" if hint else f"; known in [{section}]: {', '.join(keys)}"
                raise ConfigError(f"{_where(path, text, section, key)}: unknown setting {name!r}{tip}")
            spec = keys[key]
            if user and not spec.user_allowed:
                raise _admin_only(path, text, section, key, name)
            try:
                values[spec.field] = spec.parse(raw)
            except (ValueError, InvalidRequestError) as exc:
                where = _where(path, text, section, key)
                raise ConfigError(f"{where}: bad value for {name} ({raw!r}): {exc}") from None
            sources[spec.field] = str(path)


def _check_named_system_file(env: Mapping[str, str], system: Path, user: Path) -> None:
    """``CHRONOS_CONFIG`` names the administrator's file: for anyone but root it must be one only root can write
    (a user's own file would make them admin, ``/dev/null`` would lift every limit). See docs/configuration.md."""
    if not env.get("CHRONOS_CONFIG") or os.getuid() == 0:
        return
    why = untrusted(system)
    if why is not None:
        raise ConfigError(
            f"CHRONOS_CONFIG={system} is not used: {why}, and the system configuration (admin group, limits) "
            f"must be a file only root can change; unset CHRONOS_CONFIG (personal defaults go in {user})"
        )


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """The effective configuration: defaults, then the system file, the user's file, ``CHRONOS_STATE_DIR``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    system = system_config_path(env)
    user = user_config_path(env)
    _check_named_system_file(env, system, user)
    found_system = _read(system)
    if found_system is not None:
        _apply(system, found_system[0], found_system[1], values, sources, user=False)
    found_user = _read(user, user=True)
    if found_user is not None:
        _apply(user, found_user[0], found_user[1], values, sources, user=True)
    env_dir = env.get("CHRONOS_STATE_DIR")
    if env_dir:
        if not env_dir.startswith("/") or "\0" in env_dir:
            raise ConfigError(f"CHRONOS_STATE_DIR={env_dir[:80]!r} is not an absolute path: "
                              "write e.g. CHRONOS_STATE_DIR=/var/tmp/chronos-mine, or unset it")
        values["state_dir"] = Path(env_dir)
        values["state_dir_explicit"] = True
        sources["state_dir"] = "env CHRONOS_STATE_DIR"
    longest = values.get("longest_duration_s", LONGEST_DURATION_S)
    for field_name in ("default_duration_s", "max_duration_s"):  # either would be silently cut to longest
        if (values.get(field_name) or 0.0) > longest:
            raise ConfigError(f"{sources[field_name]}: {SETTING_NAMES[field_name]} "
                              f"({format_duration(values[field_name])}) is longer than longest_duration "
                              f"({format_duration(longest)}): shorten it, or raise longest_duration")
    return Config(
        **values,
        sources=sources,
        system_file=str(system) if found_system is not None else None,
        user_file=str(user) if found_user is not None else None,
    )


@dataclass(frozen=True)
class Setting:
    """One effective setting for display: its name in a file, its value, and where it came from."""

    name: str
    value: Any
    text: str
    source: str


def show_value(field_name: str, value: Any) -> tuple[Any, str]:
    """A setting's value as JSON takes it, and as a person reads it (``no limit``, ``8h``, ``40 GiB``)."""
    spec = next((k for keys in (*_SCHEMA.values(), _OVERRIDES) for k in keys.values() if k.field == field_name),
                None)
    if value is None:
        text = "anyone" if field_name == "high_priority_groups" else \
            "off" if field_name == "idle_after_s" else "no limit"
    else:
        text = spec.show(value) if spec is not None else str(value)
    plain: Any = value
    if isinstance(value, Path):
        plain = str(value)
    elif isinstance(value, tuple):
        plain = list(value)
    return plain, text


def describe(config: Config) -> list[Setting]:
    """Every setting with its effective value and source, in file order (for ``chronos config``), then
    every user's and group's own limits."""
    out = []
    for section, keys in _SCHEMA.items():
        for key, spec in keys.items():
            plain, text = show_value(spec.field, getattr(config, spec.field))
            out.append(Setting(_dotted(section, key), plain, text, config.source(spec.field)))
    for kind, attribute in _TABLES.items():
        for name, pairs in getattr(config, attribute):
            for field_name, value in pairs:
                plain, text = show_value(field_name, value)
                out.append(Setting(f"limits.{kind}.{name}.{OVERRIDE_NAMES[field_name]}", plain, text,
                                   config.source(f"{kind}.{name}")))
    return out


def _close_matches(word: str, choices: list[str], n: int) -> list[str]:
    """difflib's suggestion for a misspelt key, imported only when a key is misspelt."""
    import difflib

    return difflib.get_close_matches(word, choices, n=n)

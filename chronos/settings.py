"""One snapshot of what the environment and the configuration files say, read in one place.

Every ``CHRONOS_*`` variable that shapes an engine is read here and nowhere else. An engine owns
one :class:`Settings`, and everything below it (the ledger, the backend, caps, the watchdog) is
handed what it needs from that snapshot, so two parts of a process can never disagree about
which GPUs or which ledger they use. :func:`current` caches the snapshot while the variables it
was read from hold; the default engine and :func:`chronos.devices.get_backend` are derived from it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from chronos.config import Config, load_config
from chronos.errors import ChronosError, InvalidRequestError
from chronos.request import parse_lease_id
from chronos.units import SIZE_CEILING, parse_size

__all__ = ["BACKENDS", "ENV_KEYS", "Settings", "current", "from_environ", "lease_id_from_env", "refresh"]

#: Backend choices for ``CHRONOS_BACKEND``.
BACKENDS = ("auto", "nvml", "simulated")

#: Every variable a snapshot depends on (the cache key of :func:`current`).
ENV_KEYS = (
    "CHRONOS_STATE_DIR",
    "CHRONOS_CONFIG",
    "CHRONOS_USER_CONFIG",
    "XDG_CONFIG_HOME",
    "HOME",
    "CHRONOS_BACKEND",
    "CHRONOS_SIM_GPUS",
    "CHRONOS_SIM_TOPOLOGY",
    "CHRONOS_CONTEXT_RESERVE",
    "CHRONOS_SERVER",
)


@dataclass(frozen=True)
class Settings:
    """What an engine runs with: the configuration, the GPU backend's description, cap tuning."""

    config: Config
    backend: str = "auto"
    sim_gpus: str | None = None
    sim_topology: str | None = None
    #: Device memory kept out of the framework caps for the CUDA context (None: the default rule).
    context_reserve_bytes: int | None = None
    #: The service's socket (``CHRONOS_SERVER``, else the system file's ``server``): None is embedded mode.
    server: Path | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.config.state_dir)

    def with_state_dir(self, path: str | Path) -> Settings:
        """The same settings with an explicitly named state directory."""
        config = replace(self.config, state_dir=Path(path), state_dir_explicit=True,
                         sources={**self.config.sources, "state_dir": "argument"})
        return replace(self, config=config)


def _backend(raw: str | None) -> str:
    choice = (raw or "").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise InvalidRequestError(f"CHRONOS_BACKEND={raw!r} is not a backend: use auto, nvml or simulated")
    return choice


def _reserve(raw: str | None) -> int | None:
    text = (raw or "").strip()
    if not text:
        return None
    hint = "write a size such as 768M or a number of bytes such as 805306368, or unset it"
    if text.isascii() and text.isdigit():
        if len(text) > 16 or int(text) > SIZE_CEILING:
            raise InvalidRequestError(f"CHRONOS_CONTEXT_RESERVE={text[:20]!r}... is larger than any GPU: {hint}")
        return int(text)
    try:
        return parse_size(text)
    except InvalidRequestError:
        raise InvalidRequestError(f"CHRONOS_CONTEXT_RESERVE={text[:40]!r} is not a size: {hint}") from None


def lease_id_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The lease this process runs inside (``CHRONOS_LEASE_ID``, set by ``chronos run`` and the kernel
    provisioner), or None; a value that is no lease id is an error, never silently no lease."""
    env = os.environ if environ is None else environ
    raw = env.get("CHRONOS_LEASE_ID")
    if not raw:
        return None
    try:
        return parse_lease_id(raw)
    except ChronosError:
        raise InvalidRequestError(f"CHRONOS_LEASE_ID={raw[:40]!r} is not a lease id (Chronos sets it to a number "
                                  "such as 12 for a process inside a lease): unset it") from None


def _server(raw: str | None, config: Config) -> Path | None:
    text = (raw or "").strip()
    if text:
        if not text.startswith("/"):
            raise InvalidRequestError(f"CHRONOS_SERVER={raw!r} is not a socket path: write an absolute path such as "
                                      "/run/chronos/chronos.sock, or unset it")
        return Path(text)
    return config.server


def from_environ(environ: Mapping[str, str] | None = None) -> Settings:
    """A fresh snapshot of ``environ`` (default: this process's) and the files it names."""
    env = os.environ if environ is None else environ
    config = load_config(env)
    return Settings(
        config=config,
        server=_server(env.get("CHRONOS_SERVER"), config),
        backend=_backend(env.get("CHRONOS_BACKEND")),
        sim_gpus=env.get("CHRONOS_SIM_GPUS") or None,
        sim_topology=env.get("CHRONOS_SIM_TOPOLOGY") or None,
        context_reserve_bytes=_reserve(env.get("CHRONOS_CONTEXT_RESERVE")),
    )


_lock = threading.Lock()
_cached: tuple[tuple[str | bytes | None, ...], Settings] | None = None
#: :data:`ENV_KEYS` as the keys of the table behind ``os.environ`` on POSIX (bytes).
_ENV_KEYS_RAW = tuple(os.fsencode(k) for k in ENV_KEYS)


def _env_key() -> tuple[str | bytes | None, ...]:
    """What the snapshot was read from: the values of :data:`ENV_KEYS` now. Every lease operation asks, so
    on POSIX they are read from the table behind ``os.environ`` (what its own lookups read, as bytes):
    through the mapping each key is encoded and each value decoded, about twenty times the cost."""
    table = getattr(os.environ, "_data", None)
    if os.name == "posix" and type(table) is dict:
        return tuple(map(table.get, _ENV_KEYS_RAW))
    return tuple(os.environ.get(k) for k in ENV_KEYS)


def current() -> Settings:
    """This process's snapshot; read again only when one of :data:`ENV_KEYS` changes."""
    global _cached
    key = _env_key()
    cached = _cached
    if cached is not None and cached[0] == key:
        return cached[1]
    with _lock:
        if _cached is None or _cached[0] != key:
            _cached = (key, from_environ())
        return _cached[1]


def refresh() -> None:
    """Forget the snapshot, so the next :func:`current` reads the files again (they may have changed)."""
    global _cached
    with _lock:
        _cached = None

"""Settings: the system file, the user's file (personal defaults only) and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Config", "load_config", "SYSTEM_CONFIG", "DEFAULT_STATE_DIR"]

SYSTEM_CONFIG = Path("/etc/chronos/config.toml")
#: Shared by every user of the machine with no setup; see docs/trust-model.md for hardening.
DEFAULT_STATE_DIR = Path("/var/tmp/chronos")


@dataclass(frozen=True)
class Config:
    """Effective settings."""

    state_dir: Path = DEFAULT_STATE_DIR
    state_dir_explicit: bool = False
    default_duration_s: float = 3600.0
    max_duration_s: float | None = None
    max_memory_per_lease_bytes: int | None = None
    max_memory_per_user_bytes: int | None = None
    max_leases_per_user: int | None = None
    high_priority_groups: tuple[str, ...] | None = None
    admin_group: str = "chronos-admin"
    on_expiry: str = "terminate"


def load_config() -> Config:
    """The effective configuration for this process."""
    env_dir = os.environ.get("CHRONOS_STATE_DIR")
    if env_dir:
        return Config(state_dir=Path(env_dir), state_dir_explicit=True)
    return Config()

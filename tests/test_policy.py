"""Configuration files and the limits they set: every setting, bad files, and the engine honouring them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import chronos
from chronos import limits
from chronos.api import reset_default_engine
from chronos.config import DEFAULT_STATE_DIR, ConfigError, describe, load_config
from chronos.errors import InvalidRequestError, NotAllowedError
from chronos.identity import current_user, groups_of
from tests.conftest import run_cli

G = 1 << 30


@pytest.fixture
def system_file(chronos_env: Path) -> Path:
    return Path(os.environ["CHRONOS_CONFIG"])


@pytest.fixture
def user_file(chronos_env: Path) -> Path:
    return Path(os.environ["CHRONOS_USER_CONFIG"])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    reset_default_engine()
    return path


# -- loading ----------------------------------------------------------------------------------------
def test_defaults_with_no_files(system_file: Path) -> None:
    config = load_config()
    assert config.default_duration_s == 3600 and config.default_priority == "normal"
    assert config.on_expiry == "terminate" and config.admin_group == "chronos-admin"
    assert config.max_duration_s is None and config.max_memory_per_lease_bytes is None
    assert config.max_memory_per_user_bytes is None and config.max_leases_per_user is None
    assert config.high_priority_groups is None
    assert config.system_file is None and config.user_file is None
    assert config.source("default_duration_s") == "default"
    assert config.source("state_dir") == "env CHRONOS_STATE_DIR" and config.state_dir_explicit


def test_every_system_setting_is_read_with_its_source(system_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(system_file, """
state_dir = "/srv/chronos-state"
admin_group = "gpu-admins"

[defaults]
duration = "2h"
priority = "low"
on_expiry = "kill"

[limits]
max_duration = "8h"
max_memory_per_lease = "40G"
max_memory_per_user = "96GiB"
max_leases_per_user = 3
high_priority_groups = ["ml-leads", "oncall"]
""")
    monkeypatch.delenv("CHRONOS_STATE_DIR")
    config = load_config()
    assert config.state_dir == Path("/srv/chronos-state") and not config.state_dir_explicit
    assert config.admin_group == "gpu-admins"
    assert config.default_duration_s == 7200 and config.default_priority == "low" and config.on_expiry == "kill"
    assert config.max_duration_s == 8 * 3600
    assert config.max_memory_per_lease_bytes == 40 * G and config.max_memory_per_user_bytes == 96 * G
    assert config.max_leases_per_user == 3
    assert config.high_priority_groups == ("ml-leads", "oncall")
    assert {config.source(f) for f in ("state_dir", "max_duration_s", "on_expiry")} == {str(system_file)}
    assert config.system_file == str(system_file)


def test_the_environment_overrides_the_state_directory(system_file: Path, chronos_env: Path) -> None:
    write(system_file, 'state_dir = "/srv/elsewhere"\n')
    config = load_config()
    assert config.state_dir == chronos_env and config.source("state_dir") == "env CHRONOS_STATE_DIR"


def test_the_shared_default_state_directory_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHRONOS_STATE_DIR")
    config = load_config()
    assert config.state_dir == DEFAULT_STATE_DIR and not config.state_dir_explicit


def test_user_file_sets_personal_defaults_over_the_system_ones(system_file: Path, user_file: Path) -> None:
    write(system_file, '[defaults]\nduration = "2h"\npriority = "normal"\n[limits]\nmax_duration = "4h"\n')
    write(user_file, '[defaults]\nduration = "30m"\npriority = "low"\non_expiry = "warn"\n')
    config = load_config()
    assert config.default_duration_s == 1800 and config.default_priority == "low" and config.on_expiry == "warn"
    assert config.source("default_duration_s") == str(user_file)
    assert config.max_duration_s == 4 * 3600 and config.source("max_duration_s") == str(system_file)


@pytest.mark.parametrize("text, line", [
    ('[limits]\nmax_duration = "99h"\n', 2),
    ('\nstate_dir = "/tmp/mine"\n', 2),
    ('admin_group = "me"\n', 1),
])
def test_a_user_file_may_not_set_limits_or_system_settings(user_file: Path, text: str, line: int) -> None:
    write(user_file, text)
    with pytest.raises(ConfigError, match=rf"^{user_file}:{line}: .* may only be set by the administrator"):
        load_config()


def test_malformed_file_is_reported_with_path_and_line(system_file: Path) -> None:
    write(system_file, '[defaults]\nduration = "2h"\n[limits\nmax_duration = "1h"\n')
    with pytest.raises(ConfigError, match=rf"^{system_file}:3:\d+: not valid TOML"):
        load_config()
    write(system_file, 'admin_group = "unterminated\n')
    with pytest.raises(ConfigError, match=rf"^{system_file}:1:\d+: not valid TOML"):
        load_config()


@pytest.mark.parametrize("text, message", [
    ('[limits]\n\nmax_duraton = "8h"\n', r":3: unknown setting 'limits.max_duraton'; did you mean 'max_duration'\?"),
    ('max_duration = "8h"\n', r":1: unknown setting 'max_duration'; did you mean \[limits\] max_duration\?"),
    ('[limit]\nmax_duration = "8h"\n', r":1: unknown setting 'limit'; did you mean limits\?"),
    ('colour = "blue"\n', r":1: unknown setting 'colour'; known: "),
    ('defaults = 3\n', r":1: defaults must be a table"),
])
def test_unknown_keys_are_errors_with_a_hint(system_file: Path, text: str, message: str) -> None:
    write(system_file, text)
    with pytest.raises(ConfigError, match=message):
        load_config()


@pytest.mark.parametrize("text, message", [
    ('[limits]\nmax_duration = "soon"\n', r":2: bad value for limits.max_duration"),
    ('[limits]\nmax_memory_per_lease = "50%"\n', r"absolute size"),
    ('[limits]\nmax_memory_per_user = true\n', r"bad value for limits.max_memory_per_user"),
    ('[limits]\nmax_leases_per_user = 0\n', r"whole number of at least 1"),
    ('[limits]\nhigh_priority_groups = "ml"\n', r"list of group names"),
    ('[defaults]\npriority = "urgent"\n', r"use one of low, normal, high"),
    ('[defaults]\non_expiry = "explode"\n', r"use one of warn, interrupt, terminate, kill"),
    ('state_dir = "relative/path"\n', r"absolute path"),
    ('admin_group = ""\n', r"non-empty name"),
])
def test_bad_values_are_errors_naming_the_setting(system_file: Path, text: str, message: str) -> None:
    write(system_file, text)
    with pytest.raises(ConfigError, match=message):
        load_config()


def test_config_errors_are_bad_input() -> None:
    assert issubclass(ConfigError, InvalidRequestError)


# -- the pure check ---------------------------------------------------------------------------------
def limited(**kwargs: object) -> limits.Config:
    base = limits.Config()
    sources = {name: "/etc/chronos/config.toml" for name in kwargs}
    return limits.Config(**{**base.__dict__, **kwargs, "sources": sources})  # type: ignore[arg-type]


def info(gib: float = 8, gpus: int = 1, duration: float = 3600, priority: str = "normal") -> limits.RequestInfo:
    return limits.RequestInfo(int(gib * G), gpus, duration, priority)


def test_check_max_duration() -> None:
    config = limited(max_duration_s=4 * 3600.0)
    limits.check(config, info(duration=4 * 3600), "ann", [], limits.Usage())
    with pytest.raises(NotAllowedError, match=r"5h is longer than the maximum of 4h per lease "
                                              r"\(limits.max_duration in /etc/chronos/config.toml\)"):
        limits.check(config, info(duration=5 * 3600), "ann", [], limits.Usage())


def test_check_max_memory_per_lease() -> None:
    config = limited(max_memory_per_lease_bytes=40 * G)
    limits.check(config, info(40), "ann", [], limits.Usage())
    with pytest.raises(NotAllowedError, match=r"48 GiB is more than the maximum of 40 GiB per lease "
                                              r"\(limits.max_memory_per_lease"):
        limits.check(config, info(48), "ann", [], limits.Usage())


def test_check_max_memory_per_user_counts_every_gpu() -> None:
    config = limited(max_memory_per_user_bytes=64 * G)
    limits.check(config, info(32, gpus=2), "ann", [], limits.Usage(0, 0))
    with pytest.raises(NotAllowedError, match=r"ann holds 40 GiB in leases; 32 GiB more would pass the "
                                              r"maximum of 64 GiB per user \(limits.max_memory_per_user"):
        limits.check(config, info(16, gpus=2), "ann", [], limits.Usage(2, 40 * G))


def test_check_max_leases_per_user() -> None:
    config = limited(max_leases_per_user=2)
    limits.check(config, info(), "ann", [], limits.Usage(1, 0))
    with pytest.raises(NotAllowedError, match=r"ann already has 2 active or queued lease\(s\), the maximum of 2"):
        limits.check(config, info(), "ann", [], limits.Usage(2, 0))


def test_check_high_priority_groups_and_admins() -> None:
    config = limited(high_priority_groups=("ml-leads",))
    limits.check(config, info(priority="high"), "ann", ["staff", "ml-leads"], limits.Usage())
    limits.check(config, info(priority="high"), "root", [], limits.Usage(), admin=True)
    limits.check(config, info(priority="high"), "bob", ["chronos-admin"], limits.Usage())
    limits.check(config, info(priority="normal"), "bob", ["staff"], limits.Usage())
    with pytest.raises(NotAllowedError, match=r"priority high is for members of ml-leads and admins "
                                              r"\(limits.high_priority_groups in .*\); bob may use normal or low"):
        limits.check(config, info(priority="high"), "bob", ["staff"], limits.Usage())
    nobody = limited(high_priority_groups=())
    with pytest.raises(NotAllowedError, match=r"priority high is for admins"):
        limits.check(nobody, info(priority="high"), "bob", ["ml-leads"], limits.Usage())
    # No setting: anyone may.
    limits.check(limits.Config(), info(priority="high"), "bob", [], limits.Usage())


def test_check_extend_counts_the_whole_lease() -> None:
    config = limited(max_duration_s=3 * 3600.0)
    limits.check_extend(config, 3 * 3600)
    with pytest.raises(NotAllowedError, match=r"would last 4h in all, longer than the maximum of 3h"):
        limits.check_extend(config, 4 * 3600)


# -- the engine honours the file ----------------------------------------------------------------------
def test_reserve_and_extend_obey_the_limits(system_file: Path) -> None:
    write(system_file, '[limits]\nmax_duration = "2h"\nmax_memory_per_lease = "20G"\nmax_leases_per_user = 2\n'
                       'max_memory_per_user = "30G"\n')
    with pytest.raises(NotAllowedError, match="longer than the maximum of 2h"):
        chronos.reserve("8G", "3h", bind=False)
    with pytest.raises(NotAllowedError, match="more than the maximum of 20 GiB per lease"):
        chronos.reserve("24G", "1h", bind=False)
    first = chronos.reserve("16G", "1h", bind=False)
    with pytest.raises(NotAllowedError, match="maximum of 30 GiB per user"):
        chronos.reserve("16G", "1h", bind=False)
    second = chronos.reserve("8G", "1h", bind=False)
    with pytest.raises(NotAllowedError, match="already has 2 active or queued"):
        chronos.reserve("1G", "1h", bind=False)
    first.extend("1h")  # 2h in all: at the limit
    with pytest.raises(NotAllowedError, match="would last 2h 10m in all"):
        first.extend("10m")
    second.release()
    assert chronos.reserve("4G", "30m", bind=False).state == "active"


def test_defaults_from_the_files_apply(system_file: Path, user_file: Path) -> None:
    write(system_file, '[defaults]\nduration = "45m"\n')
    lease = chronos.reserve("1G", bind=False)
    assert lease.duration_s == 45 * 60 and lease.priority == "normal"
    lease.release()
    write(user_file, '[defaults]\npriority = "low"\n')
    lease = chronos.reserve("1G", bind=False)
    assert lease.priority == "low" and lease.duration_s == 45 * 60


def test_high_priority_refused_outside_the_groups(system_file: Path) -> None:
    me = current_user()
    mine = sorted(groups_of(me))
    write(system_file, 'admin_group = "no-such-admins"\n[limits]\nhigh_priority_groups = ["no-such-group-here"]\n')
    if me.uid == 0:
        chronos.reserve("1G", priority="high", bind=False).release()  # root is an admin
    else:
        with pytest.raises(NotAllowedError, match="priority high is for members of no-such-group-here"):
            chronos.reserve("1G", priority="high", bind=False)
    if mine:
        write(system_file, f'[limits]\nhigh_priority_groups = ["{mine[0]}"]\n')
        chronos.reserve("1G", priority="high", bind=False).release()


def test_a_broken_file_stops_every_command_with_exit_2(system_file: Path) -> None:
    write(system_file, "[limits]\nmax_leases = 3\n")
    result = run_cli("reserve", "1G", "1h")
    assert result.returncode == 2
    assert f"{system_file}:2: unknown setting 'limits.max_leases'" in result.stderr
    assert "Traceback" not in result.stderr


# -- chronos config -----------------------------------------------------------------------------------
def test_cli_config_shows_values_and_sources(system_file: Path, user_file: Path) -> None:
    write(system_file, '[limits]\nmax_duration = "8h"\n')
    write(user_file, '[defaults]\nduration = "30m"\n')
    result = run_cli("config")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[3:] if line.strip()}
    assert lines["limits.max_duration"] == ["8h", str(system_file)]
    assert lines["defaults.duration"] == ["30m", str(user_file)]
    assert lines["defaults.priority"] == ["normal", "default"]
    assert lines["state_dir"][-2:] == ["env", "CHRONOS_STATE_DIR"]
    as_json = json.loads(run_cli("config", "--json").stdout)
    assert as_json["system_file"] == {"path": str(system_file), "read": True}
    assert as_json["settings"]["limits.max_duration"] == {"value": 8 * 3600.0, "text": "8h",
                                                          "source": str(system_file)}
    assert as_json["settings"]["limits.max_leases_per_user"]["value"] is None
    assert {s.name for s in describe(load_config())} == set(as_json["settings"])


def test_usage_counts_active_and_queued_leases_of_the_user_on_every_gpu() -> None:
    from chronos import scheduler
    from chronos.model import LeaseRecord as Lease
    from chronos.model import LeaseState
    from chronos.units import MemorySpec

    def made(lease_id: str, uid: int, state: str, devices: tuple[int, ...], gib: int) -> Lease:
        return Lease(id=lease_id, owner="x", uid=uid, devices=devices, device_uuids=(), memory_bytes=gib * G,
                     created_at=0.0, expires_at=None, duration_s=60.0, state=LeaseState(state))

    leases = [made("1", 7, "active", (0, 1), 10), made("2", 7, "queued", (), 5), made("3", 7, "released", (0,), 50),
              made("4", 8, "active", (0,), 30)]
    queue = [scheduler.Request(memory=MemorySpec(nbytes=5 * G), duration_s=60, gpus=4, lease_id="2")]
    assert limits.usage_of(leases, 7, queue) == limits.Usage(2, 20 * G + 20 * G, 2 + 4)
    assert limits.usage_of(leases, 7) == limits.Usage(2, 25 * G, 2 + 1)
    assert limits.usage_of(leases, 8) == limits.Usage(1, 30 * G, 1)


def test_the_configured_expiry_behaviour_reaches_the_watchdog(system_file: Path, user_file: Path) -> None:
    from chronos.enforce.watchdog import Watchdog

    write(system_file, '[defaults]\non_expiry = "kill"\n')
    lease = chronos.reserve("1G", "10m", bind=False)
    me = os.getpid()
    assert Watchdog(lease, pid=me).on_expiry == "kill"
    write(user_file, '[defaults]\non_expiry = "warn"\n')
    assert Watchdog(lease, pid=me).on_expiry == "kill"  # a lease's engine keeps the settings it was made with
    lease = chronos.get_lease(lease.id)
    assert Watchdog(lease, pid=me).on_expiry == "warn"
    assert Watchdog(lease, pid=me, on_expiry="interrupt").on_expiry == "interrupt"  # an explicit choice wins

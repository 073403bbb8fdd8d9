"""Limits per user and per group: the file's tables, the precedence, and real OS groups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import chronos
from chronos import limits
from chronos.api import reset_default_engine
from chronos.config import ConfigError, describe, load_config
from chronos.errors import LimitError
from tests.conftest import run_cli
from tests.os_users import needs_root, os_users

G = 1 << 30


def write(path: Path, text: str) -> None:
    path.write_text(text)
    reset_default_engine()


@pytest.fixture
def system_file() -> Path:
    return Path(os.environ["CHRONOS_CONFIG"])


def test_tables_are_read_with_their_sources(system_file: Path) -> None:
    write(system_file, '''[limits]
max_memory_per_lease = "40G"

[limits.groups.students]
max_memory_per_lease = "16G"
max_gpus_per_user = 1
idle_after = "20m"

[limits.users."j.doe"]
max_memory_per_lease = "none"
high_priority = true
''')
    config = load_config()
    assert dict(config.group_limits)["students"] == (("idle_after_s", 1200.0), ("max_gpus_per_user", 1),
                                                      ("max_memory_per_lease_bytes", 16 * G))
    assert dict(config.user_limits)["j.doe"] == (("high_priority", True), ("max_memory_per_lease_bytes", None))
    shown = {s.name: (s.text, s.source) for s in describe(config)}
    assert shown["limits.groups.students.max_memory_per_lease"] == ("16 GiB", str(system_file))
    assert shown["limits.users.j.doe.max_memory_per_lease"] == ("no limit", str(system_file))


@pytest.mark.parametrize(("text", "message"), [
    ('[limits.users.ann]\nmax_duraton = "1h"\n',
     r":2: unknown setting 'limits.users.ann.max_duraton'; did you mean 'max_duration'\?"),
    ('[limits]\n[limits.groups.ml]\n\nmax_leases_per_user = 0\n',
     r":4: bad value for limits.groups.ml.max_leases_per_user \(0\): give a whole number of at least 1"),
    ('[limits.groups.ml]\nhigh_priority_groups = ["x"]\n',
     r":2: unknown setting 'limits.groups.ml.high_priority_groups'"),
    ('[limits.users.ann]\non_idle = "explode"\n', r":2: bad value for limits.users.ann.on_idle"),
    ('[limits]\nusers = 3\n', r":2: limits.users must be tables"),
    ('[limits.users]\nann = 3\n', r":2: limits.users.ann must be a table"),
    ('[scheduling]\nfair_share = "yes"\n', r":2: bad value for scheduling.fair_share \('yes'\): give true or false"),
    ('[metrics]\ntextfile = "relative.prom"\n', r":2: bad value for metrics.textfile"),
])
def test_mistakes_in_tables_name_file_and_line(system_file: Path, text: str, message: str) -> None:
    write(system_file, text)
    with pytest.raises(ConfigError, match=message):
        load_config()


def test_a_user_file_may_not_set_a_table() -> None:
    user_file = Path(os.environ["CHRONOS_USER_CONFIG"])
    write(user_file, '[limits.users.me]\nmax_duration = "99h"\n')
    with pytest.raises(ConfigError, match=rf"^{user_file}:1: limits.users may only be set by the administrator"):
        load_config()


def test_precedence_user_over_groups_and_the_most_generous_group(system_file: Path) -> None:
    write(system_file, '''[limits]
max_memory_per_lease = "40G"
max_duration = "8h"
on_idle = "terminate"
idle_after = "30m"

[limits.groups.students]
max_memory_per_lease = "16G"
max_duration = "2h"
on_idle = "release"

[limits.groups.leads]
max_memory_per_lease = "60G"
idle_after = "off"

[limits.groups.night]
on_idle = "warn"
max_duration = "4h"

[limits.users.ann]
max_duration = "1h"
''')
    config = load_config()
    student = limits.effective(config, "bob", {"students"})
    assert student.max_memory_per_lease_bytes == 16 * G  # stricter than the global limit: the group's applies
    assert student.rule("max_memory_per_lease_bytes") == f"limits.groups.students.max_memory_per_lease in {system_file}"
    both = limits.effective(config, "cy", {"students", "leads", "night", "other"})
    assert both.max_memory_per_lease_bytes == 60 * G and both.idle_after_s is None  # the most generous group
    assert both.max_duration_s == 4 * 3600 and both.on_idle == "warn"
    ann = limits.effective(config, "ann", {"students", "leads"})
    assert ann.max_duration_s == 3600 and ann.rule("max_duration_s").startswith("limits.users.ann.max_duration")
    nobody = limits.effective(config, "dee", set())
    assert nobody.max_memory_per_lease_bytes == 40 * G and nobody.rule("max_memory_per_lease_bytes") == \
        f"limits.max_memory_per_lease in {system_file}"
    with pytest.raises(LimitError, match=r"more than the maximum of 16 GiB per lease \(limits.groups.students"):
        limits.check(config, limits.RequestInfo(20 * G, 1, 60.0), "bob", {"students"}, limits.Usage())


def test_high_priority_per_group_and_per_user(system_file: Path) -> None:
    write(system_file, '[limits]\nhigh_priority_groups = []\n[limits.groups.leads]\nhigh_priority = true\n'
                       '[limits.users.eve]\nhigh_priority = false\n')
    config = load_config()
    info = limits.RequestInfo(G, 1, 60.0, chronos.Priority.HIGH)
    limits.check(config, info, "lee", {"leads"}, limits.Usage(), admin=False)
    with pytest.raises(LimitError, match="priority high is for admins"):
        limits.check(config, info, "sam", {"staff"}, limits.Usage(), admin=False)
    with pytest.raises(LimitError, match=r"priority high is not for this user \(limits.users.eve.high_priority"):
        limits.check(config, info, "eve", {"leads"}, limits.Usage(), admin=False)


@needs_root
def test_group_limits_apply_with_real_os_groups(system_file: Path) -> None:
    with os_users({"ann": ("students", "leads"), "bob": ("students",), "cy": ()}) as u:
        write(system_file, f'''[limits]
max_memory_per_lease = "40G"
max_gpus_per_user = 2

[limits.groups.chrpol-students]
max_memory_per_lease = "16G"
max_gpus_per_user = 1

[limits.groups.chrpol-leads]
max_memory_per_lease = "60G"

[limits.users.{u["bob"]}]
max_leases_per_user = 1
''')
        refused = run_cli("reserve", "20G", "10m", "--user", u["bob"])
        assert refused.returncode == 4
        assert "more than the maximum of 16 GiB per lease (limits.groups.chrpol-students.max_memory_per_lease" \
            in refused.stderr
        assert chronos.reserve("16G", "10m", user=u["bob"], bind=False).state == "active"
        second = run_cli("reserve", "1G", "10m", "--user", u["bob"])
        assert second.returncode == 4 and f"limits.users.{u['bob']}.max_leases_per_user" in second.stderr
        assert chronos.reserve("50G", "10m", user=u["ann"], bind=False).state == "active"  # leads: 60G
        gpus = run_cli("reserve", "8G", "10m", "--gpus", "2", "--user", u["ann"])
        assert gpus.returncode == 4 and "holds 1 GPU(s) in leases; 2 more would pass the maximum of 1" in gpus.stderr
        assert run_cli("reserve", "50G", "10m", "--user", u["cy"]).returncode == 4  # no group: the global 40G
        shown = run_cli("config", "--user", u["ann"])
        assert shown.returncode == 0, shown.stderr
        rows = {line.split()[0]: line for line in shown.stdout.splitlines()[3:] if line.strip()}
        assert "60 GiB" in rows["max_memory_per_lease"] and "limits.groups.chrpol-leads" in rows["max_memory_per_lease"]
        assert "limits.groups.chrpol-students.max_gpus_per_user" in rows["max_gpus_per_user"]
        assert "default (not set)" in rows["max_duration"]
        as_json = json.loads(run_cli("config", "--user", u["ann"], "--json").stdout)
        assert sorted(as_json["groups"]) == ["chrpol-ann", "chrpol-leads", "chrpol-students"]
        assert as_json["limits"]["max_memory_per_lease"]["value"] == 60 * G
        assert run_cli("config", "--user", "chrpol-nobody-here").returncode == 2
        for lease in chronos.leases():
            lease.release()

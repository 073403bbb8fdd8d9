"""The ``[enforce]`` table: the documented file loads as written, and bad values stop in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chronos.config import load_config
from chronos.model import Action, OnUnmanaged
from tests.conftest import ROOT, run_cli


def _documented() -> str:
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("## The settings\n"):]
    found = re.search(r"```toml\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


def test_the_documented_settings_file_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(_documented())
    config = load_config({"CHRONOS_CONFIG": str(path), "CHRONOS_USER_CONFIG": str(tmp_path / "none.toml")})
    assert config.on_overuse == Action.TERMINATE and config.overuse_grace_s == 2.0
    assert config.unmanaged == OnUnmanaged.REPORT and config.unmanaged_grace_s == 60.0
    assert config.unmanaged_exempt == ("root",) and config.kill_wait_s == 30.0
    assert config.enforce_interval_s == 0.5 and config.gate_devices is False and str(config.device_dir) == "/dev"
    assert config.device_mode is None
    assert config.history_keep_s == 180 * 86400  # the [history] table of the same file


def test_the_defaults() -> None:
    config = load_config({"CHRONOS_CONFIG": "/nonexistent.toml", "CHRONOS_USER_CONFIG": "/nonexistent.toml"})
    assert (config.unmanaged, config.unmanaged_grace_s, config.gate_devices) == (OnUnmanaged.REPORT, 60.0, False)


@pytest.mark.parametrize("line, message", [
    ('unmanaged = "kill"', "bad value for enforce.unmanaged ('kill'): use one of report, warn, terminate"),
    ('interval = "0.01s"', "bad value for enforce.interval ('0.01s'): give an interval from 0.05s to 1m"),
    ('gate_devices = "yes"', "bad value for enforce.gate_devices ('yes'): give true or false"),
    ('device_dir = "dev"', "bad value for enforce.device_dir ('dev'): give an absolute path"),
    ('unmanaged_exempt = "root"', "bad value for enforce.unmanaged_exempt ('root'): give a list of user names"),
    ('gate_device = true', "unknown setting 'enforce.gate_device'; did you mean 'gate_devices'?"),
    ('device_mode = "0666"', "bad value for enforce.device_mode ('0666'): give a mode such as \"0660\": read-write "
                             "for the group, nothing for others"),
    ('device_mode = "0640"', "bad value for enforce.device_mode ('0640'): give a mode such as \"0660\""),
    ('device_mode = 660', "bad value for enforce.device_mode (660): give a mode such as \"0660\""),
])
def test_a_bad_value_is_one_line_naming_file_and_line(line: str, message: str, chronos_env: Path) -> None:
    path = chronos_env / "no-config.toml"
    path.write_text(f"[enforce]\n{line}\n")
    done = run_cli("config")
    assert done.returncode == 2
    assert done.stderr.startswith(f"chronos: error: {path}:2: {message}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_user_cannot_set_enforcement_in_their_own_file(chronos_env: Path) -> None:
    (chronos_env / "no-user-config.toml").write_text('[enforce]\nunmanaged = "report"\n')
    done = run_cli("config")
    assert done.returncode == 2 and "enforce.unmanaged may only be set by the administrator" in done.stderr


@pytest.mark.parametrize("value, mode", [('"0660"', 0o660), ('"660"', 0o660), ('"0760"', 0o760), ('"none"', None)])
def test_device_mode_is_octal_or_none(value: str, mode: int | None, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[enforce]\ngate_devices = true\ndevice_mode = {value}\n")
    config = load_config({"CHRONOS_CONFIG": str(path), "CHRONOS_USER_CONFIG": str(tmp_path / "none.toml")})
    assert config.device_mode == mode

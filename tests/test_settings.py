"""The settings snapshot follows the environment: a change to any variable it reads makes a new one."""

from __future__ import annotations

from pathlib import Path

import pytest

from chronos import settings


@pytest.fixture(autouse=True)
def _fresh() -> None:
    settings.refresh()


def test_the_snapshot_is_kept_while_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(tmp_path))
    assert settings.current() is settings.current()


@pytest.mark.parametrize("name", settings.ENV_KEYS)
def test_each_variable_makes_a_new_snapshot(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CHRONOS_BACKEND", "simulated")
    before = settings.current()
    value = {"CHRONOS_BACKEND": "auto", "CHRONOS_SIM_GPUS": "3x8G", "CHRONOS_SIM_TOPOLOGY": "",
             "CHRONOS_CONTEXT_RESERVE": "512M", "CHRONOS_SERVER": str(tmp_path / "s.sock")}.get(
        name, str(tmp_path / "x"))
    monkeypatch.setenv(name, value)
    changed = settings.current()
    assert changed is not before
    assert changed == settings.from_environ()
    monkeypatch.delenv(name)
    after = settings.current()
    assert after is not changed
    assert after == settings.from_environ()


def test_a_variable_set_then_removed_is_seen_both_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("CHRONOS_SIM_GPUS", raising=False)
    assert settings.current().sim_gpus is None
    monkeypatch.setenv("CHRONOS_SIM_GPUS", "2x80G")
    assert settings.current().sim_gpus == "2x80G"
    monkeypatch.delenv("CHRONOS_SIM_GPUS")
    assert settings.current().sim_gpus is None

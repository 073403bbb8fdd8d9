"""`chronos admin install-service`: the unit shipped in the package, written where systemd reads it.

CI has no systemd, so the written file is checked instead: its settings, and that the command line in
its ExecStart is one the `chronos` command line accepts.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from chronos.cli.app import build_parser
from chronos.service.install import serve_argv, unit_text
from tests.conftest import ROOT, run_cli


def _settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_is_written_with_this_python_and_restarts_on_failure(tmp_path: Path) -> None:
    done = run_cli("admin", "install-service", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "chronos.service"
    assert done.stdout.splitlines() == [f"wrote {unit}", "now run:", "  systemctl daemon-reload",
                                        "  systemctl enable --now chronos.service",
                                        "  systemctl status chronos.service"]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    text = unit.read_text()
    found = _settings(text)
    assert found["Restart"] == ["on-failure"] and found["Type"] == ["simple"]
    assert found["RuntimeDirectory"] == ["chronos"] and found["StateDirectory"] == ["chronos"]
    assert found["WantedBy"] == ["multi-user.target"]
    assert "@PYTHON@" not in text
    argv = serve_argv(text)
    assert argv == [sys.executable, "-m", "chronos", "serve", "--socket", "/run/chronos/chronos.sock",
                    "--state-dir", "/var/lib/chronos"]
    # the same again changes nothing; a changed file is replaced
    assert run_cli("admin", "install-service", "--dir", str(tmp_path)).stdout.startswith(f"wrote {unit}")
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    again = run_cli("admin", "install-service", "--dir", str(tmp_path))
    assert again.returncode == 0 and again.stdout.startswith(f"replaced {unit}")
    assert unit.read_text() == text


def test_the_serve_command_line_in_the_unit_is_one_chronos_accepts() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    if "serve" not in (commands or {}):
        pytest.skip("`chronos serve` is not part of this tree yet")
    argv = serve_argv(unit_text())
    assert argv[1:3] == ["-m", "chronos"]
    args = parser.parse_args(argv[3:])
    assert args.command == "serve" and callable(args.func)
    assert str(args.socket) == "/run/chronos/chronos.sock" and str(args.state_dir) == "/var/lib/chronos"


@pytest.mark.parametrize("args, message", [
    (["--dir", "/nonexistent/systemd"], "/nonexistent/systemd is not a directory; is systemd installed here?"),
    (["--python", "python3"], "the interpreter path 'python3' must be absolute"),
    (["--python", "/usr/bin/python3 -c evil"], "must be absolute, with no spaces or quotes"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    if "--dir" not in args:
        args = [*args, "--dir", str(tmp_path)]
    done = run_cli("admin", "install-service", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "chronos.service").exists()


def test_the_admin_guide_shows_what_the_command_does(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "admin-guide.md").read_text()
    section = text[text.index("## The Chronos service under systemd\n"):]
    block = section[section.index("```console\n") + len("```console\n"):section.index("```\n", 20)]
    command, *shown = block.strip("\n").splitlines()
    assert command == "$ sudo chronos admin install-service"
    done = run_cli("admin", "install-service", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [line.replace("/etc/systemd/system", str(tmp_path)) for line in shown]

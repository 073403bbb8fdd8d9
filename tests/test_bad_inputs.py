"""Bad input, table-driven: every mistake is one line, the documented exit code, no traceback, and a ledger
left exactly as it was (``PRAGMA integrity_check`` and the same rows before and after).

Most CLI cases call the CLI's ``run`` in this process against one real ledger file shared by the module
(fast); a smaller set runs as real ``python -m chronos`` processes. The magics run in a real IPython
``InteractiveShell``. Environment and configuration cases set the variables or write the files a user
would. Refused requests are written to the audit log as ``refused`` events by design (reports count
them); every other row must be untouched.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import chronos
from chronos import api, errors
from chronos.cli import app
from tests.conftest import run_cli

HUGE = "9" * 400
BAD_SIM = "CHRONOS_SIM_GPUS"


# -- the shared ledger ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One state directory for the module, holding an active lease (id 1), a released one (2) and an
    unbound one (3), made with the settings every case starts from."""
    state = tmp_path_factory.mktemp("bad-inputs")
    saved = {k: os.environ.get(k) for k in ("CHRONOS_STATE_DIR", "CHRONOS_CONFIG", "CHRONOS_USER_CONFIG",
                                            "CHRONOS_BACKEND", BAD_SIM, "NO_COLOR")}
    os.environ.update(CHRONOS_STATE_DIR=str(state), CHRONOS_CONFIG=str(state / "none.toml"),
                      CHRONOS_USER_CONFIG=str(state / "none-user.toml"), CHRONOS_BACKEND="simulated",
                      CHRONOS_SIM_GPUS="2x80G", NO_COLOR="1")
    api.reset_default_engine()
    chronos.reserve("8G", "2h", device=0, bind=False, label="first")
    chronos.release(chronos.reserve("4G", "1h", device=1, bind=False).id)
    chronos.reserve("2G", "3h", device=1, bind=False)
    api.reset_default_engine()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    yield state


@pytest.fixture
def shared(ledger_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The module's ledger for this test; checked intact and unchanged afterwards."""
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(ledger_dir))
    monkeypatch.setenv("CHRONOS_CONFIG", str(ledger_dir / "none.toml"))
    monkeypatch.setenv("CHRONOS_USER_CONFIG", str(ledger_dir / "none-user.toml"))
    api.reset_default_engine()
    before = snapshot(ledger_dir)
    yield ledger_dir
    api.reset_default_engine()
    assert snapshot(ledger_dir) == before


def snapshot(state: Path) -> tuple[list[Any], list[Any]]:
    """Every lease row and every audit event but refusals, after ``PRAGMA integrity_check``."""
    db = sqlite3.connect(f"file:{state / 'chronos.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        leases = db.execute("SELECT * FROM leases ORDER BY seq").fetchall()
        events = db.execute("SELECT * FROM events WHERE event != 'refused' ORDER BY id").fetchall()
    finally:
        db.close()
    return leases, events


def cli(*argv: str) -> tuple[int, str, str]:
    """The CLI's ``run`` in this process: exit code, stdout, stderr. An exception other than argparse's
    SystemExit propagates, so a traceback fails the test."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline=""), io.StringIO()  # out has a .buffer
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = app.run(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    out.flush()
    buffer = out.buffer
    assert isinstance(buffer, io.BytesIO)
    return code, buffer.getvalue().decode("utf-8"), err.getvalue()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert "\x1b" not in stderr
    return lines[0]


# -- the CLI, in process -------------------------------------------------------------------------------

B, U, N, F = errors.EXIT_BAD_INPUT, errors.EXIT_UNAVAILABLE, errors.EXIT_NOT_ALLOWED, errors.EXIT_NO_SUCH_LEASE
E = errors.EXIT_ERROR

CLI_CASES: list[tuple[list[str], int, str]] = [
    # sizes
    (["reserve", "1bG", "1h"], B, "cannot read memory"),
    (["reserve", "2", "1h"], B, "for 2 GiB write 2G"),
    (["reserve", "8", "1h"], B, "1 --gpus 8"),
    (["reserve", "1.5", "1h"], B, "write 1.5G"),
    (["reserve", HUGE, "1h"], B, "far larger than any GPU"),
    (["reserve", HUGE + "G", "1h"], B, "far larger than any GPU"),
    (["reserve", "99999999999T", "1h"], B, "far larger than any GPU"),
    (["reserve", "1e9G", "1h"], B, "cannot read memory"),
    (["reserve", "nan", "1h"], B, "cannot read memory"),
    (["reserve", "inf", "1h"], B, "cannot read memory"),
    (["reserve", "nan%", "1h"], B, "cannot read memory"),
    (["reserve", "inf%", "1h"], B, "cannot read memory"),
    (["reserve", "0G", "1h"], B, "0 bytes"),
    (["reserve", "0.0000001K", "1h"], B, "0 bytes"),
    (["reserve", "0", "1h"], B, "above 0"),
    (["reserve", "0%", "1h"], B, "above 0"),
    (["reserve", "101%", "1h"], B, "at most 1"),
    (["reserve", "①G", "1h"], B, "cannot read memory"),
    (["reserve", "８G", "1h"], B, "cannot read memory"),
    (["reserve", "8G\x1b[2J", "1h"], B, "cannot read memory"),
    (["reserve", "8 G B", "1h"], B, "cannot read memory"),
    (["reserve", "", "1h"], B, "cannot read memory"),
    (["reserve", "81G", "1h"], B, "never fit"),
    (["reserve", "1T", "1h"], B, "never fit"),
    # durations
    (["reserve", "1G", "999999999999999d"], B, "too long"),
    (["reserve", "1G", HUGE], B, "too long"),
    (["reserve", "1G", "367d"], B, "at most 366d"),
    (["reserve", "1G", "nan"], B, "cannot read duration"),
    (["reserve", "1G", "inf"], B, "cannot read duration"),
    (["reserve", "1G", "-inf"], B, "unrecognized arguments"),
    (["reserve", "1G", "1e3"], B, "cannot read duration"),
    (["reserve", "1G", "0.0001s"], B, "too short"),
    (["reserve", "1G", "0.5"], B, "too short"),
    (["reserve", "1G", "0"], B, "more than 0"),
    (["reserve", "1G", "0s"], B, "more than 0"),
    (["reserve", "1G", "１h"], B, "cannot read duration"),
    (["reserve", "1G", "1h\n2h"], B, "cannot read duration"),
    (["reserve", "1G", "1y"], B, "cannot read duration"),
    # --wait
    (["reserve", "1G", "1h", "--wait", "nan"], B, "--wait"),
    (["reserve", "1G", "1h", "--wait", "inf"], B, "--wait"),
    (["reserve", "1G", "1h", "--wait", "99999999999999999999d"], B, "--wait forever"),
    (["reserve", "1G", "1h", "--wait", "-5"], B, "--wait"),
    (["reserve", "1G", "1h", "--wait", "soon"], B, "--wait"),
    # GPUs
    (["reserve", "1G", "1h", "--gpu", "7"], B, "unknown GPU 7"),
    (["reserve", "1G", "1h", "--gpu", HUGE], B, "no GPU has such an index"),
    (["reserve", "1G", "1h", "--gpu", "①"], B, "invalid --gpu"),
    (["reserve", "1G", "1h", "--gpu", "-1"], B, "start at 0"),
    (["reserve", "1G", "1h", "--gpu", "0,0"], B, "twice"),
    (["reserve", "1G", "1h", "--gpu", ","], B, "invalid --gpu"),
    (["reserve", "1G", "1h", "--gpu", "0," * 2000], B, "GPUs named"),
    (["reserve", "1G", "1h", "--prefer", "7"], B, "no GPU 7"),
    (["reserve", "1G", "1h", "--prefer", "0,9"], B, "no GPU 9"),
    (["reserve", "1G", "1h", "--prefer", "x"], B, "invalid --prefer"),
    (["reserve", "1G", "1h", "--gpus", "0"], B, "1 or more"),
    (["reserve", "1G", "1h", "--gpus", "3"], B, "3 GPUs"),
    (["reserve", "1G", "1h", "--gpus", HUGE[:30]], B, "GPUs"),
    (["reserve", "1G", "1h", "--gpus", "two"], B, "invalid int"),
    (["reserve", "1G", "1h", "--gpus", "2", "--gpu", "0"], B, "disagree"),
    # labels
    (["reserve", "1G", "1h", "--label", "a\nb"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "row\r1  root"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "\x1b[2J\x1b[H"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "evil\u202eoxt"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "tab\there"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "bell\a"], B, "control character"),
    (["reserve", "1G", "1h", "--label", "x" * 201], B, "too long"),
    (["reserve", "1G", "1h", "--label", "line\u2028sep"], B, "control character"),
    # other reserve options
    (["reserve", "1G", "1h", "--priority", "urgent"], B, "invalid choice"),
    (["reserve", "1G", "1h", "--user", "no-such-user-here"], B, "no such user"),
    (["reserve", "1G", "1h", "--user", "①"], B, "no such user"),
    (["reserve", "1G", "1h", "--user", HUGE], B, "no such user"),
    (["reserve", "1G", "1h", "--user", "a\x1b[2Jb"], B, "no such user"),
    (["reserve", "1G", "1h", "--pid", HUGE[:30]], B, "no running process"),
    (["reserve", "1G", "1h", "--pid", "-1"], B, "process id"),
    (["list", "--user", "①"], B, "no such user"),
    (["reserve", "1G", "1h", "--pid", "x"], B, "invalid int"),
    (["reserve", "50G", "1h", "--gpu", "0", "--gpus", "1", "--wait", "0"], B, "--wait"),
    (["reserve", "79G", "1h", "--gpu", "0"], U, "add --wait"),
    (["reserve"], B, "required"),
    (["reserve", "1G", "1h", "extra"], B, "unrecognized"),
    # the original's create
    (["create", "0", "nan", "60"], B, "FRACTION"),
    (["create", "0", "inf", "60"], B, "FRACTION"),
    (["create", "0", "0.5", "nan"], B, "cannot read duration"),
    (["create", "0", "0.5", "999999999999999"], B, "too long"),
    (["create", "0", "0.5", "0.001"], B, "too short"),
    (["create", HUGE, "0.5", "60"], B, "GPU"),
    (["create", "①", "0.5", "60"], B, "DEVICE"),
    # lease ids
    (["show", "10^26"], F, "no lease"),
    (["show", "①"], F, "no lease"),
    (["show", HUGE], F, "no lease"),
    (["show", "-1"], F, "no lease"),
    (["show", "1.0"], F, "no lease"),
    (["show", "L"], F, "no lease"),
    (["show", "partition_"], F, "no lease"),
    (["show", "\x1b[2J"], F, "no lease"),
    (["show", "999"], F, "no lease"),
    (["release", "①"], F, "no lease"),
    (["release", HUGE], F, "no lease"),
    (["release", "10^26"], F, "no lease"),
    (["extend", "①", "1h"], F, "no lease"),
    (["extend", HUGE, "1h"], F, "no lease"),
    (["claim", "①"], F, "no lease"),
    # extend
    (["extend", "1", "999999999999999d"], B, "too long"),
    (["extend", "1", "nan"], B, "cannot read duration"),
    (["extend", "1", "inf"], B, "cannot read duration"),
    (["extend", "1", "366d"], B, "longest lease here"),
    (["extend", "1", "0"], B, "more than 0"),
    (["extend", "1", "0.01s"], B, "too short"),
    (["extend", "1h", "1"], B, "chronos extend 1 1h"),
    (["extend", "30m", "L1"], B, "chronos extend L1 30m"),
    (["extend", "2", "1h"], U, "has ended"),
    (["extend", "1"], B, "required"),
    # other commands
    (["available", HUGE], B, "GPU"),
    (["available", "①"], B, "GPU"),
    (["book", "1G", "1h", "--at", "nan"], B, "cannot read time"),
    (["book", "1G", "1h", "--at", "+999999999999999d"], B, "cannot read time"),
    (["book", "1G", "999999999999999d", "--at", "+1h"], B, "too long"),
    (["book", "1G", "1h", "--at", "+1h", "--label", "a\nb"], B, "control character"),
    (["book", "1G", "1h", "--at", "99999-01-01"], B, "cannot read time"),
    (["book", "1G", "0.5s", "--at", "+1h"], B, "too short"),
    (["report", "--since", "nan"], B, "cannot read time"),
    (["report", "--since", HUGE], B, ""),
    (["run", "1G", "1h", "--grace", "nan", "--", "true"], B, "--grace"),
    (["run", "1G", "1h", "--grace", "inf", "--", "true"], B, "--grace"),
    (["run", "1G", "1h", "--grace", "1e300", "--", "true"], B, "too long"),
    (["run", "1G", "1h", "--grace", "-1", "--", "true"], B, "0 seconds or more"),
    (["run", "1G", "1h", "--kill-wait", "nan", "--", "true"], B, "--kill-wait"),
    (["run", "1G", "1h", "--kill-wait", "inf", "--", "true"], B, "--kill-wait"),
    (["run", "1G", "999999999999999d", "--", "true"], B, "too long"),
    (["run", "2", "1h", "--", "true"], B, "write 2G"),
    (["frobnicate"], B, "invalid choice"),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), CLI_CASES, ids=[" ".join(a)[:60] for a, _c, _f in CLI_CASES])
def test_cli_mistakes(shared: Path, argv: list[str], code: int, fragment: str) -> None:
    got, out, err = cli(*argv)
    assert got == code, (out, err)
    line = one_line(err)
    assert fragment in line
    assert "must be positive" not in line and "extend later" not in line
    if code == B and argv[0] not in ("frobnicate",) and "error: argument" not in line and "required" not in line \
            and "unrecognized" not in line and "invalid" not in line[:40]:
        assert line.startswith("chronos: error: ")


def test_a_parse_error_names_the_subcommands_own_help(shared: Path) -> None:
    _code, _out, err = cli("extend", "1")
    assert "see `chronos extend --help`" in one_line(err)


@pytest.mark.parametrize("command", ["reserve", "run", "create", "extend", "book", "list", "show", "release"])
def test_help_text_is_written_as_typed(shared: Path, command: str) -> None:
    code, out, _err = cli(command, "--help")
    assert code == 0
    assert f"usage: chronos {command}" in out  # the subcommand's own help, not the top level's
    assert "%%" not in out


def test_the_help_says_what_a_bare_number_is(shared: Path) -> None:
    _code, out, _err = cli("reserve", "--help")
    assert "50%" in out and "fraction of each GPU" in " ".join(out.split())


def test_one_and_two_are_the_same_kind_of_thing(shared: Path) -> None:
    """``reserve 1 1h`` is all of one GPU; ``reserve 2 1h`` is no GPU's fraction, and says how to write what
    it may have meant (the memory, or two whole GPUs), which reads as ``1 --gpus 2``."""
    code, _out, _err = cli("reserve", "1", "1h", "--gpu", "0", "--json")
    assert code == U  # lease 1 holds 8G of GPU 0: all of it cannot be had, but it is a valid request
    code, _out, err = cli("reserve", "2", "1h")
    assert code == B and "1 --gpus 2" in one_line(err)


# -- the CLI as real processes ---------------------------------------------------------------------------

PROCESS_CASES: list[tuple[list[str], dict[str, str], int, str]] = [
    (["extend", "1", "999999999999999d"], {}, B, "too long"),
    (["show", "10^26"], {}, F, "no lease"),
    (["show", "①"], {}, F, "no lease"),
    (["reserve", HUGE, "1h"], {}, B, "far larger"),
    (["reserve", "1G", "1h", "--label", "a\nb\x1b[2J"], {}, B, "control character"),
    (["stats"], {BAD_SIM: "99999999999x80G"}, B, "more than 256 devices"),
    (["list"], {"CHRONOS_CONFIG": "/etc/passwd/config.toml"}, B, "is a file"),
    (["list"], {"CHRONOS_STATE_DIR": "relative/dir"}, B, "absolute path"),
    (["list"], {"CHRONOS_CONTEXT_RESERVE": "lots"}, B, "CHRONOS_CONTEXT_RESERVE"),
    (["reserve", "1G", "1h", "--prefer", "5"], {}, B, "no GPU 5"),
]


@pytest.mark.parametrize(("argv", "env", "code", "fragment"), PROCESS_CASES,
                         ids=[" ".join(a)[:40] + str(sorted(e)) for a, e, _c, _f in PROCESS_CASES])
def test_cli_mistakes_in_a_real_process(shared: Path, argv: list[str], env: dict[str, str], code: int,
                                        fragment: str) -> None:
    done = run_cli(*argv, env=env)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert fragment in one_line(done.stderr)


def test_xdg_config_home_naming_a_file_breaks_nothing(shared: Path) -> None:
    """A user's file behind a file is no user file: it holds personal defaults only, so every command works."""
    done = run_cli("list", env={"XDG_CONFIG_HOME": "/etc/passwd", "CHRONOS_USER_CONFIG": ""})
    assert done.returncode == 0, done.stderr
    assert "first" in done.stdout and done.stderr == ""


# -- the environment ------------------------------------------------------------------------------------

ENV_CASES: list[tuple[dict[str, str], int, str]] = [
    ({BAD_SIM: "99999999999x80G"}, B, "more than 256 devices"),
    ({BAD_SIM: "300x1G"}, B, "more than 256 devices"),
    ({BAD_SIM: HUGE + "G"}, B, "CHRONOS_SIM_GPUS"),
    ({BAD_SIM: "0x80G"}, B, "a count of 0"),
    ({BAD_SIM: "80G,,80G"}, B, "empty entry"),
    ({BAD_SIM: "50%"}, B, "fraction"),
    ({BAD_SIM: "nan"}, B, "CHRONOS_SIM_GPUS"),
    ({BAD_SIM: "①x80G"}, B, "CHRONOS_SIM_GPUS"),
    ({"CHRONOS_BACKEND": "cuda"}, B, "CHRONOS_BACKEND"),
    ({"CHRONOS_SIM_TOPOLOGY": "garbage"}, B, "CHRONOS_SIM_TOPOLOGY"),
    ({"CHRONOS_SIM_TOPOLOGY": "0-9"}, B, "only 2 simulated GPUs"),
    ({"CHRONOS_SIM_TOPOLOGY": "①-1"}, B, "CHRONOS_SIM_TOPOLOGY"),
    ({"CHRONOS_SIM_TOPOLOGY": "0-" + HUGE}, B, "CHRONOS_SIM_TOPOLOGY"),
    ({"CHRONOS_SIM_TOPOLOGY": "0-1," * 3000}, B, "CHRONOS_SIM_TOPOLOGY"),
    ({"CHRONOS_CONTEXT_RESERVE": "lots"}, B, "not a size"),
    ({"CHRONOS_CONTEXT_RESERVE": HUGE}, B, "larger than any GPU"),
    ({"CHRONOS_CONTEXT_RESERVE": "-5"}, B, "not a size"),
    ({"CHRONOS_CONTEXT_RESERVE": "nan"}, B, "not a size"),
    ({"CHRONOS_STATE_DIR": "relative"}, B, "absolute path"),
    ({"CHRONOS_STATE_DIR": "./here"}, B, "absolute path"),
    ({"CHRONOS_STATE_DIR": "~/chronos"}, B, "absolute path"),
    ({"CHRONOS_STATE_DIR": "/etc/passwd/chronos"}, E, ""),
    ({"CHRONOS_STATE_DIR": "/etc/passwd"}, E, ""),
    ({"CHRONOS_CONFIG": "/etc/passwd/config.toml"}, B, "is a file"),
    ({"CHRONOS_CONFIG": "/etc"}, B, "is a directory"),
    ({"CHRONOS_CONFIG": "/bin/true"}, B, ""),
    ({"CHRONOS_USER_CONFIG": "/etc"}, B, "is a directory"),
]


@pytest.mark.parametrize(("env", "code", "fragment"), ENV_CASES, ids=[str(e)[:60] for e, _c, _f in ENV_CASES])
def test_environment_mistakes(shared: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], code: int,
                              fragment: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    got, out, err = cli("stats")  # a command that reads the settings, the config and the GPUs
    assert got == code, (out, err)
    assert fragment in one_line(err)


def test_a_bad_lease_id_in_the_environment_is_said_in_the_magics(shared: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_LEASE_ID", "abc")
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chronos_jupyter")
    try:
        assert "CHRONOS_LEASE_ID='abc' is not a lease id" in magic_error(ip, "%chronos status")
    finally:
        ip.run_line_magic("unload_ext", "chronos_jupyter")


# -- configuration files -------------------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, str]] = [
    ('[defaults]\nduration = "999999999999999d"\n', "too long"),
    ('[defaults]\nduration = "nan"\n', "cannot read duration"),
    ('[defaults]\nduration = "inf"\n', "cannot read duration"),
    ("[defaults]\nduration = inf\n", "too long"),
    ("[defaults]\nduration = nan\n", "cannot read duration"),
    ('[defaults]\nduration = "0.1s"\n', "too short"),
    ('[defaults]\nduration = "30d"\nlongest_duration = "7d"\n', "unknown setting"),
    ('longest_duration = "7d"\n[defaults]\nduration = "30d"\n', "longer than longest_duration"),
    ('longest_duration = "7d"\n[limits]\nmax_duration = "8d"\n', "limits.max_duration (8d) is longer than"),
    ('[limits]\nmax_duration = "400d"\n', "raise longest_duration"),
    ('longest_duration = "999999999999d"\n', "too long"),
    ('longest_duration = "nan"\n', "cannot read duration"),
    ("longest_duration = -1\n", "more than 0"),
    ('[limits]\nmax_duration = "999999999999999d"\n', "too long"),
    ('[limits]\nmax_duration = "inf"\n', "cannot read duration"),
    (f'[limits]\nmax_memory_per_lease = "{HUGE}G"\n', "far larger"),
    ("[limits]\nmax_memory_per_lease = 1e400\n", "give a size"),
    ('[limits]\nmax_memory_per_user = "nan"\n', "cannot read memory"),
    ('[limits]\nidle_after = "nan"\n', "cannot read duration"),
    ("[limits]\nmax_leases_per_user = 1e9\n", "whole number"),
    ('[limits]\nmax_booked_hours_per_week = nan\n', "positive number of hours"),
    ('[scheduling]\nfair_share_half_life = "inf"\n', "cannot read duration"),
    ('[metrics]\ninterval = "nan"\n', "cannot read duration"),
    ('state_dir = "relative"\n', "absolute path"),
    ("[defaults\n", "not valid TOML"),
    ('[defaults]\nduraton = "1h"\n', "did you mean"),
]


@pytest.mark.parametrize(("text", "fragment"), CONFIG_CASES, ids=[t[:40] for t, _f in CONFIG_CASES])
def test_config_file_mistakes(shared: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str,
                              fragment: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("CHRONOS_CONFIG", str(path))
    got, out, err = cli("list")
    assert got == B, (out, err)
    line = one_line(err)
    assert fragment in line and str(path) in line


@pytest.mark.parametrize(("text", "fragment"), [
    ('[defaults]\nduration = "999999999999999d"\n', "too long"),
    ('[defaults]\nduration = "0.01s"\n', "too short"),
    ('[limits]\nmax_duration = "1h"\n', "administrator"),
], ids=["long", "short", "limit"])
def test_user_config_mistakes(shared: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str,
                              fragment: str) -> None:
    path = tmp_path / "user.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("CHRONOS_USER_CONFIG", str(path))
    got, out, err = cli("reserve", "1G")
    assert got == B, (out, err)
    assert fragment in one_line(err)


def test_the_longest_duration_is_configurable(shared: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('longest_duration = "4h"\n', encoding="utf-8")
    monkeypatch.setenv("CHRONOS_CONFIG", str(path))
    got, _out, err = cli("reserve", "1G", "5h")
    assert got == B and "at most 4h" in one_line(err)
    got, _out, err = cli("extend", "1", "3h")  # lease 1 is 2h long: 5h in all
    assert got == B and "the longest lease here is 4h" in one_line(err)
    got, out, _err = cli("config")
    assert got == 0 and "longest_duration" in out and "4h" in out


# -- the Python API ------------------------------------------------------------------------------------

API_CASES: list[tuple[str, Callable[[], object], type[BaseException]]] = [
    ("memory None", lambda: chronos.reserve(None, "1h", bind=False), ValueError),  # type: ignore[arg-type]
    ("memory list", lambda: chronos.reserve([1], "1h", bind=False), ValueError),  # type: ignore[arg-type]
    ("memory nan", lambda: chronos.reserve(math.nan, "1h", bind=False), ValueError),
    ("memory inf", lambda: chronos.reserve(math.inf, "1h", bind=False), ValueError),
    ("memory 10**30", lambda: chronos.reserve(10**30, "1h", bind=False), ValueError),
    ("memory -1", lambda: chronos.reserve(-1, "1h", bind=False), ValueError),
    ("memory True", lambda: chronos.reserve(True, "1h", bind=False), ValueError),
    ("memory '2'", lambda: chronos.reserve("2", "1h", bind=False), ValueError),
    ("duration nan", lambda: chronos.reserve("1G", math.nan, bind=False), ValueError),
    ("duration inf", lambda: chronos.reserve("1G", math.inf, bind=False), ValueError),
    ("duration -inf", lambda: chronos.reserve("1G", -math.inf, bind=False), ValueError),
    ("duration 1e300", lambda: chronos.reserve("1G", 1e300, bind=False), ValueError),
    ("duration 10**400", lambda: chronos.reserve("1G", 10**400, bind=False), ValueError),
    ("duration 0.001", lambda: chronos.reserve("1G", 0.001, bind=False), ValueError),
    ("duration list", lambda: chronos.reserve("1G", [1], bind=False), ValueError),  # type: ignore[arg-type]
    ("wait nan", lambda: chronos.reserve("1G", "1h", bind=False, wait=math.nan), ValueError),
    ("wait -inf", lambda: chronos.reserve("1G", "1h", bind=False, wait=-math.inf), ValueError),
    ("wait 1e300", lambda: chronos.reserve("1G", "1h", bind=False, wait=1e300), ValueError),
    ("wait list", lambda: chronos.reserve("1G", "1h", bind=False, wait=[1]), ValueError),  # type: ignore[arg-type]
    ("wait 'soon'", lambda: chronos.reserve("1G", "1h", bind=False, wait="soon"), ValueError),
    ("device ①", lambda: chronos.reserve("1G", "1h", bind=False, device="①"), ValueError),
    ("device 10**30", lambda: chronos.reserve("1G", "1h", bind=False, device=10**30), ValueError),
    ("gpus True", lambda: chronos.reserve("1G", "1h", bind=False, gpus=True), ValueError),
    ("gpus '2.5'", lambda: chronos.reserve("1G", "1h", bind=False, gpus="2.5"), ValueError),  # type: ignore[arg-type]
    ("prefer 9", lambda: chronos.reserve("1G", "1h", bind=False, prefer=9), ValueError),
    ("label int", lambda: chronos.reserve("1G", "1h", bind=False, label=5), ValueError),  # type: ignore[arg-type]
    ("label newline", lambda: chronos.reserve("1G", "1h", bind=False, label="a\nb"), ValueError),
    ("label escape", lambda: chronos.reserve("1G", "1h", bind=False, label="\x1b[31m"), ValueError),
    ("priority", lambda: chronos.reserve("1G", "1h", bind=False, priority="urgent"), ValueError),
    ("extend nan", lambda: chronos.extend(1, math.nan), ValueError),
    ("extend None", lambda: chronos.extend(1, None), ValueError),  # type: ignore[arg-type]
    ("extend huge", lambda: chronos.extend(1, "999999999999999d"), ValueError),
    ("get 10**26", lambda: chronos.get_lease(10**26), LookupError),
    ("get ①", lambda: chronos.get_lease("①"), LookupError),
    ("get None", lambda: chronos.get_lease(None), LookupError),  # type: ignore[arg-type]
    ("release ①", lambda: chronos.release("①"), LookupError),
    ("book at nan", lambda: chronos.book("1G", "1h", math.nan), ValueError),
    ("book at inf", lambda: chronos.book("1G", "1h", "+inf"), ValueError),
    ("book huge", lambda: chronos.book("1G", "999999999999999d", "+1h"), ValueError),
    ("forecast nan", lambda: chronos.forecast("1G", math.nan), ValueError),
    ("bind 'x'", lambda: chronos.reserve("1G", "1h", bind="x"), ValueError),  # type: ignore[arg-type]
    ("bind 10**30", lambda: chronos.reserve("1G", "1h", bind=10**30), ValueError),
    ("user int", lambda: chronos.reserve("1G", "1h", bind=False, user=5), ValueError),  # type: ignore[arg-type]
    ("user ①", lambda: chronos.reserve("1G", "1h", bind=False, user="①"), ValueError),
    ("user NUL", lambda: chronos.reserve("1G", "1h", bind=False, user="a\0b"), ValueError),
    ("user 10**30", lambda: chronos.reserve("1G", "1h", bind=False, user=str(10**30)), ValueError),
    ("leases user", lambda: chronos.leases(user="no-such-user-here"), ValueError),
    ("report by", lambda: chronos.report(by="bogus"), ValueError),
    ("report since nan", lambda: chronos.report(since=math.nan), ValueError),
    ("idle_after nan", lambda: chronos.reserve("1G", "1h", bind=False, idle_after="nan"), ValueError),
    ("on_idle", lambda: chronos.reserve("1G", "1h", bind=False, on_idle="bogus"), ValueError),
    ("claim None", lambda: chronos.claim(None), LookupError),  # type: ignore[arg-type]
    ("Partitioner nan", lambda: chronos.Partitioner().create(0, math.nan, 60), ValueError),
    ("Partitioner inf", lambda: chronos.Partitioner().create(0, 0.5, math.inf), ValueError),
    ("Partitioner GPU", lambda: chronos.Partitioner().create(10**30, 0.5, 60), ValueError),
]


@pytest.mark.parametrize(("name", "call", "builtin"), API_CASES, ids=[n for n, _c, _b in API_CASES])
def test_api_mistakes_raise_chronos_errors(shared: Path, name: str, call: Callable[[], object],
                                           builtin: type[BaseException]) -> None:
    with pytest.raises(errors.ChronosError) as info:
        call()
    assert isinstance(info.value, builtin)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 400


def test_the_api_takes_the_cli_spellings() -> None:
    lease = chronos.reserve("1G", "1h", wait="5m", gpus="1", device="0", prefer="0", bind=False)  # type: ignore[arg-type]
    assert lease.state == "active" and lease.devices == (0,)
    assert chronos.extend(lease.id, "30m").expires_at == pytest.approx(lease.expires_at + 1800, abs=1)
    assert chronos.get_lease(f"L{lease.id}").id == lease.id
    assert chronos.get_lease(f"partition_{int(lease.id):04d}").id == lease.id
    chronos.release(lease.id)


# -- the magics, in a real IPython shell ------------------------------------------------------------------


@pytest.fixture
def ip(shared: Path) -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "chronos_jupyter")
    yield shell
    shell.run_line_magic("unload_ext", "chronos_jupyter")
    for key in ("CUDA_VISIBLE_DEVICES", "CHRONOS_LEASE_ID"):
        os.environ.pop(key, None)


def magic_error(shell: InteractiveShell, source: str) -> str:
    """Run ``source``: a UsageError shown as one line and no traceback; its message."""
    with capture_output() as captured:
        result = shell.run_cell(source, store_history=False)
    error = result.error_in_exec or result.error_before_exec
    assert isinstance(error, UsageError), (error, captured.stdout, captured.stderr)
    assert "Traceback" not in captured.stderr and "Traceback" not in captured.stdout
    lines = [line for line in captured.stderr.splitlines() if line.strip()]
    assert lines == [f"UsageError: {error}"], captured.stderr
    assert "\x1b" not in str(error) and "\n" not in str(error)
    return str(error)


MAGIC_CASES: list[tuple[str, str]] = [
    ("%chronos reserve 2 1h", "for 2 GiB write 2G"),
    ("%chronos reserve 1bG 1h", "cannot read memory"),
    (f"%chronos reserve {HUGE} 1h", "far larger"),
    ("%chronos reserve 1G nan", "cannot read duration"),
    ("%chronos reserve 1G inf", "cannot read duration"),
    ("%chronos reserve 1G 999999999999999d", "too long"),
    ("%chronos reserve 1G 400d", "at most 366d"),
    ("%chronos reserve 1G 0.001s", "too short"),
    ("%chronos reserve 1G 1h --wait nan", "--wait"),
    ("%chronos reserve 1G 1h --wait 99999999999999999999d", "--wait forever"),
    ("%chronos reserve 1G 1h --prefer 7", "no GPU 7"),
    ("%chronos reserve 1G 1h --gpu ①", "invalid --gpu"),
    ("%chronos reserve 1G 1h --gpus 0", "1 or more"),
    ("%chronos reserve 1G 1h --priority urgent", "priority"),
    ("%chronos reserve 1G 1h --label 'a\x1b[2Jb'", "control character"),
    ("%chronos reserve 1G 1h --label 'x\u202ey'", "control character"),
    ("%chronos reserve 79G 1h --gpu 0", "add --wait"),
    ("%chronos reserve 1G 1h --bogus", "unrecognized"),
    ("%chronos reserve '1G", "cannot read"),
    ("%chronos status 10^26", "no lease"),
    ("%chronos status ①", "no lease"),
    (f"%chronos status {HUGE}", "no lease"),
    ("%chronos release ①", "no lease"),
    ("%chronos extend 1 999999999999999d", "too long"),
    ("%chronos extend 1 nan", "cannot read duration"),
    ("%chronos extend 1h 1", "%chronos extend 1 1h"),
    ("%chronos extend ① 1h", "no lease"),
    ("%chronos frobnicate", "unknown command"),
    ("%chronos list extra", "takes no arguments"),
    ("%%chronos 1G inf\nx = 1", "cannot read duration"),
    ("%%chronos 2 1h\nx = 1", "write 2G"),
    ("%%chronos 1G 999999999999999d\nx = 1", "too long"),
    ("%%chronos 1G 1h --label 'a\x07'\nx = 1", "control character"),
]


@pytest.mark.parametrize(("source", "fragment"), MAGIC_CASES, ids=[s[:50] for s, _f in MAGIC_CASES])
def test_magic_mistakes(ip: InteractiveShell, source: str, fragment: str) -> None:
    message = magic_error(ip, source)
    assert fragment in message
    assert "must be positive" not in message and "extend later" not in message


# -- what an older ledger may already hold ---------------------------------------------------------------


def test_an_end_time_past_the_clocks_range_renders_everywhere(monkeypatch: pytest.MonkeyPatch,
                                                               chronos_env: Path) -> None:
    """A ledger written before durations were bounded may hold an end far past year 9999, and a label
    with control characters: every renderer shows them, none crashes, nothing reaches a terminal raw."""
    lease = chronos.reserve("1G", "1h", bind=False)
    booking = chronos.book("1G", "1h", "+2h")
    api.reset_default_engine()
    db = sqlite3.connect(chronos_env / "chronos.db")
    db.execute("UPDATE leases SET expires_at = ?, duration_s = ?, label = ? WHERE seq = ?",
               (8.64e19, 8.64e19, "x\n9  root  0  80 GiB  active\x1b[2J", int(lease.id)))
    db.execute("UPDATE leases SET duration_s = ?, label = ? WHERE seq = ?",
               (8.64e19, "\x1b]0;owned\x07", int(booking.id)))
    db.commit()
    db.close()
    for argv in (["list"], ["list", "--all"], ["show", lease.id], ["show", booking.id], ["list", "--json"],
                 ["stats"], ["stats", "--detailed"], ["queue"], ["report"], ["report", "--csv"], ["suggest"],
                 ["metrics"], ["bookings"], ["bookings", "--all", "--ics"], ["bookings", "--json"]):
        code, out, err = cli(*argv)
        assert code == 0, (argv, err)
        assert "\x1b" not in out and "Traceback" not in err
    _code, out, _err = cli("list")
    assert len(out.strip().splitlines()) == 2  # the header and the one lease: no forged row
    assert "far future" in out and "\\n9  root" in out
    from chronos_jupyter.widgets import lease_view, render_html, render_text

    view = lease_view(chronos.get_lease(lease.id))
    assert "far future" in view.time_text
    assert "\x1b" not in render_text(view) and "\n9" not in render_text(view)
    assert "\x1b" not in render_html(view)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "chronos_jupyter")
    try:
        with capture_output() as captured:
            result = shell.run_cell("%chronos list", store_history=False)
        assert result.success, result.error_in_exec
        assert "\x1b" not in captured.stdout and "far future" in captured.stdout
    finally:
        shell.run_line_magic("unload_ext", "chronos_jupyter")
    mine = [item for item in chronos.machine_status().to_dict()["leases"] if item["id"] == lease.id]
    assert mine and mine[0]["expires_at"] == 8.64e19  # JSON carries the stored value as it is
    assert mine[0]["label"].startswith("x\\n9") and "\x1b" not in mine[0]["label"]  # the panel shows it escaped


# -- the docs say what the CLI says --------------------------------------------------------------------


def documented_mistakes() -> list[tuple[str, str]]:
    """The ``$ command`` and the line after it in docs/configuration.md's "Bounds on every value"."""
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = text.index("## Bounds on every value\n")
    section = text[start:text.index("\n## ", start + 1)]
    block = section.split("```console\n", 1)[1].split("```", 1)[0].splitlines()
    return [(line[2:], block[i + 1]) for i, line in enumerate(block) if line.startswith("$ ")]


def test_the_documented_mistakes_are_what_the_cli_says() -> None:
    import shlex

    cases = documented_mistakes()
    assert len(cases) >= 7
    for command, shown in cases:
        argv = shlex.split(command)
        assert argv[0] == "chronos"
        code, _out, err = cli(*argv[1:])
        assert code in (B, F), command
        assert one_line(err) == shown, command


def test_the_user_guides_mistakes_are_what_the_magics_say(ip: InteractiveShell) -> None:
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    start = text.index("## Mistakes\n")
    block = text[start:].split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    pairs = [(line.split(": ", 1)[1], block[i + 1]) for i, line in enumerate(block) if line.startswith("In [")]
    assert len(pairs) >= 5
    for source, shown in pairs:
        message = magic_error(ip, source)
        assert f"UsageError: {message.split('; type: %chronos')[0]}" == shown, source


# -- a ledger or a disk that fails under a command ----------------------------------------------------------


def _broken_ledger(state: Path, how: str) -> None:
    chronos.reserve("1G", "1h", bind=False)
    api.reset_default_engine()
    if how == "missing table":
        db = sqlite3.connect(state / "chronos.db")
        db.execute("DROP TABLE leases")
        db.commit()
        db.close()
    else:  # not a database at all
        for name in ("chronos.db-wal", "chronos.db-shm"):
            (state / name).unlink(missing_ok=True)
        (state / "chronos.db").write_bytes(b"not a ledger\n" * 400)


@pytest.mark.parametrize("how", ["missing table", "not a database"])
@pytest.mark.parametrize("argv", [["list"], ["reserve", "1G", "1h"], ["show", "1"], ["release", "1"], ["stats"]],
                         ids=lambda argv: " ".join(argv))
def test_an_unusable_ledger_is_one_line_in_the_cli(chronos_env: Path, how: str, argv: list[str]) -> None:
    _broken_ledger(chronos_env, how)
    code, _out, err = cli(*argv)
    assert code == E, err
    assert "ledger" in one_line(err)


@pytest.mark.parametrize("how", ["missing table", "not a database"])
def test_an_unusable_ledger_is_one_line_in_the_magics(chronos_env: Path, how: str) -> None:
    _broken_ledger(chronos_env, how)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "chronos_jupyter")
    try:
        for source in ("%chronos list", "%chronos reserve 1G 1h", "%chronos status 1"):
            assert "ledger" in magic_error(shell, source)
    finally:
        shell.run_line_magic("unload_ext", "chronos_jupyter")


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with open(path, "wb", buffering=0) as fill:
        for size in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    fill.write(b"\0" * size)


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory on a 2 MiB tmpfs holding one lease."""
    import subprocess

    from tests.os_users import needs_root

    if needs_root.args[0]:
        pytest.skip("needs root to mount a small file system")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        state = mount / "state"
        state.mkdir(mode=0o700)
        monkeypatch.setenv("CHRONOS_STATE_DIR", str(state))
        api.reset_default_engine()
        chronos.reserve("1G", "1h", bind=False, label="before the disk filled")
        api.reset_default_engine()
        yield state
    finally:
        api.reset_default_engine()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_loses_nothing(full_disk: Path) -> None:
    before = snapshot(full_disk)
    _fill(full_disk.parent / "fill")
    for argv in (["reserve", "1G", "1h", "--label", "x" * 200], ["release", "1"], ["extend", "1", "30m"]):
        code, _out, err = cli(*argv)
        assert code == E, (argv, err)
        one_line(err)
    (full_disk.parent / "fill").unlink()
    api.reset_default_engine()
    assert snapshot(full_disk) == before


# -- the kernel provisioner: a kernelspec's bad setting refuses the start, in words ------------------------

PROVISIONER_CASES: list[tuple[dict[str, Any], str]] = [
    ({"memory": "2"}, "write 2G"),
    ({"memory": HUGE}, "far larger"),
    ({"memory": "nan"}, "cannot read memory"),
    ({"duration": "nan"}, "cannot read duration"),
    ({"duration": "inf"}, "cannot read duration"),
    ({"duration": "999999999999999d"}, "too long"),
    ({"duration": 1e300}, "too long"),
    ({"duration": "0.01s"}, "too short"),
    ({"wait": "nan"}, "--wait"),
    ({"wait": "99999999999999999999d"}, "--wait forever"),
    ({"device": "①"}, "invalid --gpu"),
    ({"idle_after": "nan"}, "cannot read duration"),
    ({"warn_before": "soon"}, "warn_before"),
    ({"warn_before": "inf"}, "warn_before"),
    ({"check_interval": math.inf}, "check_interval"),
    ({"check_interval": 0.0}, "check_interval"),
]


@pytest.fixture
def kernel_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prefix = tmp_path / "prefix"
    for key, where in (("JUPYTER_PATH", prefix / "share" / "jupyter"), ("JUPYTER_DATA_DIR", tmp_path / "data"),
                       ("JUPYTER_RUNTIME_DIR", tmp_path / "runtime"), ("JUPYTER_CONFIG_DIR", tmp_path / "config"),
                       ("IPYTHONDIR", tmp_path / "ipython")):
        monkeypatch.setenv(key, str(where))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    return prefix


@pytest.mark.parametrize(("config", "fragment"), PROVISIONER_CASES, ids=[str(c)[:40] for c, _f in PROVISIONER_CASES])
def test_provisioner_mistakes(kernel_dirs: Path, config: dict[str, Any], fragment: str) -> None:
    import asyncio
    import json

    from jupyter_client.manager import AsyncKernelManager

    from chronos_jupyter.kernelspec import install_kernel
    from chronos_jupyter.provisioner import KernelLeaseInvalid

    spec_dir = Path(install_kernel("bad-setting", "1G", "1h", prefix=kernel_dirs))
    doc = json.loads((spec_dir / "kernel.json").read_text())
    doc["metadata"]["kernel_provisioner"]["config"].update(config)
    (spec_dir / "kernel.json").write_text(json.dumps(doc))

    async def start() -> None:
        await AsyncKernelManager(kernel_name="bad-setting").start_kernel()

    with pytest.raises(KernelLeaseInvalid) as info:
        asyncio.run(start())
    first, _, detail = str(info.value).partition("\n")
    assert first == "kernelspec 'bad-setting' has a bad Chronos setting"
    assert fragment in " ".join(detail.split()) and "Traceback" not in detail  # the dialog wraps its details
    assert chronos.leases(all=True) == []


# -- the CLI and the magics speak alike --------------------------------------------------------------------


def test_the_cli_and_the_magics_show_leases_alike(ip: InteractiveShell) -> None:
    """The same columns and cells for the same leases, in ``chronos list`` and ``%chronos list``, and the
    same GPU-hours columns in ``chronos stats --detailed --all`` and ``%chronos stats``."""
    _code, out, _err = cli("list")
    with capture_output() as captured:
        assert ip.run_cell("%chronos list", store_history=False).success
    cli_rows = out.strip().splitlines()
    magic_rows = captured.stdout.strip().splitlines()[:len(cli_rows)]
    assert cli_rows[0].split() == magic_rows[0].split() == ["ID", "OWNER", "GPU", "MEMORY", "STATE", "LEFT",
                                                             "ENDS", "PID", "LABEL"]
    assert [r.split()[:5] for r in cli_rows] == [r.split()[:5] for r in magic_rows]
    _code, out, _err = cli("stats", "--detailed", "--all")
    with capture_output() as captured:
        assert ip.run_cell("%chronos stats", store_history=False).success
    header = next(line for line in captured.stdout.splitlines() if line.startswith("USER"))
    assert header in out


@pytest.mark.parametrize("verb", ["show", "status"])
def test_show_is_a_verb_of_both(ip: InteractiveShell, verb: str) -> None:
    with capture_output():
        assert ip.run_cell(f"%chronos {verb} 1", store_history=False).success
    assert cli("show", "1")[0] == 0


def test_only_a_front_end_that_takes_wait_suggests_it(kernel_dirs: Path) -> None:
    """The CLI and the magics say ``add --wait``; the API marks the error; a kernel start, whose waiting
    its kernelspec decides, is not told to add an option it cannot give."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    from chronos_jupyter.kernelspec import install_kernel
    from chronos_jupyter.provisioner import KernelLeaseUnavailable

    chronos.reserve("8G", "1h", device=0, bind=False)
    with pytest.raises(errors.UnavailableError) as info:
        chronos.reserve("79G", "1h", device=0, bind=False)
    assert info.value.could_wait and "--wait" not in str(info.value)
    assert "add --wait to queue until it fits" in one_line(cli("reserve", "79G", "1h", "--gpu", "0")[2])
    install_kernel("too-big", "79G", "1h", device=0, prefix=kernel_dirs)

    async def start() -> None:
        await AsyncKernelManager(kernel_name="too-big").start_kernel()

    with pytest.raises(KernelLeaseUnavailable) as refused:
        asyncio.run(start())
    assert "not enough free memory" in " ".join(str(refused.value).split())
    assert "--wait" not in str(refused.value)


# -- the same through the service ---------------------------------------------------------------------------

SERVICE_CASES: list[tuple[list[str], int, str]] = [
    (["extend", "1", "999999999999999d"], B, "too long"),
    (["reserve", "1G", "400d"], B, "at most 366d"),
    (["reserve", "1G", "0.5s"], B, "too short"),
    (["reserve", "2", "1h"], B, "write 2G"),
    (["reserve", "1G", "1h", "--label", "a\nb"], B, "control character"),
    (["reserve", "1G", "1h", "--prefer", "7"], B, "no GPU 7"),
    (["reserve", "1G", "1h", "--wait", "nan"], B, "--wait"),
    (["show", "①"], F, "no lease"),
    (["reserve", "79G", "1h", "--gpu", "0"], U, "add --wait to queue until it fits"),
]


def test_bad_inputs_through_the_service(service: Any) -> None:
    """In service mode the client and the service read every value with the same parsers and bounds, and a
    refusal that could wait still says so."""
    chronos.reserve("8G", "1h", device=0, bind=False)
    for argv, code, fragment in SERVICE_CASES:
        got, out, err = cli(*argv)
        assert got == code, (argv, out, err)
        assert fragment in one_line(err), argv

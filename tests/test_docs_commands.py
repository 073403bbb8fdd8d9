"""The README's commands, run as written, and every benchmark command docs/benchmarks.md shows, run with
its own flags on a tiny scale (the figures themselves are measured by hand): no command in the docs is
one that nothing runs.

The other guides' commands are run by the tests of what they set up: tests/hub_setup.py and
tests/test_hub.py (docs/admin-guide.md's JupyterHub), tests/test_service_docs.py (its service set-up),
tests/test_wheel.py (its extension commands), tests/test_policy_docs.py (the lab-policy sections),
tests/test_bad_inputs.py (docs/configuration.md's bounds, docs/user-guide.md's messages).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

#: Each benchmark flag's value on the tiny scale (a flag the docs use and this does not know fails the test:
#: give it a tiny value here).
TINY: dict[str, str] = {
    "--rounds": "20", "--seconds": "0.3", "--cold-runs": "2", "--procs": "2", "--active": "20",
    "--writers": "3", "--waiters": "4", "--idle": "0.5", "--grants": "2", "--ended": "2000", "--runs": "2",
    "--leases": "4", "--n": "1", "--repeats": "1", "--queued": "20", "--devices": "2", "--trials": "2",
    "--cpu-seconds": "0.5", "--rate": "4", "--bookings": "20",
}
#: Where a flag means something else in one script.
TINY_IN = {"bench_enforce.py": {"--rounds": "1"}}
#: Flags that take no value, and flags whose value is a choice or a path, kept as written.
SWITCHES = {"--json", "--floor"}
KEPT = {"--backend", "--baseline"}
#: Scratch paths the docs write to, each given the test's own folder instead.
SCRATCH = ("/tmp/chronos-before",)
#: A benchmark command line in the docs: environment assignments, then ``python`` or ``python3 bench/...``.
COMMAND = re.compile(r"^((?:[A-Z_]+=\S+ )*)python3? (bench/\S+\.py)\b(.*)$")


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def _clock_free(text: str) -> str:
    """Output with what changes from run to run (clock times, time left, the owner) made alike."""
    text = re.sub(r"\b\d{1,2}:\d{2}\b", "HH:MM", text)
    text = re.sub(r"\b(\d+h )?\d+m left\b|\b\d+h left\b", "LEFT", text)
    return " ".join(text.split())


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    [console] = _blocks(README, "console")
    (tmp_path / "train.py").write_text("print('training')\n")
    lines = console.splitlines()
    ran = 0
    for index, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        command = line[2:].split("  #")[0].strip()
        shown = []
        for after in lines[index + 1:]:
            if after.startswith("$ "):
                break
            shown.append(after)
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert done.returncode == 0, (command, done.stderr)
        ran += 1
        got = done.stdout.splitlines()
        if command.startswith("chronos list"):  # the owner column is whoever runs it
            user = got[1].split()[1]
            got = [got[0], got[1].replace(user, "alice", 1), *got[2:]]
        if shown:
            assert [_clock_free(x) for x in got] == [_clock_free(x) for x in shown], (command, done.stdout)
    assert ran == 4


def test_the_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    python = next(block for block in _blocks(README, "python") if "import chronos" in block)
    done = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    lease_id, devices, remaining = done.stdout.split(" ", 2)
    assert lease_id == "1" and devices.startswith("(") and remaining.strip()


def benchmark_commands() -> list[str]:
    found = [line.split("#")[0].strip() for block in _blocks(BENCHMARKS, "")
             for line in block.splitlines() if COMMAND.match(line)]
    return list(dict.fromkeys(found))


def preparations(command: str) -> list[str]:
    """The shell lines that stand before ``command`` in its block (e.g. extracting an earlier tree)."""
    for block in _blocks(BENCHMARKS, ""):
        lines = [line.split("  #")[0].strip() for line in block.splitlines()]
        if command in lines:
            return [line for line in lines[:lines.index(command)] if line and not COMMAND.match(line)]
    return []


def _scratch(text: str, folder: Path) -> str:
    for path in SCRATCH:
        text = text.replace(path, str(folder / Path(path).name))
    return text


def tiny(command: str) -> tuple[dict[str, str], list[str]]:
    """``command``'s environment and its own flags, each flag with its tiny value."""
    match = COMMAND.match(command)
    assert match, command
    env = dict(word.split("=", 1) for word in shlex.split(match[1]))
    script = match[2]
    out = [sys.executable, str(ROOT / script)]
    values = {**TINY, **TINY_IN.get(Path(script).name, {})}
    rest = iter(shlex.split(match[3]))
    for word in rest:
        assert word.startswith("--"), (command, word)
        if word in SWITCHES:
            out.append(word)
            continue
        if word in KEPT:
            out += [word, next(rest)]
            continue
        assert word in values, f"docs/benchmarks.md uses {word} ({command}): give it a tiny value in TINY"
        next(rest)
        out += [word, values[word]]
    return env, out


def _params() -> list[object]:
    """The commands, those for a real GPU (NVML, not the simulated backend) marked ``gpu``."""
    return [pytest.param(c, marks=pytest.mark.gpu) if "nvml" in c else c
            for c in benchmark_commands()]


def test_the_benchmark_section_shows_the_commands_this_test_expects() -> None:
    scripts = {Path(tiny(c)[1][1]).name for c in benchmark_commands()}
    assert {f"bench_{name}.py" for name in ("core", "service", "waiters", "history", "enforce", "scheduler",
                                            "watchdog", "kernel_start")} <= scripts, scripts


@pytest.mark.slow
@pytest.mark.parametrize("command", _params())
def test_each_benchmark_command_in_the_docs_runs(command: str, tmp_path: Path) -> None:
    for line in preparations(command):
        commit = re.search(r"git archive (\w+)", line)
        if commit and subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", commit[1]]).returncode != 0:
            pytest.skip(f"this checkout lacks commit {commit[1]} (a shallow clone)")
        ready = subprocess.run(["bash", "-c", _scratch(line, tmp_path)], capture_output=True, text=True, cwd=ROOT,
                               timeout=120)
        assert ready.returncode == 0, (line, ready.stderr)
    env, argv = tiny(_scratch(command, tmp_path))
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, **env, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    assert done.stdout.strip(), command  # it printed its figures


@pytest.mark.slow
def test_the_readme_install_command_runs_on_a_fresh_environment(tmp_path: Path) -> None:
    """``pip install . && chronos reserve 8G 2h`` in a new virtual environment with a new home: the
    embedded default (simulated GPUs where there is no driver, the SQLite ledger, no server)."""
    [install] = [line for block in _blocks(README, "bash") for line in block.splitlines()
                 if line.startswith("pip install . ")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    # the machine's shared default state directory stays untouched: this one is the test's own
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "NO_COLOR": "1",
           "CHRONOS_STATE_DIR": str(tmp_path / "state"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(tmp_path)}
    if "PIP_INDEX_URL" in os.environ:
        env["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    # in a copy of the checkout, as a fresh clone is: the build leaves nothing behind in this one
    source = tmp_path / "chronos"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                 "node_modules", ".mypy_cache", ".ruff_cache"))
    done = subprocess.run(["bash", "-c", install], capture_output=True, text=True, cwd=source, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^granted lease 1: 8 GiB on GPU \d+ for 2h", done.stdout, re.M), done.stdout[-2000:]
    listed = subprocess.run(["chronos", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and '"state": "active"' in listed.stdout, listed.stdout + listed.stderr

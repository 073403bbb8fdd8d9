"""The commands the docs show for the lab policies, run as written (in a fresh state, in order)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.os_users import needs_root, os_users

#: The sections that show lab-policy commands, per file.
SECTIONS = {
    "docs/user-guide.md": ("Booking a GPU ahead", "Reports"),
    "docs/configuration.md": ("Limits per user and group",),
    "docs/admin-guide.md": ("Idle GPUs in JupyterHub", "Metrics for Prometheus"),
}
#: Commands named in the prose of those sections (in backticks), run too.
INLINE = re.compile(r"`((?:chronos|jupyter chronos) [^`]*)`")
NAMES = {"chronos run", "chronos show", "chronos list"}


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def documented() -> list[str]:
    """Every command in those sections: console lines after ``$``, bash lines, and inline ones without a
    placeholder (ID, NAME, PATH written in capitals), in the order they appear."""
    out: list[str] = []
    for name, titles in SECTIONS.items():
        text = (ROOT / name).read_text()
        for title in titles:
            section = _section(text, title)
            for block, body in re.findall(r"```(console|bash)\n(.*?)```", section, re.S):
                for line in body.splitlines():
                    command = line[2:] if block == "console" and line.startswith("$ ") else \
                        line if block == "bash" and line.strip() else None
                    if command:
                        out.append(command.strip())
            for inline in INLINE.findall(section):
                # names of commands in the prose ("the stderr of `chronos run`") are not invocations
                if not re.search(r"\b[A-Z]{2,}\b", inline) and inline not in out and inline not in NAMES:
                    out.append(inline)
    return out


def test_the_sections_show_the_commands_this_test_expects() -> None:
    found = documented()
    assert 'chronos book 8G 2h --at "tomorrow 09:00" --label "course demo"' in found
    assert "chronos run --booking 3 -- python train.py" in found
    assert "chronos config --user ann" in found and "chronos metrics --write" in found
    assert any(c.startswith("jupyter chronos install-kernel") for c in found)


@needs_root
def test_every_documented_policy_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    textfile = tmp_path / "textfile" / "chronos.prom"
    textfile.parent.mkdir()
    Path(os.environ["CHRONOS_CONFIG"]).write_text(
        f'[limits]\nidle_after = "30m"\n[metrics]\ntextfile = "{textfile}"\n')
    (tmp_path / "train.py").write_text("print('training')\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JUPYTER_DATA_DIR", raising=False)
    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with os_users({"ann": ()}) as users:
        for command in documented():
            argv = shlex.split(command.replace("--user ann", f"--user {users['ann']}"))
            if argv[0] == "chronos":
                argv = [sys.executable, "-m", "chronos", *argv[1:]]
            elif argv[:2] == ["jupyter", "chronos"]:
                argv = [sys.executable, "-m", "chronos_jupyter.kernelspec", *argv[2:]]
            elif argv[0] == "python":
                argv[0] = sys.executable
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
    spec = json.loads((tmp_path / "home/.local/share/jupyter/kernels/gpu-8g-interactive/kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["on_idle"] == "terminate"
    assert "chronos_gpu_memory_total_bytes" in textfile.read_text()

"""The wheel carries the prebuilt lab extension and the server extension's config; installed into a
fresh virtual environment, Jupyter finds both with no Node anywhere on the PATH.

`pip wheel .` builds the wheel as a user would (in an isolated build environment from PyPI). The
fresh venv gets only the wheel (``--no-deps``); the Jupyter packages it needs come from this
test's environment through a path file, and the console scripts `jupyter`, `jupyter-labextension`
and `jupyter-server` are written into its bin/ from their distributions' entry points, as pip
writes them. The commands are then run exactly as docs/admin-guide.md shows them.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

NAME = "@chronos-gpu/jupyterlab"
DATA = "share/jupyter/labextensions/" + NAME
SCRIPTS = {"jupyter": "jupyter_core", "jupyter-labextension": "jupyterlab", "jupyter-server": "jupyter_server"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                            str(ROOT), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [found] = out.glob("chronos_gpu-*.whl")
    return found


def test_the_wheel_holds_the_built_extension_and_the_server_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = next(n.split("/data/")[0] for n in names if "/data/" in n) + "/data/"
    package = json.loads(zipfile.ZipFile(wheel).read(data + DATA + "/package.json"))
    assert package["name"] == NAME
    load = package["jupyterlab"]["_build"]["load"]
    assert data + f"{DATA}/{load}" in names  # the remote entry the manifest names is there
    assert data + f"{DATA}/schemas/{NAME}/plugin.json" in names
    assert data + f"{DATA}/install.json" in names
    assert data + "etc/jupyter/jupyter_server_config.d/chronos_jupyter.json" in names
    assert "chronos/service/units/chronos.service" in names  # what `chronos admin install-service` writes
    # The committed build is what ships.
    shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith(data + DATA + "/static/")}
    built = {p.name for p in (ROOT / "chronos_jupyter" / "labextension" / "static").iterdir()}
    assert shipped == built


def _script(bin_dir: Path, name: str, distribution: str) -> None:
    [entry] = [e for e in importlib.metadata.distribution(distribution).entry_points
               if e.group == "console_scripts" and e.name == name]
    module, _, attr = entry.value.partition(":")
    path = bin_dir / name
    path.write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
    path.chmod(0o755)


def test_a_fresh_venv_shows_both_extensions_without_node(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / "bin"
    site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
                                ], capture_output=True, text=True, check=True).stdout.strip())
    # --ignore-installed: pip runs from this environment, where it would find Chronos already installed.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q",
                              "--no-deps", "--no-index", "--ignore-installed", "--disable-pip-version-check",
                              str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    # Then, and only then (pip would find this environment's own Chronos there), the outer packages.
    paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "outer-environment.pth").write_text("\n".join(paths) + "\n")
    for name, distribution in SCRIPTS.items():
        _script(bin_dir, name, distribution)
    assert (venv / DATA / "package.json").exists()

    env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    assert shutil.which("node", path=env["PATH"]) is None and shutil.which("npm", path=env["PATH"]) is None
    labext = subprocess.run(["jupyter", "labextension", "list"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert labext.returncode == 0, labext.stdout + labext.stderr
    listing = re.sub(r"\x1b\[[0-9;]*m", "", labext.stdout + labext.stderr)
    assert str(venv / "share" / "jupyter" / "labextensions") in listing
    assert "@chronos-gpu/jupyterlab v2.0.0 enabled OK (python, chronos-gpu)" in [line.strip() for line in
                                                                                   listing.splitlines()]

    server = subprocess.run(["jupyter", "server", "extension", "list"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert server.returncode == 0, server.stdout + server.stderr
    listing = re.sub(r"\x1b\[[0-9;]*m", "", server.stdout + server.stderr)
    assert str(venv / "etc" / "jupyter") in listing
    lines = [line.strip() for line in listing.splitlines()]
    assert "chronos_jupyter enabled" in lines and "- Validating chronos_jupyter..." in lines
    assert "chronos_jupyter  OK" in lines  # it imports, from the fresh venv
    where = subprocess.run(["python", "-c", "import chronos_jupyter; print(chronos_jupyter.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv))

    # Turned off as docs/admin-guide.md says, each half says so.
    def run(*args: str) -> str:
        done = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)

    run("jupyter", "server", "extension", "disable", "--sys-prefix", "chronos_jupyter")
    assert "chronos_jupyter disabled" in [line.strip() for line in run("jupyter", "server", "extension", "list")
                                          .splitlines()]
    run("jupyter", "labextension", "disable", "@chronos-gpu/jupyterlab")
    listing = run("jupyter", "labextension", "list")
    assert any(line.strip().startswith("@chronos-gpu/jupyterlab v2.0.0 disabled OK") for line in listing.splitlines())


GUIDE_COMMANDS = [
    "jupyter server extension list",
    "jupyter labextension list",
    "jupyter server extension disable --sys-prefix chronos_jupyter",
    "jupyter labextension disable @chronos-gpu/jupyterlab",
]


def test_the_admin_guide_shows_the_commands_and_output_this_test_sees() -> None:
    text = (ROOT / "docs" / "admin-guide.md").read_text()
    start = text.index("### JupyterLab and Notebook 7\n")
    section = text[start:text.index("\n## ", start)]
    commands = []
    shown = []
    for block, body in re.findall(r"```(console|bash)\n(.*?)```", section, re.S):
        for line in body.splitlines():
            if block == "bash" and line.strip():
                commands.append(line.strip())
            elif line.startswith("$ "):
                commands.append(line[2:].strip())
            elif line.strip():
                shown.append(line.strip())
    assert commands == GUIDE_COMMANDS  # each run above, in a fresh venv
    assert shown == ["chronos_jupyter enabled", "- Validating chronos_jupyter...", "chronos_jupyter  OK",
                     "@chronos-gpu/jupyterlab v2.0.0 enabled OK (python, chronos-gpu)"]

"""Every notebook in notebooks/ runs under nbval in a fresh pytest process.

A subprocess gives nbval's kernels a known environment: the kernel inherits the environment
of the process that starts it, so the isolated state directory and simulated GPUs this test
sets up are in place before any kernel starts. ``--nbval-lax`` compares only the outputs of
cells marked ``# NBVAL_CHECK_OUTPUT`` (ids and times vary); any error in a cell fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    names = {path.name for path in NOTEBOOKS}
    assert {"quickstart.ipynb", "pytorch.ipynb"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_passes_nbval(notebook: Path, tmp_path: Path) -> None:
    env = dict(os.environ)  # CHRONOS_STATE_DIR, CHRONOS_BACKEND=simulated, ... from conftest
    assert env["CHRONOS_BACKEND"] == "simulated"
    env.update({
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(ROOT), "--nbval-cell-timeout", "120", str(notebook)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# -- binder ------------------------------------------------------------------------------------


def test_binder_start_selects_simulated_gpus(tmp_path: Path) -> None:
    """binder/start gives the server (and so every kernel) simulated GPUs and a private state dir."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHRONOS_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [str(ROOT / "binder" / "start"), sys.executable, "-m", "chronos", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ".chronos").is_dir()  # the ledger lives in the Binder user's home
    shown = subprocess.run(
        [str(ROOT / "binder" / "start"), sys.executable, "-c",
         "import chronos; print([d.name for d in chronos.devices()])"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("Simulated GPU (80 GiB)") == 2


def test_binder_post_build_installs_the_jupyter_extra() -> None:
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert 'pip install --no-cache-dir ".[jupyter]"' in post_build
    assert os.access(ROOT / "binder" / "postBuild", os.X_OK)
    assert os.access(ROOT / "binder" / "start", os.X_OK)
    assert subprocess.run(["bash", "-n", str(ROOT / "binder" / "postBuild")]).returncode == 0
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert "jupyterlab" in requirements and "ipywidgets" in requirements

"""The committed lab extension is what its TypeScript source builds to.

The README's rebuild command runs in a scratch copy of labextension/ (packages from the npm
registry, pinned by yarn.lock), and its output is compared with chronos_jupyter/labextension/:
every file alike, except that the federation entry's module numbers (webpack derives one of them
from the absolute path of the build) may differ. Needs Node.js (.ci/run installs Debian's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
JLPM = shutil.which("jlpm", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (.ci/run installs it)"),
    pytest.mark.skipif(JLPM is None, reason="needs jlpm, which comes with JupyterLab"),
]

COMMITTED = ROOT / "chronos_jupyter" / "labextension"
REBUILD = "rebuild with `cd labextension && jlpm install --immutable && jlpm build` and commit the output"
SKIP = shutil.ignore_patterns("node_modules", "lib", "tsconfig.tsbuildinfo", ".yarn")


def _numbers(text: str) -> str:
    return re.sub(r"\d+", "#", text)


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_the_committed_build_is_what_the_source_builds_to(tmp_path: Path) -> None:
    source = tmp_path / "labextension"
    shutil.copytree(ROOT / "labextension", source, ignore=SKIP)
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    assert JLPM is not None
    done = subprocess.run(f"cd {source} && jlpm install --immutable && jlpm build", shell=True, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    built = _files(tmp_path / "chronos_jupyter" / "labextension")
    committed = _files(COMMITTED)
    entry = {name for name in committed if re.fullmatch(r"static/remoteEntry\.[0-9a-f]+\.js", name)}
    assert len(entry) == 1
    [built_entry] = [name for name in built if re.fullmatch(r"static/remoteEntry\.[0-9a-f]+\.js", name)]
    assert _numbers(built.pop(built_entry).decode()) == _numbers(committed.pop(entry.pop()).decode()), \
        f"the federation entry differs: {REBUILD}"
    built_manifest = json.loads(built.pop("package.json"))
    committed_manifest = json.loads(committed.pop("package.json"))
    for manifest in (built_manifest, committed_manifest):
        manifest["jupyterlab"]["_build"].pop("load")
    assert built_manifest == committed_manifest
    assert sorted(built) == sorted(committed), REBUILD
    for name, content in built.items():
        assert content == committed[name], f"{name} differs from what the source builds to: {REBUILD}"

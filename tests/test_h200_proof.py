"""The H200 proof of the service's enforcer and device gating, dry-run here on simulated GPUs.

``scripts/h200/service.sh --dry-run`` runs the same steps as on the GPU machine (over-cap, another
user's unmanaged process, device gating with a second OS user) on simulated GPUs and stand-in device
files, so the script run on a lent H200 is known to work up to the GPU itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.os_users import CAN_RUN, WHY_NOT

pytestmark = pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)


def test_the_h200_service_proof_passes_its_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "scripts/h200/service.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "service_proof rc=0" in done.stdout
    report = json.loads((tmp_path / "service.json").read_text())
    assert report["dry_run"] is True
    names = [c["check"] for c in report["checks"]]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    assert len(names) == 11 and names[-1] == "device files' modes and ACLs put back"
    assert any(n.startswith("over_cap") for n in names) and any(n.startswith("unmanaged") for n in names)

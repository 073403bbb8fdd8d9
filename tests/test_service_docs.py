"""The service set-up of docs/admin-guide.md, run verbatim, as root, in a mount namespace of its own
(so /etc/chronos, /run and /var/lib of this machine are left as they are)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

needs_namespaces = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                      reason="needs root and unshare for a private mount namespace")

GUIDE = ROOT / "docs" / "admin-guide.md"


def _block(name: str) -> list[str]:
    found = re.search(rf"<!-- test: {name} -->\n```bash\n(.*?)```", GUIDE.read_text(), re.S)
    assert found, f"no block {name} in {GUIDE}"
    return [line for line in found.group(1).splitlines() if line.strip()]


@needs_namespaces
def test_the_tljh_and_container_setup_commands_work_as_written(tmp_path: Path) -> None:
    tljh, container = _block("service-tljh"), _block("service-container")
    bin_dir = tmp_path / "bin"  # `chronos` as the guide types it, this checkout's
    bin_dir.mkdir()
    (bin_dir / "chronos").write_text(f"#!/bin/sh\nexec {sys.executable} -m chronos \"$@\"\n")
    (bin_dir / "chronos").chmod(0o755)
    script = tmp_path / "setup.sh"
    # Fresh, empty /etc/chronos, /run and /var/lib, seen only inside the namespace; the namespace's
    # own pids too, so that whatever happens, the service started by the guide ends with the script.
    script.write_text("\n".join([
        "set -e",
        "mkdir -p /etc/chronos",  # a mount point; stays empty outside the namespace
        "mount -t tmpfs tmpfs /etc/chronos && mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/lib",
        "unset CHRONOS_SERVER CHRONOS_CONFIG",
        *tljh[:3],
        "SERVE=$!",
        "for i in $(seq 100); do [ -S /run/chronos/chronos.sock ] && break; sleep 0.1; done",
        *[f"echo '$ {line}'; {line}" for line in tljh[3:]],
        "chronos reserve 1G 1h --json > /dev/null  # leases the container step must not see as its own",
        *[f"echo '$ {line}'; {line}" for line in container],
        "chronos list --all",
        "ls -ld /var/lib/chronos /run/chronos/chronos.sock",
        "kill $SERVE; wait $SERVE",
    ]) + "\n")
    created = not Path("/etc/chronos").exists()
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--fork", "--pid", "--mount-proc",
                               "sh", str(script)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    finally:
        if created:
            Path("/etc/chronos").rmdir()
    out = done.stdout
    assert done.returncode == 0, (out, done.stderr)
    assert "granted lease 1" in out and "setup-check" in out and "released lease 1" in out, out
    # the container's lease (3) was active, held by the host's pid of `chronos run`, and ended with it
    listed = out.split("$ unshare", 1)[1]
    assert re.search(r"^3\s+root\s+\d\s+1 GiB\s+active", listed, re.M), listed
    assert re.search(r"^3\s+root\s+\d\s+1 GiB\s+released", listed.split("ID", 2)[-1], re.M), listed
    assert "drwx------" in out and "srw-rw-rw-" in out, out


def test_the_service_benchmark_runs_and_finds_no_overcommit() -> None:
    """docs/benchmarks.md's command, on a tiny scale (the figures themselves are measured by hand)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_service.py"), "--rounds", "6", "--seconds",
                           "0.5", "--procs", "2", "--repeats", "1", "--baseline", str(ROOT), "--floor"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines() if not line.startswith("#")}
    assert set(lines) == {"round trip median ms", "round trip p99 ms", "2 processes grants/s",
                          "2 processes CPU ms/grant", "2 processes over-commits"}, done.stdout
    assert "embedded      0.00   service      0.00   baseline      0.00   floor      0.00" in \
        lines["2 processes over-commits"], done.stdout
    for figure in ("2 processes CPU ms/grant", "2 processes grants/s", "round trip median ms"):
        words = lines[figure].split()
        assert all(float(words[words.index(mode) + 1]) > 0 for mode in ("embedded", "service", "baseline", "floor")), \
            done.stdout

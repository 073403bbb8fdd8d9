"""Scripts and programs written for the original Chronos run unchanged."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import chronos
from chronos import Partitioner, PartitionInfo
from tests.conftest import ROOT


def _path_env() -> dict[str, str]:
    """The environment with this interpreter's ``chronos`` command first on PATH."""
    scripts = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT)}


def test_the_original_api_in_full() -> None:
    partitioner = Partitioner()
    partition = partitioner.create(device=0, memory=0.5, duration=3600)
    assert partition.partition_id == f"partition_{int(partition.lease.id):04d}"
    assert partition.device == 0 and partition.duration == 3600
    assert partition.memory_fraction == pytest.approx(0.5)
    remaining = partition.time_remaining
    assert isinstance(remaining, int) and 3590 <= remaining <= 3600  # whole seconds, as the original gave
    (info,) = partitioner.list()
    assert isinstance(info, PartitionInfo)
    assert (info.partition_id, info.device_index, info.duration_seconds) == (partition.partition_id, 0, 3600)
    assert info.active and info.username and info.process_id == os.getpid()
    assert partitioner.release(partition.partition_id) is True
    assert partitioner.list() == []
    assert partition.partition_id is None  # the handle knows it was released
    partition.release()  # releasing it again through the handle is a no-op, as in the original


def test_release_of_an_ended_partition_is_an_error_as_in_the_original() -> None:
    partitioner = Partitioner()
    partition = partitioner.create(device=1, memory=0.25, duration=60)
    chronos.release(partition.lease.id)  # ended elsewhere
    with pytest.raises(chronos.ChronosError, match="already ended"):
        partition.release()
    assert partition.partition_id is None
    with pytest.raises(chronos.ChronosError, match="already ended"):
        partitioner.release(partition.lease.id)
    with partitioner.create(device=0, memory=0.1, duration=60) as held:
        chronos.release(held.lease.id)
    # leaving the block after the lease ended elsewhere is not an error


def test_list_shows_only_this_partitioners_partitions() -> None:
    mine, theirs = Partitioner(), Partitioner()
    a = mine.create(device=0, memory=0.1, duration=60)
    theirs.create(device=0, memory=0.1, duration=60)
    chronos.reserve("1G", "1h")
    assert [p.partition_id for p in mine.list()] == [a.partition_id]


def test_show_stats_and_availability() -> None:
    partitioner = Partitioner()
    partitioner.create(device=0, memory=0.25, duration=60)
    out = io.StringIO()
    partitioner.show_stats(out)
    text = out.getvalue()
    assert text.startswith("Device statistics:\n")
    assert "Device 0: Chronos Simulated GPU (80 GiB)" in text and "Active partitions: 1" in text
    assert "Usage: 25.00%" in text
    assert partitioner.get_available(0) == pytest.approx(75.0)
    assert partitioner.get_backend_name() == "simulated" and partitioner.get_execution_mode() == "stub"


def test_the_scripting_idiom_gets_the_id_and_leaks_no_lease() -> None:
    """The original user guide's batch-job script, line for line."""
    script = textwrap.dedent("""
        GPU_MEMORY=0.5
        DURATION=3600
        PARTITION_ID=$(chronos create 0 $GPU_MEMORY $DURATION 2>&1 | grep "partition_" | awk '{print $3}')
        if [ -z "$PARTITION_ID" ]; then
            echo "Failed to create partition"
            exit 1
        fi
        echo "Running with partition $PARTITION_ID"
        chronos release $PARTITION_ID
    """)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_path_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Running with partition partition_0001" in out.stdout
    assert chronos.leases() == []
    assert chronos.get_lease("partition_0001").state == chronos.LeaseState.RELEASED


def test_chronos_help() -> None:
    out = subprocess.run([sys.executable, "-m", "chronos", "help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0 and "usage: chronos" in out.stdout and "exit codes:" in out.stdout
    one = subprocess.run([sys.executable, "-m", "chronos", "help", "create"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert one.returncode == 0 and "usage: chronos create" in one.stdout


# The first Python example of the original user guide, verbatim. ``torch.nn.Sequential(...)`` is the
# guide's placeholder for the reader's own model, so the test gives the program a stand-in ``torch``
# that accepts it; everything Chronos does in it is real.
GUIDE_EXAMPLE = '''\
from chronos import Partitioner

# Create partitioner
partitioner = Partitioner()

# Create partition (returns Partition object)
partition = partitioner.create(device=0, memory=0.5, duration=3600)

print(f"Created: {partition.partition_id}")
print(f"Using {partition.memory_fraction*100}% of GPU {partition.device}")

# Use your GPU here
import torch
model = torch.nn.Sequential(...).cuda()

# Release when done
partition.release()
'''

STAND_IN_TORCH = '''\
class _Model:
    def cuda(self):
        return self


class nn:
    @staticmethod
    def Sequential(*layers):
        return _Model()
'''


def test_the_first_python_example_of_the_original_guide_runs_unchanged(tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text(STAND_IN_TORCH)
    program = tmp_path / "example.py"
    program.write_text(GUIDE_EXAMPLE)
    env = {**_path_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Created: partition_0001", "Using 50.0% of GPU 0"]
    assert chronos.get_lease("partition_0001").state == chronos.LeaseState.RELEASED

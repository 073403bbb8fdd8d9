"""Each framework's cooperative cap on a real GPU: JAX and CuPy children, in-process caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu


def _record(test: str, **data: object) -> None:
    path = os.environ.get("CHRONOS_GPU_RECORD")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **data}) + "\n")


def _run(code: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "chronos", "run", "2G", "5m", *args, "--", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result, (json.loads(lines[-1]) if lines else {})


def test_jax_child_is_capped() -> None:
    pytest.importorskip("jax")
    result, seen = _run("""
        import json, os
        import jax, jax.numpy as jnp
        out = {"fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
        try:
            jnp.ones((4 << 30,), dtype=jnp.uint8).block_until_ready()
            out["4g"] = "allocated"
        except Exception as exc:
            out["4g"] = type(exc).__name__ + ": " + str(exc).splitlines()[0][:160]
        y = jnp.ones((512 << 20,), dtype=jnp.uint8).block_until_ready()
        out["512m"] = int(y.shape[0])
        print(json.dumps(out), flush=True)
    """)
    _record("jax_cap", child=seen, returncode=result.returncode, stderr=result.stderr.strip().splitlines()[-3:])
    assert result.returncode == 0, result.stderr[-3000:]
    refused = str(seen["4g"])
    assert refused != "allocated" and ("RESOURCE_EXHAUSTED" in refused or "out of memory" in refused.lower())
    assert seen["512m"] == 512 << 20


def test_cupy_child_is_capped() -> None:
    pytest.importorskip("cupy")
    result, seen = _run("""
        import json, os
        import cupy
        out = {"limit": os.environ.get("CUPY_GPU_MEMORY_LIMIT")}
        try:
            cupy.empty(4 << 30, dtype=cupy.uint8)
            out["4g"] = "allocated"
        except cupy.cuda.memory.OutOfMemoryError as exc:
            out["4g"] = "OutOfMemoryError"
        x = cupy.ones(1 << 30, dtype=cupy.uint8)
        out["1g"] = int(x.size)
        print(json.dumps(out), flush=True)
    """)
    _record("cupy_cap", child=seen, returncode=result.returncode, stderr=result.stderr.strip().splitlines()[-3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert seen["4g"] == "OutOfMemoryError" and seen["1g"] == 1 << 30


def test_apply_caps_in_a_process_that_imported_torch_and_cupy() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("cupy")
    code = textwrap.dedent("""
        import json, torch, cupy
        import chronos
        lease = chronos.reserve("2G", "5m")
        out = {"done": lease.apply_caps()}
        try:
            torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
            out["torch_4g"] = "allocated"
        except torch.cuda.OutOfMemoryError:
            out["torch_4g"] = "OutOfMemoryError"
        out["torch_1g"] = int(torch.ones(1 << 30, dtype=torch.uint8, device="cuda").numel())
        try:
            cupy.empty(4 << 30, dtype=cupy.uint8)
            out["cupy_4g"] = "allocated"
        except cupy.cuda.memory.OutOfMemoryError:
            out["cupy_4g"] = "OutOfMemoryError"
        out["cupy_512m"] = int(cupy.ones(512 << 20, dtype=cupy.uint8).size)
        lease.release()
        print(json.dumps(out), flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    seen = json.loads(lines[-1]) if lines else {}
    _record("apply_caps", child=seen, returncode=result.returncode, stderr=result.stderr.strip().splitlines()[-3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.startswith("torch: cuda:0 capped at") for line in seen["done"])
    assert any(line.startswith("cupy: device 0 memory pool limited") for line in seen["done"])
    assert seen["torch_4g"] == "OutOfMemoryError" and seen["torch_1g"] == 1 << 30
    assert seen["cupy_4g"] == "OutOfMemoryError" and seen["cupy_512m"] == 512 << 20

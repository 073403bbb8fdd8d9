"""Allocate GPU memory through the CUDA driver API (ctypes on libcuda.so.1), past every framework cap.

Used by the GPU tests and benchmarks as a program that escapes the cooperative caps:

    python3 bench/gpu_cuda_alloc.py MIB [MIB ...] [--hold SECONDS]

Each size is allocated (cuMemAlloc) and zero-filled on the first visible device; one JSON line per
allocation reports the CUDA result code (0 success, 2 out of memory) and the wall-clock time just
after it returned. Then the program holds its memory for --hold seconds (default 60) and exits 0.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time


def _check(rc: int, what: str) -> None:
    if rc != 0:
        print(json.dumps({"error": what, "rc": rc}), flush=True)
        raise SystemExit(3)


def main(argv: list[str]) -> int:
    hold = 60.0
    if "--hold" in argv:
        i = argv.index("--hold")
        hold = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    sizes = [int(a) for a in argv]
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    print(json.dumps({"context": True, "t": time.time()}), flush=True)
    for mib in sizes:
        ptr = ctypes.c_uint64()
        nbytes = ctypes.c_size_t(mib << 20)
        rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), nbytes)
        if rc == 0:
            _check(cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(0), nbytes), "cuMemsetD8")
            _check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        print(json.dumps({"mib": mib, "rc": rc, "t": time.time()}), flush=True)
    time.sleep(hold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

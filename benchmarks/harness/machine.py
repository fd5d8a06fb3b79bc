"""The machine's dense GEMM throughput: the ceiling to read the pipelines' FLOP/s against.

    python benchmarks/harness/machine.py [--n 2048]    -> one JSON line on stdout

fp32 through numpy's BLAS and through torch; bf16 through torch only where the CPU has
bf16 instructions (cpu_info().has_bf16), else "not available: CPU has no bf16
instructions" (torch would emulate it, much slower than fp32, which says nothing about
the hardware). Best of a few repeats, after one warm-up. Run in a subprocess by the
harness, so the harness process does not import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the repo root, for diffrt

from diffrt.runtime.cpu import cpu_info  # noqa: E402

NO_BF16 = "not available: CPU has no bf16 instructions"


def _best_gflops(matmul: Callable[[], object], n: int, repeats: int) -> float:
    matmul()  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 / best / 1e9, 1)


def gemm_numpy_fp32(n: int, repeats: int) -> float:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return _best_gflops(lambda: a @ b, n, repeats)


def gemm_torch(n: int, repeats: int, dtype_name: str) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    with torch.inference_mode():
        return _best_gflops(lambda: a @ b, n, repeats)


def _busy_and_own_cpu() -> tuple[float, float, float]:
    """(wall, CPU seconds of every process on the machine, of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    times = os.times()
    return time.perf_counter(), busy, times.user + times.system


def measure(n: int = 2048, repeats: int = 5) -> dict:
    cpu = cpu_info()
    wall0, busy0, own0 = _busy_and_own_cpu()
    result = {"n": n, "repeats": repeats, "numpy_fp32_gflops": gemm_numpy_fp32(n, repeats)}
    try:
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["torch_fp32_gflops"] = gemm_torch(n, repeats, "fp32")
        result["torch_bf16_gflops"] = gemm_torch(n, repeats, "bf16") if cpu.has_bf16 else NO_BF16
    except ImportError:
        result["torch_fp32_gflops"] = result["torch_bf16_gflops"] = "not available: torch is not installed"
    wall1, busy1, own1 = _busy_and_own_cpu()
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    result["others_cpu_share"] = round(others / max((wall1 - wall0) * (os.cpu_count() or 1), 1e-9), 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU a backend runs on, for engine-cache keys (CuPy is how the runtime talks to CUDA)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


def gpu_info(device: int | None = None) -> GpuInfo:
    """The name and compute capability of CUDA device `device` (default: CuPy's current one)."""
    import cupy

    device = cupy.cuda.Device().id if device is None else device
    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return GpuInfo(name, f"{props['major']}.{props['minor']}")

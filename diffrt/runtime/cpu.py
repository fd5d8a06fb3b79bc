"""What this CPU can do, read at run time (never assumed).

The machines diffrt runs on differ: Intel Sapphire Rapids (AVX-512, AMX-bf16), AMD
Zen 4 (AVX-512 with AVX512-BF16, no AMX), older x86 with AVX2 only, ARM. Half
precision pays on a CPU only where it has bf16 instructions, so backends pick their
default precision from here, and every benchmark number is reported with `describe()`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

# The flags that decide kernel choice for diffusion models on x86 (as /proc/cpuinfo names them).
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                  "amx_tile", "amx_bf16", "amx_fp16", "amx_int8")  # bf16/fp16 and int8 (VNNI, AMX-INT8) dot products


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """e.g. 'Intel(R) Xeon(R) Platinum 8481C' or 'AMD EPYC 9B14'."""
    flags: frozenset[str]
    """Only RELEVANT_FLAGS that this CPU has."""
    logical_cores: int
    """Cores this process may run on (its affinity mask), not the machine's total."""
    machine: str
    """platform.machine(): x86_64, aarch64, ..."""

    @property
    def has_bf16(self) -> bool:
        """Native bf16 dot products: AMX-bf16 or AVX512-BF16 (x86); ARM's bf16 extension."""
        return bool({"amx_bf16", "avx512_bf16", "bf16"} & self.flags)

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags

    def describe(self) -> str:
        flags = " ".join(f for f in RELEVANT_FLAGS if f in self.flags) or "none of " + "/".join(RELEVANT_FLAGS[:4])
        return f"{self.model} ({self.machine}, {self.logical_cores} cores; {flags})"

    def to_json(self) -> dict:
        return {"model": self.model, "machine": self.machine, "logical_cores": self.logical_cores,
                "flags": sorted(self.flags), "has_bf16": self.has_bf16, "has_amx": self.has_amx}


def _parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 says flags, ARM says Features
            flags = set(value.split())
    return model, flags


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, flags = _parse_cpuinfo(f.read())
    except OSError:
        pass
    relevant = frozenset(f for f in flags if f in RELEVANT_FLAGS or f == "bf16")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(model=model or platform.processor() or "unknown CPU", flags=relevant, logical_cores=cores,
                   machine=platform.machine())


def installed_versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each package that is installed (the others left out):
    what goes beside a measurement or into a manifest."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


__all__ = ["RELEVANT_FLAGS", "CpuInfo", "cpu_info", "installed_versions"]

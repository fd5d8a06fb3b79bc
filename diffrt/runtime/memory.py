"""How much memory this process can still use: MemAvailable, capped by a cgroup limit
and by the process's address-space limit (`ulimit -v`)."""

from __future__ import annotations

from pathlib import Path

GIB = 2**30


def format_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.1f} GiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's cgroup (v2, then v1), or None if unlimited/unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def _address_space_headroom() -> int | None:
    """RLIMIT_AS (`ulimit -v`) minus this process's current virtual size, or None if
    unlimited/unknown: past it every allocation fails, however much RAM is free."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> int | None:
    """Bytes this process can allocate before the machine, its cgroup or its address-space
    limit runs out; None if the platform does not say (then nothing is refused for memory)."""
    values = [v for v in (_meminfo_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(values) if values else None


__all__ = ["GIB", "available_memory_bytes", "format_gib"]

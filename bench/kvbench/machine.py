"""What the report's figures were measured on: CPU, cores, memory, the data directory's disk, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

LIBRARIES = ("kvstore", "torch", "numpy", "lmdb", "transformers", "optimum-quanto", "redis", "uvloop",
             "pytest-benchmark", "matplotlib", "lmcache")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _disk(path: Path) -> str:
    """The filesystem holding ``path``: device, type, size, and whether the kernel calls it rotational."""
    path = path.resolve()
    best = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and (best is None or len(mount) > len(best[1])):
                best = (device, mount, fstype)
    except OSError:
        pass
    stat = os.statvfs(path)
    size = f"{stat.f_blocks * stat.f_frsize / 2**30:.0f} GiB"
    if best is None:
        return f"{path} ({size})"
    device, mount, fstype = best
    kind = ""
    name = Path(device).name.rstrip("0123456789")
    rotational = Path(f"/sys/block/{name}/queue/rotational")
    if rotational.exists():
        kind = ", rotational" if rotational.read_text().strip() == "1" else ", non-rotational"
    return f"{device} on {mount} ({fstype}, {size}{kind})"


def describe(data_dir: Path) -> dict:
    """The report's ``machine`` section."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    data_dir.mkdir(parents=True, exist_ok=True)
    return {"cpu": _cpu(), "cores": os.cpu_count() or 1, "memory_bytes": _memory_bytes(), "disk": _disk(data_dir),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "libraries": versions}

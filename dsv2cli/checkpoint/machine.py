"""What this machine has: the memory that can still be allocated on a device, and what limits it.

On the CPU, the smallest of ``MemAvailable`` (``/proc/meminfo``), this cgroup's limit minus its use
(page cache it can drop counted as free), and ``RLIMIT_AS`` minus the address space in use (mapped
files count there); on CUDA, the device's free memory. ``fit.py`` weighs a load's need against it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Available:
    """Bytes that can still be allocated, and what limits them (``MemAvailable``, a cgroup, ``RLIMIT_AS``, CUDA)."""

    bytes: int
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup"), lines: list[str] | None = None) -> int | None:
    """Limit minus use for this process's cgroup and its parents (v2), or v1's memory controller; None without a limit.

    ``lines``: ``/proc/self/cgroup`` (read when not given).
    """
    if lines is None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
    best: int | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: walk up to the root, the tightest limit wins
            group = root / path.lstrip("/")
            while True:
                limit = _read_int(group / "memory.max")
                used = _read_int(group / "memory.current")
                if limit is not None and used is not None:
                    best = min(best if best is not None else limit, limit - used + _reclaimable(group / "memory.stat"))
                if group == root or root not in group.parents:
                    break
                group = group.parent
        elif "memory" in controllers.split(","):
            group = root / "memory" / path.lstrip("/")
            limit = _read_int(group / "memory.limit_in_bytes")
            used = _read_int(group / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < 1 << 60:
                free = limit - used + _reclaimable(group / "memory.stat", "total_inactive_file")
                best = free if best is None else min(best, free)
    return best


def _reclaimable(stat: Path, key: str = "inactive_file") -> int:
    """Page cache the cgroup can drop before it runs out (counted in its use)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _address_space_available() -> int | None:
    """``RLIMIT_AS`` minus this process's address space (mapped files count), or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_memory(device: torch.device | str = "cpu") -> Available:
    """What can still be allocated on ``device`` (see the module docstring for the sources)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Available(free, f"free memory of {device}")
    candidates = [
        (_meminfo_available(), "MemAvailable"),
        (_cgroup_available(), "this cgroup's memory limit"),
        (_address_space_available(), "RLIMIT_AS"),
    ]
    known = [(max(0, n), source) for n, source in candidates if n is not None]
    if not known:
        return Available(1 << 62, "no limit known")
    return Available(*min(known))


def address_space_limited() -> bool:
    """Whether mapped files count against the limit (``RLIMIT_AS``) as allocations do."""
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY

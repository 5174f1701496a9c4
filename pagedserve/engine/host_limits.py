"""What this process may use of the machine: CPUs (affinity mask, cgroup CPU quota) and memory (cgroup limit).

A pod with `cpu: '2'` on a 64-core node sees 64 cores in os.cpu_count() and psutil; its quota is in
the cgroup (v2: cpu.max, v1: cpu.cfs_quota_us / cpu.cfs_period_us), its cores in the affinity mask.
Its memory limit (v2: memory.max, v1: memory.limit_in_bytes) is not in /proc/meminfo either.
Limits are read from the process's own cgroup and each ancestor up to the mount (the smallest wins), found
through /proc/self/cgroup and /proc/self/mountinfo, as the JVM and Go runtimes find them. `root` is "/"
except in tests, which lay out fake /proc and /sys trees.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

# cgroup v1 writes "no limit" as a huge page-aligned number instead of "max".
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class _Mount:
    point: Path          # where it is mounted, e.g. /sys/fs/cgroup/cpu,cpuacct
    root: str            # which cgroup the mount shows at its top, e.g. / or /docker/abc
    controllers: frozenset[str]
    is_v2: bool


def default_num_threads(root: Path = Path("/")) -> int:
    """Threads to run with: physical cores, at most the CPUs in the affinity mask and the CPU quota."""
    num_physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    num_logical = os.cpu_count() or num_physical
    num_allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else num_logical
    # NOTE: an affinity mask narrower than the machine says how many cores are ours; whether they are
    # hyperthread siblings is not known, so each counts as one.
    limits = [num_physical, num_allowed]
    quota = cpu_quota(root)
    if quota is not None:
        limits.append(math.ceil(quota))
    return max(1, min(limits))


def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs the cgroup quota allows (e.g. 2.0 for `cpu: '2'`, 0.5 for `cpu: 500m`); None without a quota."""
    quotas = []
    for directory, is_v2 in _cgroup_dirs(root, "cpu"):
        if is_v2:
            text = _read(directory / "cpu.max")
            if text is None:
                continue
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
        else:
            quota_text, period_text = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
            if quota_text is not None and period_text is not None and int(quota_text) > 0:
                quotas.append(int(quota_text) / int(period_text))
    return min(quotas) if quotas else None


def memory_limit(root: Path = Path("/")) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the tightest cgroup memory limit over this process; None without one."""
    tightest: tuple[int, int] | None = None
    for directory, is_v2 in _cgroup_dirs(root, "memory"):
        limit_name, usage_name = ("memory.max", "memory.current") if is_v2 else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes")
        text = _read(directory / limit_name)
        if text is None or text == "max" or int(text) >= _V1_UNLIMITED:
            continue
        usage = int(_read(directory / usage_name) or 0)
        if tightest is None or int(text) - usage < tightest[0] - tightest[1]:
            tightest = (int(text), usage)
    return tightest


def available_memory(root: Path = Path("/")) -> int:
    """Bytes free for this process: the machine's available memory, or less under a cgroup limit."""
    available = psutil.virtual_memory().available
    limit = memory_limit(root)
    return available if limit is None else max(0, min(available, limit[0] - limit[1]))


def _cgroup_dirs(root: Path, controller: str) -> list[tuple[Path, bool]]:
    """The folders holding `controller`'s limits for this process: its cgroup, then each parent up to the
    mount; (folder, is cgroup v2)."""
    paths = _process_cgroups(root)
    found = []
    for mount in _mounts(root):
        if mount.is_v2:
            path = paths.get("")
        elif controller in mount.controllers:
            path = next((value for names, value in paths.items() if controller in names.split(",")), None)
        else:
            continue
        if path is None:
            continue
        relative = os.path.relpath(path, mount.root) if path.startswith(mount.root) else "."
        directory = root / mount.point.relative_to("/") / ("" if relative == "." else relative)
        top = root / mount.point.relative_to("/")
        while True:
            found.append((directory, mount.is_v2))
            if directory == top or top not in directory.parents:
                break
            directory = directory.parent
    return found


def _process_cgroups(root: Path) -> dict[str, str]:
    """Controllers ("" for cgroup v2) -> this process's cgroup path, from /proc/self/cgroup."""
    text = _read(root / "proc/self/cgroup") or ""
    paths = {}
    for line in text.splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        paths[controllers] = path
    return paths


def _mounts(root: Path) -> list[_Mount]:
    """The cgroup file systems in /proc/self/mountinfo."""
    mounts = []
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3 or tail_parts[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail_parts[2].split(","))
        mounts.append(_Mount(Path(parts[4]), parts[3], options, tail_parts[0] == "cgroup2"))
    return mounts


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None

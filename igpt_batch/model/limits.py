"""The memory and CPUs this process may use: its container's cgroup limits (v2 or v1) before the host's totals.

A Kubernetes pod sees the host's /proc/meminfo and every host core, but is killed past its memory limit and
throttled past its CPU quota; batch sizes and thread counts are sized from what the cgroup allows.
"""
from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:  # "max" (v2 without a limit) or garbage
        return None


def _own_dirs(root: str | None, self_cgroup: str | None) -> list[Path]:
    """This process's cgroup folders, innermost first, then each ancestor up to the controller's root
    (a limit on any of them applies): the v2 tree, then the v1 memory and cpu controllers."""
    root, self_cgroup = root or CGROUP_ROOT, self_cgroup or SELF_CGROUP  # read at call time: tests point them
    paths = {"": "/", "memory": "/", "cpu": "/"}
    for line in (_read(Path(self_cgroup)) or "").splitlines():
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        for c in controllers.split(",") if controllers else [""]:
            if c in paths:
                paths[c] = rel or "/"
    dirs = []
    for controller, rel in paths.items():
        names = [controller] if controller != "cpu" else ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
        for name in names:
            base = Path(root) / name if name else Path(root)
            parts = [p for p in rel.split("/") if p]
            dirs += [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def memory_available(root: str | None = None, self_cgroup: str | None = None) -> int | None:
    """Bytes the cgroup still allows (its tightest limit minus that cgroup's usage); None without a limit."""
    best = None
    for d in _own_dirs(root, self_cgroup):
        for limit_file, usage_file in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit = _int(_read(d / limit_file))
            if limit is None or limit >= NO_LIMIT:
                continue
            left = max(0, limit - (_int(_read(d / usage_file)) or 0))
            best = left if best is None else min(best, left)
    return best


def cpu_quota(root: str | None = None, self_cgroup: str | None = None) -> float | None:
    """CPUs the cgroup's CFS quota allows (e.g. 2.5); None without a quota."""
    best = None
    for d in _own_dirs(root, self_cgroup):
        v2 = (_read(d / "cpu.max") or "").split()
        quota, period = (_int(v2[0]), _int(v2[1])) if len(v2) == 2 else (
            _int(_read(d / "cpu.cfs_quota_us")), _int(_read(d / "cpu.cfs_period_us")))
        if quota is None or quota <= 0 or not period:
            continue
        best = quota / period if best is None else min(best, quota / period)
    return best


def host_available_memory() -> int:
    """The host's available memory (MemAvailable from /proc/meminfo; free pages where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def available_memory_bytes(root: str | None = None, self_cgroup: str | None = None) -> int:
    """What this process may still allocate: the smaller of the host's available memory and the cgroup's room."""
    host = host_available_memory()
    room = memory_available(root, self_cgroup)
    return host if room is None else min(host, room)


def cpu_count(root: str | None = None, self_cgroup: str | None = None) -> int:
    """Whole CPUs this process may keep busy: the CPUs it may run on, capped by the cgroup quota (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(root, self_cgroup)
    return max(1, min(cpus, int(quota))) if quota is not None else cpus


def torch_threads(requested: int, default: int, root: str | None = None, self_cgroup: str | None = None) -> int:
    """`requested` if set (run.torch_threads); otherwise torch's default, which counts the host's cores, capped by
    the CPUs the container may use (more threads than the quota only get throttled)."""
    return requested or max(1, min(default, cpu_count(root, self_cgroup)))

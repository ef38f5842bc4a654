"""What this process may use of the machine it runs on.

Owns: `usable_cpus`, the number of CPUs this process may run on: its CPU affinity (`taskset`, `numactl`,
a container's cpuset) capped by its cgroup CPU quota (`docker --cpus`, Kubernetes limits), which
`os.cpu_count()` ignores. Every default thread count (`--threads`) comes from here. Also `user_cache_dir`
(DIFFSEG_CACHE, else $XDG_CACHE_HOME/diffseg-engine: exported graphs and TensorRT plans).
Imports: the standard library only. Never torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _own_cgroup(proc_cgroup: Path) -> str | None:
    """The cgroup v2 path of this process ("0::/user.slice/..."), or None (v1 only, or no /proc)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    except OSError:
        pass
    return None


def _quota(cpu_max: Path) -> float | None:
    """CPUs allowed by one cgroup v2 `cpu.max` file ("200000 100000" -> 2.0; "max 100000" -> None)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or float(period) <= 0:
        return None
    return float(quota) / float(period)


def _v1_quota(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (v2), or the v1 quota; None: none."""
    own = _own_cgroup(proc_cgroup)
    limits = []
    if own is not None:
        path = root / own.lstrip("/")
        while True:
            q = _quota(path / "cpu.max")
            if q is not None:
                limits.append(q)
            if path == root or root not in path.parents:
                break
            path = path.parent
    else:
        q = _v1_quota(root)
        if q is not None:
            limits.append(q)
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """min(CPUs in this process's affinity mask, ceil(cgroup CPU quota)), at least 1."""
    n = _affinity_cpus()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def user_cache_dir() -> Path:
    """The user cache: DIFFSEG_CACHE, else $XDG_CACHE_HOME/diffseg-engine (~/.cache/diffseg-engine)."""
    base = os.environ.get("DIFFSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffseg-engine")
    return Path(base)

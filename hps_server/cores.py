"""How many cores this process may use (`server.processes: auto`): the cores its CPU affinity allows, fewer
when a cgroup CPU quota (a container's CPU limit, cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`) grants less
time than that: a pod limited to 2 CPUs on a 64-core node gets 2, not 64."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = Path("/proc/self/cgroup")) -> int:
    """The affinity's core count, bounded by the tightest CPU quota over this process's cgroup and its
    parents (at least 1)."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup_root, _cgroup_paths(own_cgroups))
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(cgroup_root: Path, paths: dict[str, str]) -> float | None:
    """CPUs' worth of time the tightest quota grants (None: no quota). `paths`: the process's cgroup path per
    controller ("" for the v2 unified hierarchy), as /proc/self/cgroup lists them."""
    quotas: list[float] = []
    if "" in paths:
        for folder in _self_and_parents(cgroup_root, paths[""]):
            quotas.extend(_v2_quota(folder / "cpu.max"))
    for controllers, path in paths.items():
        if "cpu" in controllers.split(","):
            for mount in (cgroup_root / controllers, cgroup_root / "cpu"):
                for folder in _self_and_parents(mount, path):
                    quotas.extend(_v1_quota(folder))
    return min(quotas, default=None)


def _cgroup_paths(own_cgroups: Path) -> dict[str, str]:
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        paths[controllers] = path
    return paths


def _self_and_parents(mount: Path, path: str) -> list[Path]:
    """`mount`/`path` and each folder above it up to `mount` (inside a container's cgroup namespace the path is
    "/", and the mount is the container's own cgroup)."""
    parts = [part for part in path.split("/") if part]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> list[float]:
    try:
        quota, period = cpu_max.read_text().split()
        return [] if quota == "max" else [int(quota) / int(period)]
    except (OSError, ValueError, ZeroDivisionError):
        return []


def _v1_quota(folder: Path) -> list[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []

"""How many intra-op threads torch may use in a training process (docs/decisions.md 64).

The rule: the cores this process may run on (its CPU affinity, capped by a
cgroup CPU quota: a container's `--cpus`), shared among the training
processes of this machine, less one core per reader thread of the loader
and at least one for everything else; at least one thread. Torch's own default is every physical core of the machine, so
its OpenMP team and the reader threads (and, under accelerate or torchrun,
the other processes) ask for more cores than exist; a spinning OpenMP team
that loses a core to another thread waits for it at every barrier, which is
what made a tiny step 10-20x slower with 2 threads than with 1 on a loaded
2-core machine (bench/README.md, "threads").

The rule only lowers the count: an explicit `OMP_NUM_THREADS` (torchrun sets
it to 1 for several processes) or a lower count already set in the process
is left alone. Torch-free, so it can be tested on any cgroup tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores(affinity: set[int] | None = None, cgroup_root: str | Path = "/sys/fs/cgroup",
                 proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by the tightest CPU quota of its cgroup or any
    ancestor (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = max(1, len(affinity))
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def torch_threads(cores: int, readers: int, local_processes: int = 1) -> int:
    """The rule: this process's share of the cores, less one per reader thread and at least one for the rest
    (the readers, the loop's Python, other processes: with 0 readers on a loaded 2-core machine, 2 threads
    made a tiny step 28x slower than 1), at least 1."""
    return max(1, cores // max(1, local_processes) - max(1, readers))


def apply(readers: int, current: int, env: dict | None = None, cores: int | None = None) -> int | None:
    """The torch thread count the rule asks for, or None to leave torch as it is (OMP_NUM_THREADS is set,
    or `current` is already at or below the rule). `current`: torch.get_num_threads()."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    # LOCAL_WORLD_SIZE: processes of this run on this machine (set by torchrun and accelerate launch).
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    want = torch_threads(usable_cores() if cores is None else cores, readers, local)
    return want if want < current else None


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The tightest CPU quota in cores of this process's cgroup and its ancestors; None: no quota found."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one unified hierarchy
            for folder in _ancestors(root, path):
                found += _v2_quota(folder / "cpu.max")
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for folder in _ancestors(mount, path):
                        found += _v1_quota(folder)
                    break
    return min(found) if found else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """mount/path and each folder above it up to mount (inside a container, the mount is its own cgroup)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(file: Path) -> list[float]:
    try:
        quota, period = file.read_text().split()[:2]
        return [] if quota == "max" else [int(quota) / int(period)]
    except (OSError, ValueError):
        return []


def _v1_quota(folder: Path) -> list[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []

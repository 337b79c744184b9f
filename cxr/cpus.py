"""How many CPUs this process may use, and the CPU serving shape (model instances x threads) that follows.

`os.cpu_count()` is the node's core count: in a container limited to 2 CPUs on a 64-core node, onnxruntime's
default would start 64 threads per session, which then fight over 2 CPUs. The count here honours the affinity mask
and the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), as Kubernetes and Docker set them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(cgroup: Path) -> float | None:
    """The CPU quota in CPUs, or None when there is none (v2 first, then v1)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up: 1.5 CPUs -> 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def serving_shape(cpus: int) -> tuple[int, int]:
    """(instances, intra-op threads per instance) for `cpus` CPUs: instances x threads = cpus.

    At least two instances where there are two CPUs, so one batch computes while the next one gathers and the last
    one is answered; one thread per instance on small machines, where splitting every operator across cores costs
    more in synchronisation than it gains (measured: README, "Serving shape"); up to 4 threads on bigger ones, so
    one request alone is still answered quickly.
    """
    cpus = max(1, int(cpus))
    threads = min(4, max(1, cpus // 4 * 2)) if cpus >= 4 else 1
    return max(1, cpus // threads), threads

"""CPU threads: how many torch may use, so two jobs on one machine do not each take every core."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # macOS and Windows have no affinity call


def default_threads() -> int:
    """OMP_NUM_THREADS when it is set to a positive count, else the usable cores."""
    # OpenMP also accepts a nested list ("4,2"); its first entry is the outer level's count.
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return usable_cores()


def apply_threads(threads: int | None) -> int:
    """Give torch `threads` intra-op threads (None: `default_threads()`); returns the count."""
    import torch

    count = threads or default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count

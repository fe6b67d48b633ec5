"""The machine a job runs on: the device and precision it asked for (shared by training,
evaluation, the engine and the server), and how many CPU threads torch may use, so two jobs on
one machine do not each take every core. torch is imported inside the functions: config
validation imports this module and must stay light."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from truthgpt.errors import ConfigError

if TYPE_CHECKING:
    import torch


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

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: {threads!r} is not a count of threads (>= 1, or None)")
    count = threads or default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def resolve_device(name: str, key: str = "hardware.device") -> torch.device:
    """`auto` -> cuda, else mps, else cpu; a CUDA device asked for without CUDA is an error
    naming the config key that asked."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} asked for, but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message lists its two dozen device types
        raise ConfigError(f"{key}: {name!r} is not one of auto, cpu, cuda, cuda:N, mps") from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 where the GPU supports it, else fp32; or the named dtype."""
    import torch

    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), for MFU. fp32 runs use TF32,
# which is half the bf16 rate on these parts.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The accelerator's dense peak FLOP/s at `dtype` (for MFU), or None when unknown."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops if dtype != torch.float32 else flops / 2
    return None

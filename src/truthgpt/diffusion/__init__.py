"""Image generation on diffusers: pipeline loading, schedulers by name, memory levels, speed mode.

from truthgpt.config import DiffusionConfig
from truthgpt.diffusion import generate_images

result = generate_images(DiffusionConfig(model="path/to/sd15", prompt="a lighthouse"))
print(result.paths, result.stats.peak_allocated_gib)
"""

from __future__ import annotations

from truthgpt.quiet import drop_if_clip_notices, drop_torchvision_notices

# Before diffusers loads: importing its pipelines touches transformers' image processors.
drop_torchvision_notices()
drop_if_clip_notices()

from truthgpt.diffusion.generate import ImageResult, generate_images, parse_lora  # noqa: E402
from truthgpt.diffusion.memory import (  # noqa: E402
    LEVELS,
    RECIPES,
    MemoryMonitor,
    MemoryStats,
    apply_memory_level,
    choose_level,
    memory_needs,
)
from truthgpt.diffusion.pipeline import component_bytes, load_pipeline, resolve_dtype  # noqa: E402
from truthgpt.diffusion.schedulers import SCHEDULERS, is_flow_matching, set_scheduler  # noqa: E402
from truthgpt.diffusion.speed import compile_denoiser, prepare_for_speed  # noqa: E402

__all__ = [
    "LEVELS",
    "RECIPES",
    "SCHEDULERS",
    "ImageResult",
    "MemoryMonitor",
    "MemoryStats",
    "apply_memory_level",
    "choose_level",
    "compile_denoiser",
    "component_bytes",
    "generate_images",
    "is_flow_matching",
    "load_pipeline",
    "memory_needs",
    "parse_lora",
    "prepare_for_speed",
    "resolve_dtype",
    "set_scheduler",
]

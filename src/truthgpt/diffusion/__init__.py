"""Image generation on diffusers: pipeline loading, schedulers by name, memory levels, speed mode.

from truthgpt.config import DiffusionConfig
from truthgpt.diffusion import generate_images

result = generate_images(DiffusionConfig(model="path/to/sd15", prompt="a lighthouse"))
print(result.paths, result.stats.peak_allocated_gib)
"""

from __future__ import annotations

from truthgpt.diffusion.generate import ImageResult, generate_images, parse_lora
from truthgpt.diffusion.memory import (
    LEVELS,
    RECIPES,
    MemoryMonitor,
    MemoryStats,
    apply_memory_level,
    choose_level,
    memory_needs,
)
from truthgpt.diffusion.pipeline import component_bytes, load_pipeline, resolve_dtype
from truthgpt.diffusion.schedulers import SCHEDULERS, is_flow_matching, set_scheduler
from truthgpt.diffusion.speed import compile_denoiser, prepare_for_speed

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

"""Load a diffusers pipeline: a local folder written by `save_pretrained`, or a hub id on request.

Nothing reaches the hub unless `allow_download` is set. The pipeline comes back on the CPU in the
asked dtype; placing it on a GPU is the memory level's job (`memory.apply_memory_level`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.quiet import no_load_save_bars, no_numpy_copy_notices

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# owner/name, the shape of a hub repository id; anything else that is not a folder is a typo.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# What from_pretrained raises for a folder it cannot read: missing or broken weights, a
# model_index.json naming unknown classes, configs that do not fit the weights.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError)


def resolve_dtype(
    name: str, device: torch.device, log: Callable[[str], None] = print
) -> torch.dtype:
    """The torch dtype for `fp16 | bf16 | fp32`; fp16 on a CPU becomes fp32 (CPU half kernels are
    missing or slow), with one log line."""
    if name not in DTYPES:
        raise ConfigError(f"diffusion.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        log("diffusion: fp16 on a CPU is slow or unsupported; using fp32")
        return torch.float32
    return DTYPES[name]


def load_pipeline(
    model: str | Path, dtype: torch.dtype = torch.float16, allow_download: bool = False
) -> DiffusionPipeline:
    """A text-to-image pipeline from a local diffusers folder, or a hub id if `allow_download`."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: is a file; expected a diffusers pipeline folder with model_index.json "
                "(a single .safetensors checkpoint must be converted first, e.g. with diffusers' "
                "from_single_file + save_pretrained)"
            )
        if not (path / "model_index.json").is_file():
            raise CheckpointError(
                f"{path}: no model_index.json, so this is not a diffusers pipeline folder; "
                "write one with pipe.save_pretrained(folder)"
            )
        source, local_only = str(path), True
    elif _HUB_ID.match(str(model)):
        if not allow_download:
            raise CheckpointError(
                f"{model!r} is not a local folder. truthgpt is offline by default: set "
                "diffusion.allow_download=true to fetch this hub id, or give a local folder"
            )
        source, local_only = str(model), False
    else:
        raise CheckpointError(f"{model!r}: no such folder")

    # A download keeps its progress bars; a local load is quick and its bars say nothing.
    bars_off = no_load_save_bars() if local_only else contextlib.nullcontext()
    try:
        with bars_off, no_numpy_copy_notices():
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(
                    source, dtype=dtype, local_files_only=local_only
                )
            except ValueError as exc:
                # AutoPipeline only knows the text-to-image families it maps; any other
                # pipeline class in model_index.json still loads through the generic entry point.
                if "AutoPipeline" not in str(exc):
                    raise
                pipe = DiffusionPipeline.from_pretrained(
                    source, dtype=dtype, local_files_only=local_only
                )
    except _LOAD_ERRORS as exc:
        raise CheckpointError(f"{source}: could not load the diffusers pipeline: {exc}") from exc
    return pipe


def denoiser_of(pipe: DiffusionPipeline) -> tuple[str, torch.nn.Module]:
    """(name, module) of the network that runs every step: the UNet or the transformer."""
    for name in ("unet", "transformer", "prior"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise ConfigError(f"{type(pipe).__name__} has no unet or transformer to denoise with")


def component_bytes(pipe: DiffusionPipeline) -> dict[str, int]:
    """Bytes of parameters and buffers of each torch component, as they are stored now."""
    sizes = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes

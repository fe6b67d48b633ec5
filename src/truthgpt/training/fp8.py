"""FP8 matmuls in training (`training.fp8`), through torchao's float8 recipes.

Each eligible `nn.Linear` becomes torchao's `Float8Linear`: its weight stays a bf16/fp32
parameter (checkpoints, the optimizer and export see nothing new); the forward and backward
matmuls cast their inputs to float8 with dynamic scales and run on the FP8 tensor cores. The
LM head stays in high precision (the logits are where the precision matters), as do layers
whose shapes the FP8 kernels cannot take. Needs a GPU with FP8 matmuls (compute capability
8.9+); elsewhere the run trains without it and says so. torch.compile fuses the scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from truthgpt.errors import ConfigError

FP8_CAPABILITY = (8, 9)  # Ada; Hopper and Blackwell have it too


def enable_fp8(model: nn.Module, recipe: str, device: torch.device, log: Callable) -> int:
    """Swap the eligible linear layers of `model` for FP8 ones, in place; returns how many."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        log(
            f"training.fp8 {recipe}: {device} has no FP8 matmuls (a CUDA GPU of compute "
            "capability 8.9+ does); training without them"
        )
        return 0
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ConfigError(
            f"training.fp8 {recipe}: needs torchao (pip install torchao), which did not import: "
            f"{error}"
        ) from error
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: list[str] = []

    def eligible(module: nn.Module, name: str) -> bool:
        take = (
            isinstance(module, nn.Linear)
            and not name.endswith("lm_head")
            and id(module.weight) not in shared  # a head tied to the embedding
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )
        if take:
            chosen.append(name)
        return take

    convert_to_float8_training(
        model, module_filter_fn=eligible, config=Float8LinearConfig.from_recipe_name(recipe)
    )
    log(f"training.fp8 {recipe}: {len(chosen)} linear layers run their matmuls in FP8")
    return len(chosen)

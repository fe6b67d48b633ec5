"""Per-block torch.compile (`training.compile_scope: blocks`), as torchtitan compiles each
transformer block: the blocks share one forward, so dynamo compiles it once (parameters are
graph inputs, not constants) and every layer reuses the graph. Warm-up no longer grows with
depth; the embedding, head and loss between the blocks run eagerly."""

from __future__ import annotations

import torch
from torch import nn

from truthgpt.config import TrainingConfig
from truthgpt.errors import ConfigError
from truthgpt.training.distributed import repeated_blocks


def compile_blocks(model: nn.Module, mode: str) -> int:
    """Compile every repeated block of `model` in place (state-dict keys unchanged, so
    checkpoints and exports do not see it); returns how many."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(
            f"training.compile_scope: blocks found no repeated blocks (an nn.ModuleList) in "
            f"{type(model).__name__}; use compile_scope: model"
        )
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


def compile_note(training: TrainingConfig, device: torch.device) -> str | None:
    """The line that says what torch.compile will do (so no setting is ignored silently and
    the first step's wait has a reason), or None when there is nothing to say."""
    if not training.compile:
        if training.compile_mode == "default" and training.compile_scope == "model":
            return None
        return (
            f"warning: training.compile_mode {training.compile_mode!r} and compile_scope "
            f"{training.compile_scope!r} do nothing without training.compile: true"
        )
    mode = training.compile_mode
    if mode == "reduce-overhead" and device.type != "cuda":
        mode = "default: CUDA graphs need a CUDA device"
    return f"torch.compile ({training.compile_scope}, {mode}): the first steps compile"

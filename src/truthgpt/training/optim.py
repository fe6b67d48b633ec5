"""Optimizers and learning-rate schedules, by name from the registries."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from truthgpt.config import OptimConfig
from truthgpt.registry import OPTIMIZERS, SCHEDULES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only: norms, biases and embeddings are left alone.

    Decaying gains and biases pulls them to zero for no regularisation benefit, and decaying
    embeddings penalises rare tokens (the GPT-2/nanoGPT/Llama recipes all exclude them).
    """
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # a tied head and embedding are one parameter: count it once
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@OPTIMIZERS.register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused CUDA kernel does the whole update in one launch per group; elsewhere foreach.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS.get_builder(cfg.name, "optim.name")(model, cfg, device)


# A schedule builder returns the lr multiplier as a function of (step, max_steps).
LrLambda = Callable[[int, int], float]


def _with_warmup(cfg: OptimConfig, decay: Callable[[float], float]) -> LrLambda:
    """Linear warmup from ~0 to the peak over warmup_steps, then `decay(progress in [0, 1])`."""

    def multiplier(step: int, max_steps: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return decay(progress)

    return multiplier


@SCHEDULES.register("cosine")
def cosine_schedule(cfg: OptimConfig) -> LrLambda:
    floor = cfg.min_lr_ratio
    return _with_warmup(cfg, lambda p: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@SCHEDULES.register("linear")
def linear_schedule(cfg: OptimConfig) -> LrLambda:
    floor = cfg.min_lr_ratio
    return _with_warmup(cfg, lambda p: 1 - (1 - floor) * p)


@SCHEDULES.register("constant")
def constant_schedule(cfg: OptimConfig) -> LrLambda:
    return _with_warmup(cfg, lambda p: 1.0)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = SCHEDULES.get_builder(cfg.schedule, "optim.schedule")(cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step, max_steps))

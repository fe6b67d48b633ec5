"""Exponential moving average of the trainable weights (Polyak averaging)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, over the trainable parameters, in fp32."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        # Under FSDP the parameters are sharded DTensors, and so is their average: each rank
        # keeps (and checkpoints, through DCP) the average of its own shards.
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, gate: torch.Tensor | None = None) -> None:
        """One averaging step; `gate` (a bool on the device), when given and false, makes it
        a no-op without the host reading it."""
        current = [p.detach().float() for p in self.params]
        if gate is None:
            # lerp(ema, w, 1 - decay) == decay * ema + (1 - decay) * w, one kernel per list.
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
            return
        # ema += (1 - decay) * gate * (w - ema)
        step = torch._foreach_sub(current, self.shadow)
        torch._foreach_mul_(step, gate.float() * (1.0 - self.decay))
        torch._foreach_add_(self.shadow, step)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for the duration (eval, save)."""
        backup = [p.detach().clone() for p in self.params]
        for param, average in zip(self.params, self.shadow):
            param.copy_(average)
        try:
            yield
        finally:
            for param, saved in zip(self.params, backup):
                param.copy_(saved)

    def named_shadow(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name: what a sharded checkpoint saves and loads in place."""
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [t.clone() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's trainable parameters")
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)

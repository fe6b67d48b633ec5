"""Optimizers and learning-rate schedules, by name from the registries.

An optimizer builder takes `(model, OptimConfig, device)` and returns a torch.optim.Optimizer
over the model's trainable parameters (LoRA leaves most of them frozen), in the two weight-decay
groups of `param_groups`. `muon` is two torch optimizers stepped as one (`MuonWithAdamW`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from truthgpt.config import OptimConfig
from truthgpt.errors import ConfigError
from truthgpt.registry import OPTIMIZERS, SCHEDULES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only: norms, biases and embeddings are left alone.

    Decaying gains and biases pulls them to zero for no regularisation benefit, and decaying
    embeddings penalises rare tokens (the GPT-2/nanoGPT/Llama recipes all exclude them).
    Frozen parameters (requires_grad False) are left out.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
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
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (requires_grad is off everywhere)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@OPTIMIZERS.register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): Adam with weight decay decoupled from the gradient."""
    # The fused kernel does the whole update in one launch per group; elsewhere foreach, which
    # batches the per-tensor ops into a few multi-tensor kernels.
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


@OPTIMIZERS.register("lion")
def build_lion(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Lion with `optim.betas`; the paper uses (0.9, 0.99) and a 3-10x smaller lr and 3-10x
    larger weight decay than AdamW, as its updates have unit size per element."""
    return Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


@OPTIMIZERS.register("adafactor")
def build_adafactor(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """PyTorch's Adafactor (Shazeer & Stern 2018): factored second moments, no first moment, so
    optimizer memory is ~rows + columns per matrix. `optim.betas` and `optim.eps` do not apply;
    its weight decay is decoupled, as AdamW's."""
    if not hasattr(torch.optim, "Adafactor"):
        raise ConfigError(
            f"optim.name: 'adafactor' needs torch.optim.Adafactor (PyTorch >= 2.5); this is "
            f"PyTorch {torch.__version__}. Upgrade PyTorch or pick adamw, lion or sgd."
        )
    return torch.optim.Adafactor(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay
    )


@OPTIMIZERS.register("sgd")
def build_sgd(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with heavy-ball momentum `optim.momentum` (no Nesterov); its weight decay is the
    classic L2 term added to the gradient, not decoupled."""
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=False,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


def check_optimizer_runs(cfg: OptimConfig, device: torch.device) -> None:
    """A ConfigError when `cfg`'s optimizer cannot run on `device` (adamw8bit: CUDA and
    bitsandbytes); `truthgpt train` asks before any data or model is built."""
    if cfg.name != "adamw8bit":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"optim.name: 'adamw8bit' runs on a CUDA GPU only (this run is on {device.type}); "
            "use optim.name: adamw here"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "optim.name: 'adamw8bit' needs bitsandbytes (pip install bitsandbytes), or use "
            "optim.name: adamw"
        ) from None


@OPTIMIZERS.register("adamw8bit")
def build_adamw8bit(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2022):
    a quarter of AdamW's optimizer memory. Needs bitsandbytes and a CUDA GPU."""
    check_optimizer_runs(cfg, device)
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )


def output_head_ids(model: nn.Module) -> set[int]:
    """Ids of the output head's weights: `get_output_embeddings()` (transformers, peft) and
    every module named `lm_head` (our Decoder). Tied to the embedding, it is the same tensor."""
    heads = [module for name, module in model.named_modules() if name.split(".")[-1] == "lm_head"]
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            heads.append(get_output())
        except (AttributeError, NotImplementedError):
            pass  # a transformers model without a head
    return {id(p) for head in heads if isinstance(head, nn.Module) for p in head.parameters()}


def split_for_muon(model: nn.Module, weight_decay: float) -> tuple[list[Tensor], list[dict]]:
    """(hidden matrices for Muon, AdamW groups for the rest), over trainable parameters.

    Muon orthogonalises the update of a matrix that maps one hidden space to another (Jordan
    et al. 2024, "Muon: An optimizer for hidden layers in neural networks"); an embedding is a
    lookup table and the head maps into the vocabulary, so both stay with AdamW, as do norms
    and biases (modded-nanogpt's split). A head tied to the embedding is one AdamW parameter.
    The AdamW groups decay as `param_groups` says (an untied head is decayed).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    not_hidden = embedding_ids | output_head_ids(model)
    groups = param_groups(model, weight_decay)
    decay = groups[0]["params"]
    hidden = [p for p in decay if p.ndim == 2 and id(p) not in not_hidden]
    hidden_ids = {id(p) for p in hidden}
    groups[0]["params"] = [p for p in decay if id(p) not in hidden_ids]
    adamw_groups = [group for group in groups if group["params"]]
    return hidden, adamw_groups


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` and `torch.optim.AdamW` stepped as one optimizer.

    `param_groups` holds the two optimizers' own group dicts (AdamW's first, so the logged lr
    is `optim.lr`'s, as with adamw): the LR schedule, the grad scaler and a rollback that set
    `group["lr"]` reach both. `state` is a live view of both states. `state_dict()` is the
    standard format over the groups in that order (so torch.distributed.checkpoint reads and
    writes it too); `load_state_dict` hands each optimizer its own groups.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([*adamw.param_groups, *muon.param_groups], defaults={})
        self._share_children()

    def _share_children(self) -> None:
        # load_state_dict gives each child new group dicts and a new state: point at them again.
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]
        self.state = _JointState(self.adamw, self.muon)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        adamw_count = len(self.adamw.param_groups)
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the saved optimizer state (optim.name muon) has {len(groups)} parameter "
                f"groups, this one {len(self.param_groups)}"
            )
        for child, saved_groups in (
            (self.adamw, groups[:adamw_count]),
            (self.muon, groups[adamw_count:]),
        ):
            ids = {i for group in saved_groups for i in group["params"]}
            state = {i: v for i, v in state_dict["state"].items() if i in ids}
            child.load_state_dict({"state": state, "param_groups": saved_groups})
        self._share_children()


class _JointState(Mapping):
    """The per-parameter states of several optimizers as one mapping. Each lookup goes to the
    optimizer that owns the parameter (a ChainMap would ask the first one, whose defaultdict
    would make an empty entry for every parameter it does not own)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.owner = {
            id(p): optimizer
            for optimizer in optimizers
            for group in optimizer.param_groups
            for p in group["params"]
        }
        self.optimizers = optimizers

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        optimizer = self.owner.get(id(param))
        if optimizer is None:
            raise KeyError(param)
        return optimizer.state[param]

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


@OPTIMIZERS.register("muon")
def build_muon(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch.optim.Muon (`muon_lr`, `muon_momentum`, `muon_weight_decay`, Nesterov) on the
    hidden matrices, AdamW as `adamw` builds it (`lr`, `betas`, `eps`, `weight_decay`) on the
    embeddings, the head, norms and biases; see `split_for_muon`."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(
            f"optim.name: 'muon' needs torch.optim.Muon (PyTorch >= 2.9); this is PyTorch "
            f"{torch.__version__}. Upgrade PyTorch or pick adamw, lion, adafactor or sgd."
        )
    if hasattr(model, "peft_config"):
        # Muon orthogonalises the update of a whole matrix; with LoRA the update is the product
        # of two low-rank factors, and orthogonalising each factor's step is not that.
        raise ConfigError(
            "optim.name: 'muon' does not train LoRA adapters (model.lora.enabled: true): Muon "
            "orthogonalises updates of whole hidden matrices, not of low-rank factors. Use "
            "optim.name: adamw with LoRA, or turn LoRA off to train every weight with Muon."
        )
    hidden, adamw_groups = split_for_muon(model, cfg.weight_decay)
    if not hidden or not adamw_groups:
        what = "no hidden weight matrix" if not hidden else "no embedding, head, norm or bias"
        raise ConfigError(
            f"optim.name: 'muon': the model's trainable parameters hold {what}, so Muon or "
            "AdamW would have nothing to train; use optim.name: adamw"
        )
    muon = torch.optim.Muon(
        hidden,
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        weight_decay=cfg.muon_weight_decay,
        nesterov=True,
    )
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    adamw = torch.optim.AdamW(
        adamw_groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )
    return MuonWithAdamW(muon, adamw)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    return OPTIMIZERS.get_builder(cfg.name, "optim.name")(model, cfg, device)


class Lion(torch.optim.Optimizer):
    """Lion, "EvoLved Sign Momentum" (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2):

        update = sign(beta1 * m + (1 - beta1) * g)
        p      = p - lr * (update + weight_decay * p)
        m      = beta2 * m + (1 - beta2) * g

    One state tensor per parameter (Adam keeps two). The update interpolates with beta1 but the
    momentum is tracked with the slower beta2. foreach (default) uses multi-tensor kernels.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"Lion: lr must be positive, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Lion: betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momenta = [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                params.append(param)
                grads.append(param.grad)
                momenta.append(state["exp_avg"])
            if params:
                update = _lion_foreach if self.foreach else _lion_single_tensor
                beta1, beta2 = group["betas"]
                update(params, grads, momenta, group["lr"], beta1, beta2, group["weight_decay"])
        return loss


def _lion_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    updates = torch._foreach_lerp(momenta, grads, 1 - beta1)  # beta1 * m + (1 - beta1) * g
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_lerp_(momenta, grads, 1 - beta2)


def _lion_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    for param, grad, momentum in zip(params, grads, momenta, strict=True):
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
        param.add_(momentum.lerp(grad, 1 - beta1).sign_(), alpha=-lr)
        momentum.lerp_(grad, 1 - beta2)


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

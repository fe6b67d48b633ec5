"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
through peft: wrap a model, count what trains, and pull the plain base weights back out.

A wrapped model is a `peft.PeftModel`; its base keeps its own weights frozen and every targeted
Linear gains `lora_A` [r, in] and `lora_B` [out, r], so the layer computes W x + (alpha/r) B A x.
On disk (models/build.py) a LoRA model is the base model folder plus `adapter/` in peft format.

peft is imported only inside these functions: it costs seconds at import time, and most runs
(generation, full fine-tuning) never need it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from truthgpt.config import LoraConfig
from truthgpt.errors import CheckpointError, ConfigError, closest
from truthgpt.models.decoder import Decoder
from truthgpt.quiet import no_peft_checkpointing_notices

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_DIR = "adapter"  # the adapter's subfolder inside a model folder
ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft wrapper (checked without importing peft: if nothing imported
    it, nothing can have built one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def native_target_modules(model: Decoder) -> list[str]:
    """Every Linear inside the blocks, by its name within a block: attention qkv and out, MLP
    gate (llama), up and down. The output head is left out, as peft's "all-linear" does."""
    names: list[str] = []
    for name, module in model.layers[0].named_modules():
        if isinstance(module, nn.Linear):
            names.append(name)
    return names


def check_native_targets(arch: str, cfg: LoraConfig) -> None:
    """`model.lora.target_modules` of a native arch checked against a one-layer Decoder of that
    family on the meta device (no memory, no weights): training asks before it reads the data.
    The linear layers of a block depend only on the family (llama's gate, GPT-2's none)."""
    from truthgpt.models.decoder import DecoderConfig

    if not (cfg.enabled and cfg.target_modules) or arch not in ("llama", "gpt2"):
        return
    shape = DecoderConfig(family=arch, vocab_size=8, hidden_size=8, num_layers=1, num_heads=1)
    with torch.device("meta"):
        model = Decoder(shape)
    available = native_target_modules(model)
    check_targets(model, list(cfg.target_modules), available, f"model.arch {arch!r}", True)


def apply_lora(model: nn.Module, cfg: LoraConfig, arch: str) -> PeftModel:
    """Wrap `model` with fresh adapters; only the adapter weights are left trainable.

    Default targets: the native decoder's attention and MLP projections by our names; for
    `transformers` models peft's "all-linear" (every Linear / Conv1D except the output head).
    """
    import peft

    native = isinstance(model, Decoder)
    targets: list[str] | str
    if cfg.target_modules:
        targets = list(cfg.target_modules)
    elif native:
        targets = native_target_modules(model)
    else:
        targets = "all-linear"
    if isinstance(targets, list):
        available = native_target_modules(model) if native else _linear_names(model)
        check_targets(model, targets, available, f"model.arch {arch!r}", native)
    lora_config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        # The task wrapper adapts generate() and HF's forward signature; our Decoder has its own.
        task_type=None if native else "CAUSAL_LM",
        # GPT-2's Conv1D stores weights transposed: peft sets this itself, with a warning.
        fan_in_fan_out=_has_conv1d(model),
    )
    try:
        with no_peft_checkpointing_notices():
            wrapped = peft.get_peft_model(model, lora_config)
    except ValueError as exc:
        available = native_target_modules(model) if native else _linear_names(model)
        raise ConfigError(
            f"model.lora.target_modules: {exc} (model.arch {arch!r}; its linear layers: "
            f"{', '.join(available)})"
        ) from None
    make_input_embeddings_require_grad(wrapped)
    return wrapped


# transformers' projection names -> the native decoder's, for a config written for the HF model
# (peft's usual q_proj/v_proj). Our q, k and v are one fused Linear, GPT-2's c_proj two layers.
_NATIVE_NAMES = {
    "q_proj": "attn.qkv",
    "k_proj": "attn.qkv",
    "v_proj": "attn.qkv",
    "o_proj": "attn.out",
    "gate_proj": "mlp.gate",
    "up_proj": "mlp.up",
    "down_proj": "mlp.down",
    "c_attn": "attn.qkv",
    "c_fc": "mlp.up",
    "c_proj": "attn.out and mlp.down",
}


def check_targets(
    model: nn.Module, targets: list[str], available: list[str], owner: str, native: bool = False
) -> None:
    """ConfigError for each target that names no module of `model` (`owner` says which, in the
    message; `available`: the names to suggest). peft refuses only a list of which none
    matches: one typo beside a good name ([q_proj, v_prj]) silently adapts less."""
    names = [name for name, _ in model.named_modules()]
    # peft's rule for a list: the module's full name is the target or ends with "." + target.
    unmatched = [
        target
        for target in targets
        if not any(name == target or name.endswith("." + target) for name in names)
    ]
    if not unmatched:
        return
    hints = []
    for target in unmatched:
        ours = _NATIVE_NAMES.get(target, "")
        if native and ours.split(" and ")[0] in available:  # gpt2 has no gate for gate_proj
            hints.append(f"{target!r} is transformers' name; ours is {ours}")
        elif hint := closest(target, available):
            hints.append(f"{target!r}: did you mean {hint!r}?")
    fused = ""
    if native and any(_NATIVE_NAMES.get(target) == "attn.qkv" for target in unmatched):
        fused = (
            ". The native decoder's q, k and v are one Linear, attn.qkv (adapting it adapts all "
            "three); model.arch: hf adapts q_proj, k_proj, v_proj one by one"
        )
    raise ConfigError(
        f"model.lora.target_modules: {', '.join(map(repr, unmatched))} "
        f"{'names' if len(unmatched) == 1 else 'name'} no module of the model"
        f"{' (' + '; '.join(hints) + ')' if hints else ''}; {owner} has these "
        f"linear layers: {', '.join(available)}{fused}"
    )


def load_adapter(model: nn.Module, adapter_folder: str, trainable: bool) -> PeftModel:
    """Wrap `model` with the adapter saved in `adapter_folder` (peft format). trainable=True
    leaves the adapter weights trainable, in the order a fresh `apply_lora` gives them."""
    from peft import PeftModel

    with no_peft_checkpointing_notices():
        wrapped = PeftModel.from_pretrained(model, adapter_folder, is_trainable=trainable)
    if trainable:
        make_input_embeddings_require_grad(wrapped)
    return wrapped


def adapter_is_native(adapter_folder: Path) -> bool:
    """Whether a saved adapter was made on our Decoder (our module names) rather than on a
    transformers model: peft records the wrapped class's module in `auto_mapping`."""
    try:
        config = json.loads((Path(adapter_folder) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{adapter_folder}: unreadable {ADAPTER_CONFIG}: {exc}") from None
    library = (config.get("auto_mapping") or {}).get("parent_library") or ""
    return library.startswith("truthgpt.")


def make_input_embeddings_require_grad(model: PeftModel) -> None:
    """transformers models: mark the embedding output as requiring grad. Reentrant gradient
    checkpointing (transformers 4.x's default) only backpropagates through a recomputed block
    when one of its inputs requires grad, which a frozen embedding's output does not, so the
    adapters would get no gradient. Done whether checkpointing is on yet or not, so the order
    does not matter. Our Decoder checkpoints non-reentrantly and needs nothing."""
    base = model.get_base_model()
    if not isinstance(base, Decoder) and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def base_state_dict(model: PeftModel) -> dict[str, Tensor]:
    """The base model's weights under its own names, adapters left out (tensors shared, no copy):
    peft renames a wrapped layer's weight `x.weight` to `x.base_layer.weight`."""
    state: dict[str, Tensor] = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def plain_decoder(model: PeftModel) -> Decoder:
    """A Decoder without adapter layers that shares the wrapped base decoder's weight tensors."""
    base = model.get_base_model()
    if not isinstance(base, Decoder):
        raise TypeError(f"expected a wrapped Decoder, got {type(base).__name__}")
    with torch.device("meta"):  # no memory and no init for weights about to be replaced
        plain = Decoder(base.config)
    plain.load_state_dict(base_state_dict(model), strict=True, assign=True)
    if base.config.tie_embeddings:  # assign=True made two Parameters; tie them back into one
        plain.lm_head.weight = plain.embed.weight
    return plain


def _has_conv1d(model: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def _linear_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }
    return sorted(names)

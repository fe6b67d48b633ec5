"""Speed mode: SDPA attention, channels_last, fused QKV projections and torch.compile.

Two halves, because the memory level sits between them: `prepare_for_speed` changes weights and
layouts, which must happen before offload hooks take copies of the weights; `compile_denoiser`
compiles what the memory level left in place and warms it up. Each step that cannot run here
logs one line and is skipped; none of them changes the images beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from truthgpt.diffusion.pipeline import denoiser_of

_CONV_COMPONENTS = ("unet", "vae")  # convolution-heavy: channels_last suits tensor cores


def prepare_for_speed(pipe, log: Callable[[str], None] = print) -> None:
    """SDPA attention, channels_last UNet/VAE, fused QKV. Call before the memory level."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    denoiser_name, denoiser = denoiser_of(pipe)
    models = {name: getattr(pipe, name, None) for name in (denoiser_name, "vae")}
    models = {name: m for name, m in models.items() if isinstance(m, torch.nn.Module)}

    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        log("speed: this torch has no scaled_dot_product_attention; attention left as is")
    else:
        switched = []
        for name, model in models.items():
            processors = getattr(model, "attn_processors", None) or {}
            # Only the stock processors are replaced: custom ones (IP-Adapter, a transformer's
            # own joint attention) already call SDPA or do more than attention.
            stock = all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in processors.values())
            if processors and stock:
                model.set_attn_processor(AttnProcessor2_0())
                switched.append(name)
        if switched:
            log(f"speed: SDPA attention in {', '.join(switched)}")

    for name in _CONV_COMPONENTS:
        if name in models:
            models[name].to(memory_format=torch.channels_last)

    if getattr(denoiser, "peft_config", None):
        # Fusing concatenates the base q/k/v weights; the LoRA layers wrapped around them
        # would silently drop out of the fused projection.
        log("speed: fused QKV skipped, LoRA adapters are loaded")
        return
    fused = []
    for name, model in models.items():
        if not hasattr(model, "fuse_qkv_projections"):
            continue
        try:
            model.fuse_qkv_projections()
            fused.append(name)
        except ValueError as exc:  # added-KV attention (e.g. IP-Adapter) cannot be fused
            log(f"speed: fused QKV skipped for {name}: {exc}")
    if fused:
        log(f"speed: fused QKV projections in {', '.join(fused)}")


def compile_denoiser(
    pipe,
    device: torch.device | str,
    warm_up: Callable[[], object] | None = None,
    log: Callable[[str], None] = print,
    scope: str = "auto",
    mode: str | None = None,
) -> bool:
    """torch.compile the denoiser and run `warm_up` so that the first real call does not pay for
    compilation. True if it runs compiled.

    scope: "regional" compiles the model's `_repeated_blocks` (diffusers' compile_repeated_blocks),
    "whole" the whole network, "auto" regional only where those blocks hold nearly all weights.
    mode: torch.compile's mode (None: default; "reduce-overhead" adds CUDA graphs).
    """
    device = torch.device(device)
    _, denoiser = denoiser_of(pipe)
    if device.type != "cuda":
        log("speed: torch.compile skipped: no CUDA GPU (compiling costs more than it saves here)")
        return False
    if _has_weight_hooks(denoiser):
        log(
            "speed: torch.compile skipped: the memory level moves or casts the denoiser's weights "
            "layer by layer, which a compiled graph would not follow; use memory none or balanced"
        )
        return False
    if scope == "auto":
        scope = "regional" if _repeated_share(denoiser) >= _REGIONAL_MIN_SHARE else "whole"
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its conv algorithms
    # Static shapes: the image size is fixed within a run, and static kernels are the faster ones.
    options = dict(dynamic=False, mode=mode)
    try:
        if scope == "regional":
            denoiser.compile_repeated_blocks(fullgraph=True, **options)
            how = f"regional ({', '.join(denoiser._repeated_blocks)} blocks)"
        else:
            denoiser.compile(**options)
            how = "whole network"
    except (RuntimeError, ValueError, AttributeError, ImportError) as exc:
        log(f"speed: torch.compile unavailable ({exc}); running eager")
        return False
    log(f"speed: torch.compile of {type(denoiser).__name__}, {how}, mode {mode or 'default'}")
    if warm_up is None:
        return True
    try:
        warm_up()  # compilation happens here, on the first call
    except Exception as exc:  # compile failures come in many types; eager is the cure for all
        for module in denoiser.modules():
            module._compiled_call_impl = None  # undo nn.Module.compile
        log(f"speed: torch.compile failed ({type(exc).__name__}: {exc}); running eager")
        return False
    return True


# Regional compilation leaves everything outside the repeated blocks eager. In a transformer
# denoiser the blocks are ~all the work; in a UNet the ResNet blocks between them are much of it,
# and compiling only the transformer blocks gains little there.
_REGIONAL_MIN_SHARE = 0.9


def _repeated_share(denoiser: torch.nn.Module) -> float:
    names = getattr(denoiser, "_repeated_blocks", None) or []
    if not names or not hasattr(denoiser, "compile_repeated_blocks"):
        return 0.0
    total = sum(p.numel() for p in denoiser.parameters())
    inside = sum(
        p.numel() for m in denoiser.modules() if type(m).__name__ in names for p in m.parameters()
    )
    return inside / max(total, 1)


def _has_weight_hooks(module: torch.nn.Module) -> bool:
    """True when diffusers' group offloading or layerwise casting hooks sit on `module`."""
    from diffusers.hooks import HookRegistry

    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and registry.hooks:
            return True
    return False

"""Memory levels and the monitor that measures them.

A level is a recipe of diffusers' own switches; ours is only the choice. From most memory and
fastest to least memory:

| level | denoiser (UNet/transformer) | text encoders etc. | VAE (always on the GPU) |
| --- | --- | --- | --- |
| none | on the GPU | on the GPU | whole-image decode |
| balanced | on the GPU | offloaded, leaf groups | sliced, tiles <= 512 px |
| aggressive | FP8, offloaded, block groups | offloaded, leaf groups | sliced, tiles <= 512 px |
| ultra | FP8, offloaded, leaf groups, FF chunks | offloaded, leaf groups | sliced, tiles <= 256 |

"Offloaded" is diffusers' group offloading from pinned host memory with a CUDA stream that
prefetches the next group while the current one computes.

Why these: the denoiser runs steps x (1 or 2) times per image, the encoders once, so `balanced`
keeps the denoiser resident and moves only what runs once (stock `enable_model_cpu_offload` also
moves the denoiser in and out every call, about 2x the latency). FP8 (e4m3) storage halves what
is kept and moved; each layer is upcast to the pipeline dtype just before it runs
(`enable_layerwise_casting`; norms stay in full precision). The VAE stays on the GPU: it is
small, and the SDXL pipeline's fp32 upcast of a group-offloaded VAE would meet fp16 weights.
Attention slicing is never used: SDPA already computes attention without the quadratic score
matrix.

On a machine without CUDA the offload switches are skipped (one log line); FP8 storage, VAE
slicing/tiling and chunking still apply (they save host memory there).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from truthgpt.diffusion.pipeline import component_bytes, denoiser_of
from truthgpt.errors import ConfigError

GIB = 1024**3
LEVELS = ("none", "balanced", "aggressive", "ultra")

# Untiled VAE decode working memory per output pixel in fp16: SD-1.5 at 512x512 peaks 0.64 GiB
# above its 2.0 GiB of weights on an H100 (2.6 KB/px); fp32 decode doubles it.
_DECODE_BYTES_PER_PIXEL = 2.6 * 1024
# Denoiser activations, cuBLAS/cuDNN workspaces and allocator slack on top of the weights.
_WORKSPACE_BYTES = 0.75 * GIB


@dataclass(frozen=True)
class Recipe:
    """The switches of one memory level."""

    encoders_offload: str | None  # None: on the GPU; else a group-offload type
    denoiser_offload: str | None  # None | "block_level" | "leaf_level"
    denoiser_fp8: bool  # FP8 storage, compute in the pipeline dtype
    record_stream: bool  # faster stream offload that frees a little later (more memory)
    vae_slicing: bool  # decode a batch one image at a time
    vae_tile_px: int | None  # decode in tiles of at most this edge; None: whole image
    forward_chunking: bool  # feed-forward over one batch element at a time


RECIPES: dict[str, Recipe] = {
    "none": Recipe(None, None, False, False, False, None, False),
    "balanced": Recipe("leaf_level", None, False, True, True, 512, False),
    "aggressive": Recipe("leaf_level", "block_level", True, True, True, 512, False),
    # record_stream off: each offload waits for its layer, so no more than the current and the
    # prefetched layer are ever on the GPU.
    "ultra": Recipe("leaf_level", "leaf_level", True, False, True, 256, True),
}


def apply_memory_level(
    pipe, level: str, device: torch.device | str, log: Callable[[str], None] = print
) -> None:
    """Place `pipe` on `device` with the switches of `level` (none | balanced | aggressive | ultra).

    Call once, on a pipeline that is still on the CPU and has no other offload hooks.
    """
    if level not in RECIPES:
        raise ConfigError(f"diffusion.memory: unknown level {level!r}; known: {', '.join(LEVELS)}")
    recipe, device = RECIPES[level], torch.device(device)
    denoiser_name, denoiser = denoiser_of(pipe)
    if recipe.denoiser_fp8:
        _store_in_fp8(denoiser, log)

    skipped = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        if name == denoiser_name:
            offload = recipe.denoiser_offload
        else:
            offload = None if name == "vae" else recipe.encoders_offload
        if offload and device.type == "cuda":
            _group_offload(module, device, offload, recipe.record_stream)
        else:
            if offload:
                skipped.append(name)
            module.to(device)
    if skipped:
        log(
            f"memory {level}: no CUDA device, so offloading of {', '.join(skipped)} is skipped "
            "(weights stay in host memory); the other switches apply"
        )

    vae = getattr(pipe, "vae", None)
    if vae is not None:
        _configure_vae(vae, recipe, log)
    if recipe.forward_chunking:
        _chunk_feed_forward(denoiser, log)


def _store_in_fp8(denoiser: torch.nn.Module, log: Callable[[str], None]) -> None:
    if not hasattr(denoiser, "enable_layerwise_casting") or not hasattr(torch, "float8_e4m3fn"):
        log(f"memory: FP8 storage unavailable for {type(denoiser).__name__}; kept as loaded")
        return
    # compute in the dtype the pipeline was loaded in; peft LoRA layers are skipped by default
    denoiser.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=denoiser.dtype
    )


def _group_offload(
    module: torch.nn.Module, device: torch.device, offload_type: str, record_stream: bool
) -> None:
    from diffusers.hooks import apply_group_offloading

    kwargs = dict(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        use_stream=True,
        record_stream=record_stream,
    )
    if offload_type == "block_level":
        kwargs["num_blocks_per_group"] = 1  # the only value diffusers allows with streams
        own = list(getattr(module, "_group_offload_block_modules", None) or [])
        kwargs["block_modules"] = own + [m for m in _block_modules(module) if m not in own] or None
    if hasattr(module, "enable_group_offload"):  # diffusers models: honours their block layout
        module.enable_group_offload(**kwargs)
    else:  # transformers text encoders and other plain modules
        apply_group_offloading(module, **kwargs)


_LISTS = (torch.nn.ModuleList, torch.nn.Sequential)


def _block_modules(module: torch.nn.Module) -> list[str]:
    """Direct children that are not block lists themselves but hold lists and >= 5% of the
    weights (a UNet's mid block). Block-level offload walks into them; left alone they would
    ride in the group of leftovers, which diffusers moves without the stream, synchronously
    from pageable memory and back again, on every step."""
    total = sum(p.numel() for p in module.parameters())
    return [
        name
        for name, child in module.named_children()
        if not isinstance(child, _LISTS)
        and any(isinstance(c, _LISTS) for c in child.children())
        and sum(p.numel() for p in child.parameters()) >= 0.05 * total
    ]


def _configure_vae(vae: torch.nn.Module, recipe: Recipe, log: Callable[[str], None]) -> None:
    try:
        if recipe.vae_slicing:
            vae.enable_slicing()
        if recipe.vae_tile_px:
            vae.enable_tiling()
    except (AttributeError, NotImplementedError):
        log(f"memory: {type(vae).__name__} has no slicing/tiling; decoding whole images")
        return
    default_px = getattr(vae, "tile_sample_min_size", None)
    latent_px = getattr(vae, "tile_latent_min_size", None)
    if recipe.vae_tile_px and isinstance(default_px, int) and isinstance(latent_px, int):
        # The default tile is the model's training size (1024 px for SDXL), which at that size
        # means no tiling at all; a smaller tile bounds the decode's working memory.
        scale = default_px // latent_px
        tile_px = min(default_px, recipe.vae_tile_px)
        vae.tile_sample_min_size = tile_px
        vae.tile_latent_min_size = tile_px // scale


def _chunk_feed_forward(denoiser: torch.nn.Module, log: Callable[[str], None]) -> None:
    # Chunking over the batch (dim 0, chunks of 1) halves the feed-forward activations under
    # classifier-free guidance at almost no cost; chunking over tokens would be far slower.
    if hasattr(denoiser, "enable_forward_chunking"):
        denoiser.enable_forward_chunking(chunk_size=1, dim=0)
        return
    blocks = [m for m in denoiser.modules() if hasattr(m, "set_chunk_feed_forward")]
    for block in blocks:
        block.set_chunk_feed_forward(1, 0)
    if not blocks:
        log(f"memory: {type(denoiser).__name__} has no feed-forward chunking; skipped")


# ---------------------------------------------------------------------------------------------
# auto


def memory_needs(pipe, pixels: int | None = None) -> dict[str, float]:
    """Estimated peak GPU bytes of `none`, `balanced` and `aggressive` for this pipeline, from
    the measured size of its components; `pixels` is width x height (default: the model's)."""
    sizes = component_bytes(pipe)
    denoiser_name, denoiser = denoiser_of(pipe)
    pixels = pixels or _default_pixels(pipe)
    decode_scale = 2 if _vae_decodes_in_fp32(pipe) else 1
    whole_decode = _DECODE_BYTES_PER_PIXEL * pixels * decode_scale
    tiled_decode = _DECODE_BYTES_PER_PIXEL * min(pixels, 512 * 512) * decode_scale
    resident_vae = sizes.get("vae", 0) + tiled_decode + _WORKSPACE_BYTES
    return {
        "none": sum(sizes.values()) + whole_decode + _WORKSPACE_BYTES,
        "balanced": sizes[denoiser_name] + resident_vae,
        "aggressive": _fp8_block_offload_bytes(denoiser) + resident_vae,
    }


def choose_level(
    pipe,
    device: torch.device | str,
    pixels: int | None = None,
    free_bytes: int | None = None,
) -> tuple[str, str]:
    """(level, a sentence saying why) from free GPU memory and the pipeline's measured size.

    pixels: width x height to draw (default: the model's size). free_bytes: plan for this much
    free GPU memory instead of asking the device (torch.cuda.mem_get_info).
    """
    device = torch.device(device)
    if free_bytes is None:
        if device.type != "cuda":
            return "none", (
                "auto chose 'none': there is no CUDA GPU, so the pipeline runs in host memory, "
                "where offloading would save nothing"
            )
        free_bytes, _ = torch.cuda.mem_get_info(device)
    needs = memory_needs(pipe, pixels)
    sizes = component_bytes(pipe)
    denoiser_bytes = sizes[denoiser_of(pipe)[0]]

    def gib(n: float) -> str:
        return f"{n / GIB:.1f} GiB"

    head = (
        f"{gib(free_bytes)} of GPU memory is free; the weights take {gib(sum(sizes.values()))} "
        f"(denoiser {gib(denoiser_bytes)})"
    )
    if needs["none"] <= free_bytes:
        return "none", (
            f"auto chose 'none': {head}, and everything on the GPU needs about "
            f"{gib(needs['none'])}, so nothing is offloaded"
        )
    if needs["balanced"] <= free_bytes:
        return "balanced", (
            f"auto chose 'balanced': {head}; all on the GPU would need about "
            f"{gib(needs['none'])}, so the denoiser stays on the GPU and the text encoders are "
            f"streamed in when used (about {gib(needs['balanced'])})"
        )
    if needs["aggressive"] <= free_bytes:
        return "aggressive", (
            f"auto chose 'aggressive': {head}; keeping the denoiser on the GPU would need about "
            f"{gib(needs['balanced'])}, so it is stored in FP8 and streamed in block by block "
            f"(about {gib(needs['aggressive'])})"
        )
    return "ultra", (
        f"auto chose 'ultra': {head}; even block-by-block FP8 offload would need about "
        f"{gib(needs['aggressive'])}, so every layer is streamed in on its own"
    )


def _default_pixels(pipe) -> int:
    denoiser = denoiser_of(pipe)[1]
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, int):
        return (sample * scale) ** 2
    return 1024 * 1024


def _vae_decodes_in_fp32(pipe) -> bool:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return False
    dtype = next(vae.parameters()).dtype
    force_upcast = getattr(getattr(vae, "config", None), "force_upcast", False)
    return dtype == torch.float32 or (dtype == torch.float16 and bool(force_upcast))


def _fp8_block_offload_bytes(denoiser: torch.nn.Module) -> int:
    """GPU bytes of block-level offload in FP8: the parts outside any block stay for the whole
    forward, plus the running block and the one prefetched after it (the two largest, at worst)."""
    parents = [denoiser] + [getattr(denoiser, name) for name in _block_modules(denoiser)]
    blocks = [
        sum(p.numel() for p in block.parameters())
        for parent in parents
        for child in parent.children()
        if isinstance(child, _LISTS)
        for block in child
    ]
    rest = sum(p.numel() for p in denoiser.parameters()) - sum(blocks)
    return rest + sum(sorted(blocks)[-2:])  # one byte per parameter in FP8


# ---------------------------------------------------------------------------------------------
# Monitor


@dataclass(frozen=True)
class MemoryStats:
    """What one monitored block cost. GPU numbers are 0.0 when the device is not CUDA."""

    device: str
    peak_allocated_gib: float
    peak_reserved_gib: float
    host_rss_gib: float  # resident host memory at the end of the block
    latency_s: float


class MemoryMonitor:
    """Measures peak GPU memory, host RSS and wall time of a `with` block into `.stats`.

    Always frees on exit (gc + the CUDA cache), also when the block raised; the numbers are
    recorded in that case too.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.stats: MemoryStats | None = None
        self._start = 0.0

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemoryMonitor:
        gc.collect()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> bool:
        try:
            if self._cuda:
                torch.cuda.synchronize(self.device)  # the block's kernels belong to its time
            latency = time.perf_counter() - self._start
            allocated = torch.cuda.max_memory_allocated(self.device) if self._cuda else 0
            reserved = torch.cuda.max_memory_reserved(self.device) if self._cuda else 0
            self.stats = MemoryStats(
                device=str(self.device),
                peak_allocated_gib=allocated / GIB,
                peak_reserved_gib=reserved / GIB,
                host_rss_gib=_host_rss_bytes() / GIB,
                latency_s=latency,
            )
        finally:
            gc.collect()
            if self._cuda:
                torch.cuda.empty_cache()
        return False  # never swallow the block's exception


def _host_rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource
        import sys

        # ru_maxrss is the peak of the whole process: KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

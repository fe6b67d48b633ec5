"""Text to image: load, pick scheduler/LoRAs/memory/speed, draw, write PNGs with their settings.

The order matters: LoRAs change the denoiser, speed mode changes weights and layouts, and both
must be done before the memory level's offload hooks copy the weights; compilation comes last,
on what the memory level left in place.
"""

from __future__ import annotations

import inspect
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from truthgpt.atomic import atomic_write_file
from truthgpt.config import DiffusionConfig
from truthgpt.diffusion.memory import (
    LEVELS,
    MemoryMonitor,
    MemoryStats,
    apply_memory_level,
    choose_level,
)
from truthgpt.diffusion.pipeline import (
    denoiser_of,
    load_pipeline,
    lora_folder,
    lora_load_problem,
    resolve_dtype,
    run_sampling_defaults,
)
from truthgpt.diffusion.schedulers import set_scheduler
from truthgpt.diffusion.speed import compile_denoiser, prepare_for_speed
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.guard import check_output, is_run_folder, mark
from truthgpt.quiet import no_lora_load_notices, no_numpy_copy_notices


@dataclass
class ImageResult:
    """The images of one call, where they were written, and what the call cost."""

    images: list[Image.Image]
    paths: list[Path]
    grid_path: Path | None
    metadata: dict[str, str]  # as written into each PNG (seed is per image)
    stats: MemoryStats
    memory_level: str
    memory_reason: str  # why auto chose the level; empty when it was given


def parse_lora(spec: str) -> tuple[str, float]:
    """`DIR:0.8` -> ("DIR", 0.8); `DIR` -> ("DIR", 1.0). A drive letter (`C:\\x`) is no weight."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


@no_numpy_copy_notices()  # diffusers' schedulers, at the swap and at every call
def generate_images(
    cfg: DiffusionConfig,
    pipe=None,
    log: Callable[[str], None] = print,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ImageResult:
    """Draw `cfg.batch` images for `cfg.prompt` and write them (and a grid) to `cfg.output_dir`.

    pipe: an already loaded pipeline still on the CPU (cfg.model is then only recorded).
    device: where to run; default the first CUDA GPU, else the CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Before the slow load: PNGs never go into (or around) a run, a checkpoint or a source.
    sources = [cfg.model or "", *(parse_lora(spec)[0] for spec in cfg.loras)]
    out_dir = check_output(
        cfg.output_dir, "image", sources=[s for s in sources if s and Path(s).exists()]
    )
    if pipe is None:
        if not cfg.model:
            raise ConfigError("diffusion.model: give a local diffusers pipeline folder")
        # The dtype note after the load: an error about the model comes first, alone.
        notes: list[str] = []
        pipe = load_pipeline(
            cfg.model, resolve_dtype(cfg.dtype, device, notes.append), cfg.allow_download
        )
        for note in notes:
            log(note)
    pipe.set_progress_bar_config(disable=not progress)
    width, height = _checked_size(pipe, cfg)
    dtype = str(denoiser_of(pipe)[1].dtype).removeprefix("torch.")  # before FP8 storage

    if cfg.scheduler:
        set_scheduler(pipe, cfg.scheduler)
    if cfg.loras:
        _load_loras(pipe, cfg.loras, _own_adapter(cfg.model))
    if cfg.speed:
        prepare_for_speed(pipe, log)

    level, reason = cfg.memory, ""
    if level == "auto":
        pixels = width * height if width and height else None
        level, reason = choose_level(pipe, device, pixels)
        log(reason)
    apply_memory_level(pipe, level, device, log)

    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    # A run folder's own sampling settings stand in for the defaults the user did not set.
    run_defaults = run_sampling_defaults(cfg.model) if cfg.model else {}
    chosen = {key: getattr(cfg, key) for key in ("guidance", "steps")}
    chosen |= {k: v for k, v in run_defaults.items() if k not in cfg.model_fields_set}
    call = dict(
        prompt=cfg.prompt,
        negative_prompt=cfg.negative_prompt,
        num_inference_steps=chosen["steps"],
        guidance_scale=chosen["guidance"],
        width=width,
        height=height,
        num_images_per_prompt=cfg.batch,
    )
    if "clean_caption" in inspect.signature(pipe.__call__).parameters:
        # IF-layout pipelines (pixel-space runs of task image-generation) were trained on
        # prompts lower-cased and stripped, which is IF's behaviour without its caption cleaner.
        call["clean_caption"] = False
    if cfg.speed:
        # Same shapes as the real call, so the compiled graphs are reused; two steps suffice.
        warm_up = dict(call, num_inference_steps=2, output_type="latent")
        compile_denoiser(pipe, device, warm_up=lambda: pipe(**warm_up), log=log)

    # One CPU generator per image, seeded seed+i: image i is reproducible on its own, and CPU
    # noise is the same on every machine, so a seed draws the same picture on CPU and GPU.
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(cfg.batch)]
    with MemoryMonitor(device) as monitor:
        try:
            images = pipe(**call, generator=generators).images
        except RuntimeError as exc:  # torch.OutOfMemoryError is one too
            if not _out_of_memory(exc):
                raise
            raise ConfigError(_out_of_memory_message(exc, cfg, device, level)) from None
    stats = monitor.stats
    assert stats is not None  # set by MemoryMonitor.__exit__

    metadata = {
        "prompt": cfg.prompt,
        "negative_prompt": cfg.negative_prompt or "",
        "steps": str(chosen["steps"]),
        "guidance": f"{chosen['guidance']:g}",
        "width": str(images[0].width),
        "height": str(images[0].height),
        "seed": str(seed),
        "scheduler": cfg.scheduler or type(pipe.scheduler).__name__,
        "memory": level,
        # A CPU has no allocator peak to report (it would read 0): the process's RSS instead.
        **(
            {"peak_gib": f"{stats.peak_allocated_gib:.3f}"}
            if device.type == "cuda"
            else {"host_rss_gib": f"{stats.host_rss_gib:.3f}"}
        ),
        "latency_s": f"{stats.latency_s:.3f}",
        "device": stats.device,
        "model": str(cfg.model or ""),
        "dtype": dtype,
        "loras": ", ".join(cfg.loras),
        "speed": str(cfg.speed).lower(),
        "batch": str(cfg.batch),
    }
    paths, grid_path = _write_pngs(images, metadata, seed, out_dir)
    peak = f", peak {stats.peak_allocated_gib:.2f} GiB allocated" if device.type == "cuda" else ""
    log(
        f"wrote {len(paths)} image(s) to {cfg.output_dir} in {stats.latency_s:.2f} s"
        f"{peak} (memory {level})"
    )
    return ImageResult(images, paths, grid_path, metadata, stats, level, reason)


# What torch says it could not get: "Tried to allocate 2.00 GiB" (CUDA), "you tried to allocate
# 160000000000 bytes" (the CPU allocator).
_TRIED = re.compile(r"[Tt]ried to allocate (\d+) bytes|[Tt]ried to allocate ([\d.]+ [KMGT]iB)")


def _out_of_memory(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _out_of_memory_message(
    exc: RuntimeError, cfg: DiffusionConfig, device: torch.device, level: str
) -> str:
    """One line instead of the allocator's traceback: what was drawn, what torch could not get,
    and what would need less."""
    size = f"{cfg.width}x{cfg.height}" if cfg.width and cfg.height else "the model's size"
    found = _TRIED.search(str(exc))
    tried = ""
    if found and found.group(1):
        count = int(found.group(1))
        unit, scale = ("TiB", 1024**4) if count >= 1024**4 else ("GiB", 1024**3)
        tried = f" (an allocation of {count / scale:.1f} {unit} failed)"
    elif found:
        tried = f" (an allocation of {found.group(2)} failed)"
    # On a GPU the next level keeps less there; on a CPU the levels change little.
    after = LEVELS[LEVELS.index(level) + 1 :] if device.type == "cuda" else ()
    lower = f", or a memory level that keeps less on the GPU (--memory {after[0]})" if after else ""
    return (
        f"diffusion: out of memory on {device.type} drawing {cfg.batch} image(s) at {size} "
        f"with memory level {level}{tried}; try a smaller --size or --batch{lower}"
    )


def _checked_size(pipe, cfg: DiffusionConfig) -> tuple[int | None, int | None]:
    if getattr(pipe, "vae", None) is None:  # pixel space (an IF layout): no autoencoder
        return cfg.width, cfg.height
    multiple = getattr(pipe, "vae_scale_factor", 8)
    for key, value in (("width", cfg.width), ("height", cfg.height)):
        if value is not None and value % multiple:
            raise ConfigError(
                f"diffusion.{key}: {value} is not a multiple of {multiple}, which this model's "
                f"autoencoder needs; try {max(multiple, round(value / multiple) * multiple)}"
            )
    return cfg.width, cfg.height


def _own_adapter(model: str | None) -> Path | None:
    """The adapter folder that loading `model` put on its pipeline: a LoRA run's; else None."""
    if not model or not is_run_folder(Path(model)):
        return None
    try:
        return lora_folder(Path(model)).resolve()
    except CheckpointError:  # a run of a whole pipeline
        return None


def _load_loras(pipe, specs: list[str], own: Path | None = None) -> None:
    """Put the `--lora DIR[:weight]` adapters on `pipe`, beside any it came with (a LoRA run's
    own, at full weight), which the given ones must not repeat."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ConfigError(f"diffusion.loras: {type(pipe).__name__} does not take LoRA adapters")
    # set_adapters turns off every adapter it is not given: name the pipeline's own too.
    names = list(pipe.get_active_adapters())
    weights = [1.0] * len(names)
    for i, spec in enumerate(specs):
        folder, weight = parse_lora(spec)
        if not Path(folder).exists():
            raise CheckpointError(f"diffusion.loras[{i}]: LoRA folder {folder!r} does not exist")
        name = f"lora{i}_" + re.sub(r"\W+", "_", Path(folder).name)
        try:
            folder = str(lora_folder(Path(folder)))  # a LoRA run: its checkpoint's adapter
        except CheckpointError as exc:
            raise CheckpointError(f"diffusion.loras[{i}]: {exc}") from None
        if own is not None and Path(folder).resolve() == own:
            raise ConfigError(
                f"diffusion.loras[{i}]: {spec!r} is the adapter of the run being drawn from, "
                "which is already on at weight 1; to draw it at another weight, draw from its "
                "base pipeline (model.init_from) with --lora RUN:WEIGHT"
            )
        try:
            with no_lora_load_notices():
                pipe.load_lora_weights(folder, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            problem = lora_load_problem(pipe, exc)
            raise CheckpointError(f"diffusion.loras[{i}]: {folder!r} {problem}") from exc
        names.append(name)
        weights.append(weight)
    pipe.set_adapters(names, adapter_weights=weights)


def _write_pngs(
    images: list[Image.Image], metadata: dict[str, str], seed: int, out_dir: Path
) -> tuple[list[Path], Path | None]:
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        mark(out_dir, "image")  # a folder of truthgpt's images, not the user's
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    paths = []
    for i, image in enumerate(images):
        path = _free_path(out_dir, f"{stem}-{i}")
        _write_png(image, path, dict(metadata, seed=str(seed + i)))
        paths.append(path)
    grid_path = None
    if len(images) > 1:
        grid_path = _free_path(out_dir, f"{stem}-grid")
        _write_png(_grid(images), grid_path, metadata)
    return paths, grid_path


def _write_png(image: Image.Image, path: Path, metadata: dict[str, str]) -> None:
    """Whole or not at all: a kill or a full disk mid-write leaves no truncated PNG."""
    info = _png_info(metadata)
    atomic_write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _png_info(metadata: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    return info


def _free_path(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        path, n = folder / f"{stem}_{n}.png", n + 1
    return path


def _grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    # Empty cells (a batch that does not fill the last row) stay black, the usual background.
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid

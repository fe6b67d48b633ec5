"""Load a diffusers pipeline: a local folder written by `save_pretrained`, a run folder of task
image-generation (its best checkpoint; a LoRA run's adapter on its base), or a hub id on request.

Nothing reaches the hub unless `allow_download` is set. The pipeline comes back on the CPU in the
asked dtype; placing it on a GPU is the memory level's job (`memory.apply_memory_level`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.guard import LORA_WEIGHTS, SHARDED_DIR, is_run_folder
from truthgpt.quiet import no_load_save_bars, no_lora_load_notices, no_numpy_copy_notices

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# owner/name, the shape of a hub repository id; anything else that is not a folder is a typo.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# What from_pretrained raises for a folder it cannot read: missing or broken weights, a
# model_index.json naming unknown classes, configs that do not fit the weights.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError)


def _hub_unreachable(exc: BaseException) -> str:
    """The first line of the network error behind a failed hub load, else "". diffusers
    reports a download that never reached the hub as a missing model_index.json; the cause
    it chains (a ConnectionError, or huggingface_hub's LocalEntryNotFoundError) says why."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError) or type(seen).__name__ == "LocalEntryNotFoundError":
            return (str(seen).strip().splitlines() or [type(seen).__name__])[0][:200]
        seen = seen.__cause__ or seen.__context__
    return ""


def resolve_dtype(
    name: str, device: torch.device, log: Callable[[str], None] = print
) -> torch.dtype:
    """The torch dtype for `auto | fp16 | bf16 | fp32`: auto is fp16 on a GPU, fp32 on a CPU; an
    explicit fp16 on a CPU becomes fp32 too (CPU half kernels are missing or slow), with one log
    line."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"diffusion.dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        log("diffusion: fp16 on a CPU is slow or unsupported; using fp32")
        return torch.float32
    return DTYPES[name]


def load_pipeline(
    model: str | Path, dtype: torch.dtype = torch.float16, allow_download: bool = False
) -> DiffusionPipeline:
    """A text-to-image pipeline from a local diffusers folder, a run folder, or a hub id if
    `allow_download`."""
    path = Path(model).expanduser()
    if path.exists() and is_run_folder(path):
        folder, base = run_pipeline(path)
        if base is None:
            return load_pipeline(folder, dtype)
        pipe = load_pipeline(base, dtype)
        try:
            with no_lora_load_notices():
                pipe.load_lora_weights(str(folder))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            problem = lora_load_problem(pipe, exc)
            raise CheckpointError(f"{folder}: its LoRA adapter {problem}") from exc
        return pipe
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
        if not local_only and _hub_unreachable(exc):
            raise CheckpointError(
                f"{source}: the Hugging Face hub could not be reached to fetch it "
                f"({_hub_unreachable(exc)}); download it where there is a network and give "
                "the local folder"
            ) from exc
        raise CheckpointError(f"{source}: could not load the diffusers pipeline: {exc}") from exc
    return pipe


# torch's line per weight of a state dict that does not fit the model.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def lora_load_problem(pipe: DiffusionPipeline, exc: BaseException) -> str:
    """What went wrong loading an adapter onto `pipe`, in one line that follows its folder's
    name. torch lists every weight whose shape does not fit (thousands of lines for a LoRA of
    SD 1.5 put on SDXL): the count and the first say it."""
    text = str(exc)
    mismatches = _SIZE_MISMATCH.findall(text)
    if not mismatches:
        return f"could not be loaded: {' '.join(text.split())}"
    name, theirs, ours = mismatches[0]
    return (
        f"does not fit this pipeline's {denoiser_of(pipe)[0]}: {len(mismatches)} weight(s) have "
        f"other shapes (e.g. {name}: {theirs} in the adapter, {ours} here); a LoRA loads onto "
        "the model it was trained for (or one of its family and size)"
    )


def run_pipeline(run: Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, None) for a run that saved whole pipelines; (adapter folder, base
    pipeline) for a LoRA run, the base being the `model.init_from` it was trained on."""
    from truthgpt.models import resolve_model_folder

    folder = resolve_model_folder(run)
    if (folder / "model_index.json").is_file():
        return folder, None
    if (folder / SHARDED_DIR).is_dir():
        raise CheckpointError(
            f"{run}: its checkpoint {folder.name}/ holds FSDP shards (training.parallel fsdp), "
            f"not a pipeline: write one with `truthgpt export {run} --out DIR`, then use DIR"
        )
    if not (folder / LORA_WEIGHTS).is_file():
        raise CheckpointError(
            f"{run} is a run folder, but its checkpoint {folder.name}/ holds neither a diffusers "
            "pipeline nor a LoRA adapter: it was not trained with task image-generation"
        )
    run_config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    base = (run_config.get("model") or {}).get("init_from")
    if not base or not Path(base).expanduser().is_dir():
        raise CheckpointError(
            f"{run} holds a LoRA adapter whose base pipeline (model.init_from: {base!r}) is "
            f"gone; load it on its base with --lora {folder}"
        )
    return folder, Path(base).expanduser()


def lora_folder(path: Path) -> Path:
    """The folder an adapter of `--lora` is read from: `path` itself, or for a LoRA run of task
    image-generation its checkpoint (best, else last), as `truthgpt image RUN` reads it."""
    if not is_run_folder(path):
        return path
    from truthgpt.models import resolve_model_folder

    folder = resolve_model_folder(path)
    if not (folder / LORA_WEIGHTS).is_file():
        raise CheckpointError(
            f"{path} is a run folder whose checkpoint {folder.name}/ holds no LoRA adapter "
            f"({LORA_WEIGHTS}); a LoRA is an adapter folder or a run trained with task "
            "image-generation and model.lora (a run that trained a whole pipeline is a model: "
            f"`truthgpt image {path}`)"
        )
    return folder


def run_sampling_defaults(model: str | Path) -> dict[str, float | int]:
    """The guidance and steps a run of task image-generation drew its validation samples with
    (`diffusion_training.samples`), when `model` is such a run folder; else nothing. A model
    trained from scratch may want other settings than Stable Diffusion's 7.5 (the digits
    model breaks up above guidance 4)."""
    config_file = Path(model).expanduser() / "config.yaml"
    if not config_file.is_file():
        return {}
    run_config = yaml.safe_load(config_file.read_text()) or {}
    if run_config.get("task") != "image-generation":
        return {}
    samples = (run_config.get("diffusion_training") or {}).get("samples") or {}
    return {key: samples[key] for key in ("guidance", "steps") if key in samples}


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

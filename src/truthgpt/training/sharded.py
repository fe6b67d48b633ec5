"""FSDP checkpoints through torch.distributed.checkpoint (DCP), and their merge into a model
folder the rest of the toolkit opens.

Under FSDP no rank holds the whole model, so every rank writes its own shard of the weights
and optimizer state into `sharded/` of the checkpoint; rank 0 adds what is not sharded (the
training state without them, the config) and the manifest, inside the same atomic write as a
single-process checkpoint. DCP stores each tensor with its global shape, so a checkpoint loads
at any world size, and into a plain (unsharded) model in a single process too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from truthgpt import config as config_module
from truthgpt.atomic import publish_folder
from truthgpt.errors import CheckpointError
from truthgpt.guard import SHARDED_DIR, TRAIN_STATE, check_output, mark
from truthgpt.manifest import write_manifest
from truthgpt.models.build import resolve_model_folder
from truthgpt.models.export import export_hf, write_export_model, write_generation_defaults
from truthgpt.models.lora import is_peft_model
from truthgpt.training import distributed
from truthgpt.training.checkpoint import verify_checkpoint

if TYPE_CHECKING:
    from truthgpt.data.prepare import PreparedData
    from truthgpt.training.tasks import Task


def save_sharded(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict[str, Any] | None,
    write_rest: Callable[[Path], None],
    is_main: bool,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Every rank calls this at once. Rank 0 makes the temporary sibling folder (atomic.py),
    every rank writes its shard into it, rank 0 writes `write_rest(tmp)`, train_state.pt (when
    given) and the manifest, then publishes the folder. Returns when it is published.
    `extra`: more sharded tensors by section and name (the EMA's averages), saved beside."""
    state: dict[str, Any]
    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    else:
        state = {"model": get_model_state_dict(model)}
    state.update(extra or {})

    def fill(tmp: Path) -> None:
        (tmp / SHARDED_DIR).mkdir()
        distributed.broadcast(str(tmp))
        dcp.save(state, checkpoint_id=tmp / SHARDED_DIR)  # collective: returns when all wrote
        write_rest(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        write_manifest(tmp)

    try:
        if is_main:
            publish_folder(folder, fill)
        else:
            tmp = Path(distributed.broadcast(None))
            dcp.save(state, checkpoint_id=tmp / SHARDED_DIR)
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {folder}: {exc.strerror or exc}. "
            "The previous checkpoint is unchanged; free disk space or fix permissions."
        ) from exc
    distributed.barrier()  # nobody reads or prunes checkpoints before this one is in place
    return folder


def load_sharded(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load the shards of `folder` into `model` (and `optimizer`, and the tensors of `extra`,
    in place), sharded or not, at any world size: DCP reads the slices each rank's tensors
    cover."""
    if optimizer is None:
        model_state = get_model_state_dict(model)
        _read_shards({"model": model_state, **(extra or {})}, folder)
        set_model_state_dict(model, model_state)
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, **(extra or {})}
    _read_shards(state, folder)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def _read_shards(state: dict[str, Any], folder: Path) -> None:
    with warnings.catch_warnings():
        # One plain process reads every slice itself: what DCP warns about is what we want.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=not dist.is_initialized())


def export_checkpoint(
    source: str | Path, out_dir: str | Path, merge_lora: bool = True, overwrite: bool = False
) -> Path:
    """`truthgpt export`: the model of a run or checkpoint folder as a transformers folder;
    a sharded checkpoint is merged first (export_merged), any other goes to models/export.py."""
    folder = resolve_model_folder(source, hashes=False)  # which one; each path hashes it once
    if not (folder / SHARDED_DIR).is_dir():
        return export_hf(source, out_dir, merge_lora=merge_lora, overwrite=overwrite)
    verify_checkpoint(folder)
    return export_merged(folder, Path(out_dir), overwrite, merge_lora)


def load_merged(folder: Path, task: Task, data: PreparedData) -> nn.Module:
    """The whole model of the sharded checkpoint `folder`, in this one process: `task` builds
    it for `data` (the run's, with its saved tokenizer), then every shard is read into it."""
    model = task.build_model(data)
    load_sharded(folder, model, None)
    # Prepared again: what the build derived from the weights it made (a diffusion model's
    # caption embeddings, from its frozen text encoder) is derived from the checkpoint's.
    return task.prepare_model(model)


def export_merged(
    folder: Path, out_dir: Path, overwrite: bool = False, merge_lora: bool = True
) -> Path:
    """Write the sharded checkpoint `folder` (checkpoints/NAME of a run, verified by the
    caller) as a plain model folder (model.safetensors, config.json, tokenizer) in one process,
    as the task saves its models; a LoRA model as `truthgpt export` writes one (merged, or
    base + adapter/ with transformers' names: models/export.py).

    The model is rebuilt from the config the checkpoint was trained with and the run's data
    (its saved tokenizer), then the full weights are read from the shards.
    """
    from truthgpt.training.tasks import build_task

    folder = Path(folder)
    run_dir = folder.parent.parent
    out_dir = check_output(out_dir, "export", overwrite, sources=[run_dir, folder])
    config = config_module.load(folder / config_module.RUN_CONFIG)
    task = build_task(config)
    data = task.build_data(run_dir, lambda message: None)
    model = load_merged(folder, task, data)

    def fill(tmp: Path) -> None:
        if is_peft_model(model):
            write_export_model(model, tmp, merge_lora)
            if data.tokenizer is not None:
                data.tokenizer.save_pretrained(tmp)
                write_generation_defaults(tmp, data.tokenizer)
        else:
            task.save(model, data, tmp)
        mark(tmp, "export")

    return publish_folder(out_dir, fill)

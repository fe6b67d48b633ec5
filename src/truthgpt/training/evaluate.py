"""Evaluation: token-weighted validation loss and perplexity, for the loop and `truthgpt eval`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from truthgpt import config as config_module
from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.errors import CheckpointError, DataError
from truthgpt.training import distributed


def perplexity(loss: float | None) -> float | None:
    # exp() of a diverged loss overflows; 50 nats is already astronomically bad.
    return None if loss is None else math.exp(min(loss, 50.0))


Batch = dict[str, torch.Tensor]


@torch.no_grad()
def mean_loss(
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    batches: list[Batch],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    advance: Callable[[], Any] | None = None,
) -> float:
    """Mean loss over every target of `batches` (not a mean of means).

    `loss_fn` (a task's `loss`) returns a batch's mean loss and the count of targets it is
    over (predicted tokens, for a language model), which weights the batch. With `world_size`
    ranks, rank r evaluates batches r, r + world_size, ... and the sums are all-reduced; every
    rank runs the same number of forwards (FSDP gathers weights in each), a rank short of a
    batch repeats its first one uncounted. `advance` is called after each batch (a progress
    bar's update).
    """
    was_training = model.training
    model.eval()
    autocast = (
        contextlib.nullcontext()
        if dtype == torch.float32
        else torch.autocast(device.type, dtype=dtype)
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    rounds = -(-len(batches) // world_size)
    with autocast:
        for index in range(rank, rounds * world_size, world_size):
            counted = index < len(batches)
            batch = batches[index if counted else rank % len(batches)]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, target_count = loss_fn(model, batch)
            if advance is not None:
                advance()
            if counted:
                count = torch.as_tensor(target_count, device=device, dtype=torch.float64)
                totals += torch.stack([loss.double() * count, count])
    model.train(was_training)
    loss_sum, count = distributed.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1)


def model_folder_config(folder: Path) -> dict[str, Any]:
    """The config that evaluates a model folder as a run would: its own family on the native
    decoder where that fits (else transformers), blocks as long as its context (1,024 at most,
    GPT-2's evaluation length; `--set data.max_seq_len=N` changes it)."""
    from truthgpt.local_paths import context_length
    from truthgpt.models.hf_io import is_native, read_hf_config

    hf = read_hf_config(folder)
    arch = ("gpt2" if hf.get("model_type") == "gpt2" else "llama") if is_native(hf) else "hf"
    return {
        "model": {"arch": arch, "init_from": str(folder)},
        "data": {"max_seq_len": min(context_length(hf) or 1024, 1024)},
    }


def evaluate_run(
    run: str | Path,
    data_paths: list[str] | None = None,
    split: str = "val",
    max_batches: int | None = None,
    device: str = "auto",
    overrides: list[str] = (),
    progress: bool = False,
) -> dict[str, Any]:
    """The validation loss of a run's model (best, else last), as its training evaluates it
    (the task's loss), on its own split or on files; and perplexity for a language model.

    `data_paths` (text or .jsonl files/globs) replace the run's data: every document in them is
    evaluated. Otherwise the run's `split` ("val" or "train") is used. A checkpoint of FSDP
    shards is merged in this process. `progress`: a progress bar on a terminal. The result
    counts what the loss is a mean over under the task's unit (`tokens`, `images`).
    """
    from truthgpt.data.loader import val_batches
    from truthgpt.data.prepare import TOKENIZER_DIR
    from truthgpt.guard import SHARDED_DIR
    from truthgpt.hardware import resolve_device, resolve_precision
    from truthgpt.models import resolve_model_folder
    from truthgpt.training.sharded import load_merged
    from truthgpt.training.tasks import build_task, task_unit

    run_dir = Path(run).expanduser()
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist (expected a run folder)")
    config_file = config_module.CONFIG_FILE
    owner = run_dir.resolve().parent.parent  # the run, if this is runs/NAME/checkpoints/X
    model_only = None  # the config of a model folder, which has no run
    if not (run_dir / config_file).is_file() and (owner / config_file).is_file():
        # One checkpoint of a run: the run's data, that checkpoint's weights.
        folder, run_dir = resolve_model_folder(run_dir), owner
    elif (run_dir / config_file).is_file():
        folder = resolve_model_folder(run_dir)
    elif (run_dir / "config.json").is_file():  # a model folder: HF's, an export
        if not data_paths:
            raise DataError(
                f"{run_dir} is a model folder, which brings no data of its own: give the files "
                "to evaluate it on with --data"
            )
        folder = resolve_model_folder(run_dir)
        model_only = model_folder_config(folder)
    else:
        raise CheckpointError(
            f"{run_dir} is not a run folder, a checkpoint folder of one, nor a model folder "
            f"(no {config_file}, no config.json)"
        )
    sharded = (folder / SHARDED_DIR).is_dir()
    given = model_only if model_only is not None else run_dir
    config = config_module.load(given, [f"hardware.device={device}", *overrides])
    computes = resolve_precision(config.training.precision, resolve_device(device))
    if config.training.residual_dtype == "bf16" and computes != torch.bfloat16:
        # A bf16 GPU run evaluated on a CPU: the bf16 stream is a training speed switch, and
        # an fp32 evaluation keeps the stream its weights give.
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"residual_dtype": "auto"})}
        )
    if data_paths and config.task in config_module.IMAGE_TASKS:
        raise DataError(
            f"--data: {run_dir} is a {config.task} run, which evaluates its own images; drop "
            "--data (--split val or train picks the run's split)"
        )
    if data_paths:
        from truthgpt.data.sources import expand_paths

        # By the files, not the patterns ('more/*' may hold .jsonl): one source reads them all,
        # and a text source would read a .jsonl file's JSON syntax as the text to evaluate.
        files = expand_paths(data_paths, "--data")
        rows = [file for file in files if file.suffix == ".jsonl"]
        if rows and len(rows) < len(files):
            text = next(file for file in files if file.suffix != ".jsonl")
            raise DataError(
                f"--data: {rows[0]} holds JSON rows (the text in data.field) and {text} is "
                "plain text (one document per file); evaluate each kind in a command of its own"
            )
        source = "jsonl" if rows else "text"
        if config.task == "sft":
            if not rows:
                raise DataError(
                    f"--data: {files[0]} is plain text, and {run_dir} is an sft run, whose loss "
                    "is on the answers of rows (`messages`, or `prompt` and `completion`): give "
                    ".jsonl files of such rows"
                )
            source = "jsonl"
        paths = "[" + ", ".join(repr(p) for p in data_paths) + "]"
        # The tokenizer the model was trained with: beside the weights, or the run's own copy
        # for FSDP shards (a checkpoint of them holds no tokenizer).
        tokenizer = run_dir / TOKENIZER_DIR if sharded else folder
        config = config_module.load(
            config.model_dump(mode="json"),
            [
                f"data.source={source}",
                f"data.paths={paths}",
                f"data.val_paths={paths}",
                "data.max_documents=null",
                f"data.tokenizer.path={tokenizer}",
            ],
        )
        split = "val"
    task = build_task(config)
    unit = task_unit(task)
    data = task.build_data(run_dir if not data_paths else None, lambda message: None)
    dataset = data.val if split == "val" else data.train
    if dataset is not None and not hasattr(dataset, "__len__"):
        raise DataError(
            f"the {split} split of {run_dir} is streamed from tar shards (data.source "
            "webdataset) and has no fixed blocks to evaluate; evaluate val, or give files"
        )
    batches = (
        [] if dataset is None else val_batches(dataset, config.training.batch_size, max_batches)
    )
    if unit == "tokens":  # the predicted ones, which the loss is a mean over
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    else:
        count = sum(task.count_tokens(b) for b in batches)
    if not count:  # empty, or a lone token: a loss of 0 over nothing would look like a result
        what = f"the {split} split of {run_dir}"
        if data_paths:
            what = f"the eval data ({', '.join(data_paths)})"
        if unit == "tokens":
            raise DataError(f"{what} has no token to predict: evaluation needs 2 at least")
        raise DataError(f"{what} has no {unit} to evaluate (data.val_fraction 0?)")
    torch_device = resolve_device(device)
    # The model as training evaluates it: the task's own, ready to train.
    if sharded:
        model = load_merged(folder, task, data)
    else:
        model = task.prepare_model(task.load_model(folder))
    model = model.to(torch_device)
    dtype = resolve_precision(config.training.precision, torch_device)
    from tqdm.auto import tqdm

    # A bar with rate and ETA on a terminal (with progress), nothing in a log.
    bar = tqdm(total=len(batches), desc="eval", unit="batch", disable=None if progress else True)
    with bar:
        loss = mean_loss(task.loss, model, batches, torch_device, dtype, advance=bar.update)
    return {
        "checkpoint": str(folder),
        "split": split if not data_paths else ",".join(data_paths),
        "loss": loss,
        "ppl": perplexity(loss) if getattr(task, "reports_perplexity", True) else None,
        "unit": unit,
        unit: count,
        "batches": len(batches),
    }

"""One training run from a config, start to end: the run folder taken (its lock) and prepared,
the data, model and Trainer built (or restored from a checkpoint), the loop run, the result
reported. The loop itself is trainer.py's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from truthgpt.config import IMAGE_TASKS, Config
from truthgpt.data import PreparedData
from truthgpt.data.prepare import check_enough_to_train
from truthgpt.errors import ConfigError
from truthgpt.guard import check_output
from truthgpt.hardware import apply_threads, resolve_device, resolve_precision
from truthgpt.local_paths import path_problems
from truthgpt.models.flex_attention import check_flex_training
from truthgpt.models.fused_loss import fused_loss_note
from truthgpt.models.lora import check_native_targets
from truthgpt.training import distributed
from truthgpt.training.callbacks import Callback, build_callbacks
from truthgpt.training.checkpoint import (
    Resumable,
    read_train_state,
)
from truthgpt.training.distributed import World
from truthgpt.training.fp8 import enable_fp8
from truthgpt.training.micro_batch import resolve_split
from truthgpt.training.optim import check_optimizer_runs
from truthgpt.training.rng import seed_everything
from truthgpt.training.run_folder import (
    prepare_run_dir,
    read_paths,
    remove_new_run_folder,
    take_run_folder,
)
from truthgpt.training.signals import Interrupted
from truthgpt.training.tasks import Task, build_task, check_residual_dtype, uses_fused_loss
from truthgpt.training.trainer import Trainer, TrainResult


def train(
    config: Config,
    callbacks: list[Callback] | None = None,
    overwrite: bool = False,
    resume: bool | str | None = None,
) -> TrainResult:
    """Train the model a config describes; returns where the run went and its val losses.

    `resume` (default: `training.resume`): True continues from the newest complete
    checkpoint (error if none), "auto" continues if there is one, False refuses a used folder.
    Under torchrun (or with `training.parallel` ddp / fsdp) this process joins the others
    (distributed.py); rank 0 alone writes the run folder and calls `callbacks`.
    """
    if not (resume is None or isinstance(resume, bool) or resume == "auto"):
        # Any other truthy value ("yes") would resume a run or silently start a new one.
        raise ConfigError(
            f"resume: {resume!r} is not one of True (continue; an error if there is nothing to "
            "continue), 'auto' (continue if there is a checkpoint), False, or None (the "
            "config's training.resume)"
        )
    resume = config.training.resume if resume is None else resume
    world, device = distributed.start(config, resolve_device(config.hardware.device))
    lock = None
    try:
        check_before_building(config, device)
        # Rank 0 holds the run folder until the run ends: a second training of it is refused.
        lock = distributed.from_main(
            lambda: take_run_folder(config.run_dir), share=lambda held: None
        )
        return _train(config, world, device, callbacks or [], overwrite, resume)
    finally:
        if lock is not None:
            lock.close()
        distributed.stop(world)


def check_before_building(config: Config, device: torch.device) -> None:
    """The settings this machine cannot run, refused before the data (a tokenizer to train, a
    corpus to encode) and the model are built: `validate` checks the config, not the machine."""
    problems = path_problems(config)
    if problems:
        raise problems[0]
    # The run folder's lock creates its parent: a run folder inside what the run reads (an
    # image folder) is refused before that, so "nothing was written" holds. prepare_run_dir
    # applies the rest of the guard's rules.
    check_output(config.run_dir, "run", overwrite=True, sources=read_paths(config))
    if config.training.packed_attention == "flex":
        check_flex_training(device)
    check_optimizer_runs(config.optim, device)
    if config.task not in IMAGE_TASKS:
        check_native_targets(config.model.arch, config.model.lora)
    check_residual_dtype(config, resolve_precision(config.training.precision, device))


def _train(
    config: Config,
    world: World,
    device: torch.device,
    callbacks: list[Callback],
    overwrite: bool,
    resume: bool | str,
) -> TrainResult:
    run_dir = config.run_dir
    fresh = world.is_main and not run_dir.exists()  # this call creates the run folder
    resume_from = distributed.from_main(
        lambda: prepare_run_dir(config, overwrite, resume),
        share=lambda found: str(found.folder) if found else None,
    )
    if not world.is_main and resume_from is not None:  # rank 0 verified it already
        resume_from = Resumable(Path(resume_from), read_train_state(resume_from))
    if resume_from is not None and resume_from.step >= config.training.max_steps:
        return _nothing_to_train(config, resume_from, world)
    seed_everything(config.seed)  # the same initial weights on every rank
    apply_threads(config.hardware.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.training.tf32
        torch.backends.cudnn.allow_tf32 = config.training.tf32
    all_callbacks = build_callbacks(config, run_dir) + callbacks if world.is_main else []
    log = _logger(all_callbacks)
    task = build_task(config)
    # Rank 0 first: it writes what the others read (the run's tokenizer).
    try:
        data = distributed.main_first(lambda: task.build_data(run_dir, log))
    except BaseException:
        # No data, no run: a folder this call made holds nothing yet (a missing package, an
        # empty image folder) and would only look like a run that started.
        if fresh:
            remove_new_run_folder(run_dir)
        raise
    try:
        trainer = _build_trainer(config, world, device, task, data, resume_from, all_callbacks)
    except ConfigError:
        # A setting this machine cannot run (an optimizer that needs CUDA...), found before the
        # first step: a folder this call made would only look like a run that started.
        if fresh:
            remove_new_run_folder(run_dir)
        raise
    try:
        result = trainer.fit()
        _report(result, trainer.reports_perplexity, run_dir, log)
    except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop gave the signals back
        raise Interrupted(trainer.stopped_at_once()) from None
    return result


def _report(
    result: TrainResult, reports_perplexity: bool, run_dir: Path, log: Callable[[str], None]
) -> None:
    # Stopped on request, the last evaluation may be the first one: no "a -> a" line.
    evaluated = result.initial_val_loss is not None and result.final_val_loss is not None
    if evaluated and not result.interrupted:
        losses = f"{result.initial_val_loss:.4f} -> {result.final_val_loss:.4f}"
        if reports_perplexity:
            ppl = f"{result.initial_val_ppl:.2f} -> {result.final_val_ppl:.2f}"
            log(f"val perplexity {ppl} (loss {losses})")
        else:
            log(f"val loss {losses}")
    if result.nonfinite_skipped:
        log(f"{result.nonfinite_skipped} updates were skipped for non-finite loss or gradients")
    log(f"run folder: {run_dir}")


def _logger(callbacks: list[Callback]) -> Callable[[str], None]:
    """A log function that hands each message to every callback."""

    def log(message: str) -> None:
        for callback in callbacks:
            on_log = getattr(callback, "on_log", None)  # a user's callback may have none
            if on_log is not None:
                on_log(message)

    return log


def _build_trainer(
    config: Config,
    world: World,
    device: torch.device,
    task: Task,
    data: PreparedData,
    resume_from: Resumable | None,
    callbacks: list[Callback],
) -> Trainer:
    """The model (fresh, or the checkpoint's), placed or sharded on the device, the micro-batch
    split, and the Trainer around them, restored when resuming."""
    log = _logger(callbacks)
    check_enough_to_train(data, config.data.max_seq_len)
    if resume_from is not None and not resume_from.sharded:
        model = task.prepare_model(task.load_model(resume_from.folder))
    else:  # fresh, or weights that restore() reads from the shards
        meta = getattr(task, "builds_on_meta", True)
        model = distributed.build_on_ranks(lambda: task.build_model(data), world, meta)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = f", {n_trainable / 1e6:.3f}M trainable" if n_trainable != n_params else ""
    processes = "process" if world.size == 1 else "processes"
    across = f" x {world.size} {processes} ({world.parallel})" if world.grouped else ""
    describe = getattr(task, "describe_model", None)
    name = describe(model) if describe else config.model.arch
    log(
        f"model {name}: {n_params / 1e6:.2f}M parameters{trainable} on {device}"
        f"{across} ({resolve_precision(config.training.precision, device)}, "
        f"{torch.get_num_threads()} CPU threads)"
    )
    if uses_fused_loss(config, model):
        log(fused_loss_note(device))
    if world.parallel == "fsdp":
        # Sharded before the micro-batch probe, which then measures what a rank really holds;
        # FP8 layers go in first, as torchao's float8 needs them under fully_shard.
        if config.training.fp8 != "none":
            enable_fp8(model, config.training.fp8, device, log)
        dtype = resolve_precision(config.training.precision, device)
        distributed.shard_for_training(model, world, device, config.training, dtype, log)
    else:
        model = model.to(device)
    # Before the Trainer compiles and wraps the model: the probe runs it as it is.
    saved = resume_from.state.get("micro_batch") if resume_from is not None else None
    split = resolve_split(config, task, data, model, world, log, saved)
    trainer = Trainer(config, model, data, device, config.run_dir, callbacks, task, world, split)
    if world.size > 1:
        torch.manual_seed(config.seed + world.rank)  # dropout masks differ between ranks
    if resume_from is not None:
        trainer.restore(resume_from)
        log(f"resumed from {resume_from.folder} at step {trainer.step}")
    return trainer


def _nothing_to_train(config: Config, resume_from: Resumable, world: World) -> TrainResult:
    """A resume at or past training.max_steps: no data, model or callback is built, and the
    run folder (its config, history, metrics, checkpoints) is left as it was, but for the end
    of a save that a kill cut short (prepare_run_dir)."""
    state = resume_from.state
    if world.is_main:
        print(
            f"nothing to train: {config.run_dir} is at step {resume_from.step} and "
            f"training.max_steps is {config.training.max_steps}; its config is unchanged. Raise "
            "max_steps (--set training.max_steps=N) to train on.",
            flush=True,
        )
    return TrainResult(
        run_dir=config.run_dir,
        steps=resume_from.step,
        initial_val_loss=state["initial_val_loss"],
        final_val_loss=None,
        best_metric=state["best_metric"],
        tokens_per_second=0.0,
        stopped_early=False,
        nonfinite_skipped=state["nonfinite"]["skipped"],
        interrupted=False,
    )

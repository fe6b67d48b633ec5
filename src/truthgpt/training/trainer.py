"""The training loop, one for every task (`training/tasks.py`) and model.

`train(config)` builds the pieces from the config (the task, its data and model, optimizer,
schedule, callbacks) and runs `Trainer.fit()`. The task owns what is specific to what is
learned (data, model, loss, what a checkpoint holds beside the weights); the loop names none.

The step reads like the textbook: forward, loss, backward, unscale, clip, step, schedule, log.
The guards that keep work from being lost are named calls in that loop: the non-finite check,
EMA, evaluation, early stopping and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from truthgpt.config import Config
from truthgpt.data import PreparedData
from truthgpt.data.loader import EpochBatches, val_batches
from truthgpt.errors import TrainingError
from truthgpt.guard import CHECKPOINTS
from truthgpt.hardware import apply_threads, resolve_device, resolve_precision
from truthgpt.training.callbacks import Callback, build_callbacks
from truthgpt.training.checkpoint import (
    find_resumable,
    link_checkpoint,
    load_train_state,
    prune_step_checkpoints,
    save_checkpoint,
    step_folder_name,
)
from truthgpt.training.ema import EMA
from truthgpt.training.evaluate import mean_loss, perplexity
from truthgpt.training.optim import build_optimizer, build_scheduler
from truthgpt.training.run_folder import RUN_CONFIG, prepare_run_dir
from truthgpt.training.tasks import Task, build_task
from truthgpt.training.tasks import build_model as build_model  # re-exported for tests, benchmarks

# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), for MFU. fp32 runs use TF32,
# which is half the bf16 rate on these parts.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    initial_val_loss: float | None
    final_val_loss: float | None
    best_metric: float | None
    tokens_per_second: float
    stopped_early: bool = False
    nonfinite_skipped: int = 0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before max_steps (resumable)

    @property
    def initial_val_ppl(self) -> float | None:
        return perplexity(self.initial_val_loss)

    @property
    def final_val_ppl(self) -> float | None:
        return perplexity(self.final_val_loss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and plain values (loadable weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary.

    A second signal falls through to the default behaviour (immediate stop), so a stuck run
    can still be killed.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs the optimizer steps, evaluation, logging and checkpoints of one run."""

    def __init__(
        self,
        config: Config,
        model: nn.Module,
        data: PreparedData,
        device: torch.device,
        run_dir: Path,
        callbacks: list[Callback],
        task: Task | None = None,
    ) -> None:
        self.config = config
        self.task = task if task is not None else build_task(config)
        self.train_cfg = config.training
        self.model = model
        self.data = data
        self.device = device
        self.run_dir = run_dir
        self.checkpoints = run_dir / CHECKPOINTS
        self.callbacks = callbacks
        self.dtype = resolve_precision(self.train_cfg.precision, device)
        self.optimizer = build_optimizer(model, config.optim, device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.train_cfg.max_steps)
        # fp16 has too little range for raw gradients; bf16 and fp32 need no scaling.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.batches = EpochBatches(
            data.train,
            batch_size=self.train_cfg.batch_size,
            seed=config.seed,
            num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda",
        )
        self.val_batches = (
            val_batches(data.val, self.train_cfg.batch_size, self.train_cfg.eval_batches)
            if data.val is not None
            else []
        )
        self.trainable_params = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMA(model, self.train_cfg.ema.decay) if self.train_cfg.ema.enabled else None
        self.forward_model = torch.compile(model) if self.train_cfg.compile else model
        self.step = 0
        self.tokens_seen = 0
        self.best_metric: float | None = None
        self.initial_val_loss: float | None = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.early_best: float | None = None
        self.evals_without_improvement = 0
        self.peak_flops = self._peak_flops()
        # A task that draws pictures of its progress (image generation) says how often.
        self.sample_every = getattr(self.task, "sample_every", 0)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        max_steps = self.train_cfg.max_steps
        self._emit("on_train_start", self.step, max_steps)
        last_eval = None
        if self.val_batches and self.step == 0:
            last_eval = self.evaluate()
            self.initial_val_loss = last_eval["val_loss"]
            self._emit("on_eval", self.step, last_eval)
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=self.device)
        run_start, start_tokens = time.perf_counter(), self.tokens_seen
        stopped_early = False
        with StopRequested() as stop:
            while self.step < max_steps:
                loss, grad_norm, tokens, finite = self.train_step()
                self.step += 1
                self.tokens_seen += tokens
                window_tokens += tokens
                if finite:
                    loss_sum += loss
                    window_steps += 1
                elif self.handle_nonfinite(loss, grad_norm):
                    continue  # rolled back: self.step is the checkpoint's step again
                if self.step % self.train_cfg.log_every == 0 or self.step == max_steps:
                    metrics = self._train_metrics(
                        loss_sum / max(window_steps, 1), grad_norm, window_tokens, window_start
                    )
                    self._emit("on_step_end", self.step, metrics)
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
                    loss_sum.zero_()
                evaluated = self.val_batches and (
                    self.step % self.train_cfg.eval_every == 0 or self.step == max_steps
                )
                if evaluated:
                    last_eval = self.evaluate()
                    self._emit("on_eval", self.step, last_eval)
                    self.maybe_save_best(last_eval)
                    stopped_early = self.should_stop_early(last_eval)
                if self.sample_every and (
                    self.step % self.sample_every == 0 or self.step == max_steps
                ):
                    self.draw_samples()
                if (
                    self.step % self.config.checkpoint.save_every == 0
                    or self.step == max_steps
                    or stopped_early
                    or stop.requested
                ):
                    self.save_resumable()
                if stopped_early:
                    self.log(
                        f"early stopping at step {self.step}: no improvement in "
                        f"{self.evals_without_improvement} evaluations"
                    )
                    break
                if stop.requested:
                    self.log(
                        f"stopped at step {self.step} on request; checkpoint saved. "
                        "Continue with --resume."
                    )
                    break
        if not self.val_batches:
            self.save_model_only("best")  # nothing to select by: best is the final model
        self._emit("on_train_end", self.step)
        elapsed = time.perf_counter() - run_start
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            initial_val_loss=self.initial_val_loss,
            final_val_loss=last_eval["val_loss"] if last_eval else None,
            best_metric=self.best_metric,
            tokens_per_second=(self.tokens_seen - start_tokens) / max(elapsed, 1e-9),
            stopped_early=stopped_early,
            nonfinite_skipped=self.nonfinite_skipped,
            interrupted=stop.requested,
        )

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """One optimizer step over grad_accum_steps micro-batches.

        Returns (mean loss, grad norm, tokens, finite). A non-finite loss or gradient norm
        skips the update: the weights and optimizer state are left as they were.
        """
        self.model.train()
        accum = self.train_cfg.grad_accum_steps
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(accum):
            batch = self._to_device(next(self.batches))
            with self._autocast():
                loss, _ = self.task.loss(self.forward_model, batch)
            self.scaler.scale(loss / accum).backward()
            loss_total += loss.detach() / accum
            tokens += self.task.count_tokens(batch)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        if self._wants_histograms():
            self._emit("on_gradients", self.step + 1, self.model)
        # One host sync per step: the price of never applying a NaN update. With fp16 an
        # infinite gradient is the scaler's business (it skips the step and lowers the scale).
        loss_ok = bool(torch.isfinite(loss_total))
        grads_ok = self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
        finite = loss_ok and grads_ok
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None and (self.step + 1) % self.train_cfg.ema.every == 0:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_total, grad_norm, tokens, finite

    def handle_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Count a skipped update; after too many in a row, stop or roll back (returns True)."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        nonfinite = self.train_cfg.nonfinite
        self.log(
            f"warning: step {self.step}: non-finite loss {float(loss):.4g} / grad norm "
            f"{float(grad_norm) if grad_norm is not None else float('nan'):.4g}; update skipped "
            f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_skipped} in total)"
        )
        if self.nonfinite_in_a_row < nonfinite.max_consecutive:
            return False
        if nonfinite.action == "stop" or self.rollbacks >= nonfinite.max_rollbacks:
            folder = find_resumable(self.checkpoints, self.log)
            where = f"the last good checkpoint is {folder}" if folder else "no checkpoint yet"
            raise TrainingError(
                f"{self.nonfinite_in_a_row} non-finite updates in a row at step {self.step} "
                f"(after {self.rollbacks} rollbacks); stopped, {where}. Lower optim.lr, check "
                "the data, or set training.nonfinite.action: rollback."
            )
        self.rollback()
        return True

    def rollback(self) -> None:
        """Reload the last good checkpoint with a lower learning rate, keep the data moving.

        The data position is not restored: the batches that blew up are not replayed (the
        PaLM recipe: restart from before the spike and skip the offending batches).
        """
        folder = find_resumable(self.checkpoints, self.log)
        if folder is None:
            raise TrainingError(
                f"non-finite updates at step {self.step} and no checkpoint to roll back to; "
                "lower optim.lr or checkpoint.save_every"
            )
        data_position = self.batches.state_dict()
        skipped, rollbacks, lr_scale = self.nonfinite_skipped, self.rollbacks, self.lr_scale
        self.restore(folder, load_weights=True)
        self.batches.load_state_dict(data_position)
        self.nonfinite_skipped, self.rollbacks = skipped, rollbacks + 1
        self.lr_scale = lr_scale * self.train_cfg.nonfinite.rollback_lr_factor
        factor = self.train_cfg.nonfinite.rollback_lr_factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.nonfinite_in_a_row = 0
        self.log(f"rolled back to {folder} (step {self.step}); learning rate x{self.lr_scale:g}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the same validation blocks every time, and perplexity."""
        use_ema = self.ema is not None and self.train_cfg.ema.evaluate
        with self.ema.applied() if use_ema else contextlib.nullcontext():
            val_loss = mean_loss(
                self.task.loss, self.forward_model, self.val_batches, self.device, self.dtype
            )
        return {"step": self.step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    def draw_samples(self) -> None:
        """The task's pictures of its progress, drawn with the weights evaluation uses."""
        use_ema = self.ema is not None and self.train_cfg.ema.evaluate
        with self.ema.applied() if use_ema else contextlib.nullcontext():
            images = self.task.samples(self.model, self.step)
        for name, image in images.items():
            self._emit("on_image", self.step, name, image)

    def should_stop_early(self, metrics: dict[str, float]) -> bool:
        rule = self.train_cfg.early_stopping
        if not rule.enabled:
            return False
        value = metrics[rule.metric]
        sign = 1.0 if rule.mode == "min" else -1.0
        improved = self.early_best is None or sign * (self.early_best - value) > rule.min_delta
        if improved:
            self.early_best, self.evals_without_improvement = value, 0
        else:
            self.evals_without_improvement += 1
        return self.evals_without_improvement >= rule.patience

    # -- checkpoints -----------------------------------------------------------------------

    def maybe_save_best(self, metrics: dict[str, float]) -> None:
        ckpt = self.config.checkpoint
        value = metrics[ckpt.select_best_by]
        if not math.isfinite(value):
            return
        better = (
            self.best_metric is None
            or (ckpt.best_mode == "min" and value < self.best_metric)
            or (ckpt.best_mode == "max" and value > self.best_metric)
        )
        if better:
            self.best_metric = value
            # best/ holds the weights that were evaluated: the EMA ones when they were used.
            use_ema = self.ema is not None and self.train_cfg.ema.evaluate
            with self.ema.applied() if use_ema else contextlib.nullcontext():
                self.save_model_only("best")

    def save_resumable(self) -> Path:
        """step_N/ with the full training state, then last/ as its hard-linked twin; prune."""
        keep_last = self.config.checkpoint.keep_last
        state = self.train_state()
        if keep_last == 0:
            path = save_checkpoint(self.checkpoints / "last", self._write_model, state)
        else:
            step_path = save_checkpoint(
                self.checkpoints / step_folder_name(self.step), self._write_model, state
            )
            path = link_checkpoint(step_path, self.checkpoints / "last")
        prune_step_checkpoints(self.checkpoints, keep_last)
        self._emit("on_checkpoint", self.step, path)
        return path

    def save_model_only(self, name: str) -> Path:
        path = save_checkpoint(self.checkpoints / name, self._write_model, None)
        self._emit("on_checkpoint", self.step, path)
        return path

    def _write_model(self, folder: Path) -> None:
        self.task.save(self.model, self.data, folder)
        # What this checkpoint was trained with, for the resume check (run_folder.py).
        (folder / RUN_CONFIG).write_text(self.config.to_yaml())

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_metric": self.best_metric,
            "initial_val_loss": self.initial_val_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "early_stopping": {
                "best": self.early_best,
                "evals_without_improvement": self.evals_without_improvement,
            },
            "nonfinite": {
                "skipped": self.nonfinite_skipped,
                "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale,
            },
        }

    def restore(self, folder: Path, load_weights: bool = False) -> None:
        """Continue from a checkpoint's training state (and its weights, when asked)."""
        state = load_train_state(folder)
        if load_weights:
            reloaded = self.task.load_model(folder, self.device)
            own = self.model.state_dict()
            own.update({k: v for k, v in reloaded.state_dict().items() if k in own})
            self.model.load_state_dict(own)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_metric = state["best_metric"]
        self.initial_val_loss = state["initial_val_loss"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if self.ema is not None:
            if state["ema"] is None:
                self.log("warning: the checkpoint has no EMA state; the average restarts here")
                self.ema = EMA(self.model, self.train_cfg.ema.decay)
            else:
                self.ema.load_state_dict(state["ema"])
        early = state["early_stopping"]
        self.early_best = early["best"]
        self.evals_without_improvement = early["evals_without_improvement"]
        self.nonfinite_skipped = state["nonfinite"]["skipped"]
        self.rollbacks = state["nonfinite"]["rollbacks"]
        self.lr_scale = state["nonfinite"]["lr_scale"]

    # -- details ---------------------------------------------------------------------------

    def _wants_histograms(self) -> bool:
        every = self.config.logging.histograms_every
        return every > 0 and (self.step + 1) % every == 0

    def _train_metrics(
        self,
        mean_loss_value: torch.Tensor,
        grad_norm: torch.Tensor | None,
        window_tokens: int,
        window_start: float,
    ) -> dict[str, float]:
        loss = float(mean_loss_value)
        tokens_per_second = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        metrics: dict[str, float] = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_per_second,
            "tokens_seen": self.tokens_seen,
        }
        if grad_norm is not None and self.train_cfg.grad_clip is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.nonfinite_skipped:
            metrics["nonfinite_skipped"] = self.nonfinite_skipped
        flops_per_token = self.task.flops_per_token(self.model) if self.peak_flops else None
        if flops_per_token is not None:
            metrics["mfu"] = flops_per_token * tokens_per_second / self.peak_flops
        if self.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops if self.dtype != torch.float32 else flops / 2
        return None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    def log(self, message: str) -> None:
        self._emit("on_log", message)


# ---------------------------------------------------------------------------------------------


def train(
    config: Config,
    callbacks: list[Callback] | None = None,
    overwrite: bool = False,
    resume: bool | str | None = None,
) -> TrainResult:
    """Train the model a config describes; returns where the run went and its val losses.

    `resume` (default: `training.resume`): True continues from the newest complete
    checkpoint (error if none), "auto" continues if there is one, False refuses a used folder.
    """
    resume = config.training.resume if resume is None else resume
    resume_from = prepare_run_dir(config, overwrite, resume)
    run_dir = config.run_dir
    seed_everything(config.seed)
    threads = apply_threads(config.hardware.threads)
    device = resolve_device(config.hardware.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.training.tf32
        torch.backends.cudnn.allow_tf32 = config.training.tf32
    all_callbacks = build_callbacks(config, run_dir) + list(callbacks or [])

    def log(message: str) -> None:
        for callback in all_callbacks:
            callback.on_log(message)

    task = build_task(config)
    data = task.build_data(run_dir, log)
    if resume_from is not None:
        model = task.prepare_model(task.load_model(resume_from)).to(device)
    else:
        model = task.build_model(data).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = f", {n_trainable / 1e6:.3f}M trainable" if n_trainable != n_params else ""
    log(
        f"model {config.model.arch}: {n_params / 1e6:.2f}M parameters{trainable} on {device} "
        f"({resolve_precision(config.training.precision, device)}, {threads} CPU threads)"
    )
    trainer = Trainer(config, model, data, device, run_dir, all_callbacks, task)
    if resume_from is not None:
        trainer.restore(resume_from)
        log(f"resumed from {resume_from} at step {trainer.step}")
    result = trainer.fit()
    if result.initial_val_loss is not None and result.final_val_loss is not None:
        log(
            f"val perplexity {result.initial_val_ppl:.2f} -> {result.final_val_ppl:.2f} "
            f"(loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f})"
        )
    if result.nonfinite_skipped:
        log(f"{result.nonfinite_skipped} updates were skipped for non-finite loss or gradients")
    log(f"run folder: {run_dir}")
    return result

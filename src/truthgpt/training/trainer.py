"""The training loop, one for every model: native decoder or any AutoModelForCausalLM.

`train(config)` builds the pieces from the config (data, model, optimizer, schedule,
callbacks) and runs `Trainer.fit()`. The step reads like the textbook: forward, loss, backward,
unscale, clip, step, schedule, log; evaluation and checkpoints are named calls in that loop.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from truthgpt import config as config_module
from truthgpt.config import Config
from truthgpt.data import PreparedData, prepare_data
from truthgpt.data.loader import EpochBatches, val_batches
from truthgpt.errors import ConfigError
from truthgpt.models import save_model
from truthgpt.registry import ARCHS
from truthgpt.training.callbacks import Callback, build_callbacks
from truthgpt.training.checkpoint import save_checkpoint
from truthgpt.training.optim import build_optimizer, build_scheduler

CHECKPOINTS = "checkpoints"

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

    @property
    def initial_val_ppl(self) -> float | None:
        return _ppl(self.initial_val_loss)

    @property
    def final_val_ppl(self) -> float | None:
        return _ppl(self.final_val_loss)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"hardware.device: {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
    ) -> None:
        self.config = config
        self.train_cfg = config.training
        self.model = model
        self.data = data
        self.device = device
        self.run_dir = run_dir
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
        self.forward_model = torch.compile(model) if self.train_cfg.compile else model
        self.step = 0
        self.tokens_seen = 0
        self.best_metric: float | None = None
        self.peak_flops = self._peak_flops()

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        max_steps = self.train_cfg.max_steps
        self._emit("on_train_start", self.step, max_steps)
        initial = self.evaluate() if self.val_batches else None
        if initial is not None:
            self._emit("on_eval", self.step, initial)
        window_start, window_tokens = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)
        last_eval = initial
        run_start = time.perf_counter()
        while self.step < max_steps:
            loss, grad_norm, tokens = self.train_step()
            self.step += 1
            loss_sum += loss
            window_tokens += tokens
            self.tokens_seen += tokens
            if self.step % self.train_cfg.log_every == 0 or self.step == max_steps:
                steps_in_window = (self.step - 1) % self.train_cfg.log_every + 1
                metrics = self._train_metrics(
                    loss_sum / steps_in_window, grad_norm, window_tokens, window_start
                )
                self._emit("on_step_end", self.step, metrics)
                window_start, window_tokens = time.perf_counter(), 0
                loss_sum.zero_()
            if self.val_batches and (
                self.step % self.train_cfg.eval_every == 0 or self.step == max_steps
            ):
                last_eval = self.evaluate()
                self._emit("on_eval", self.step, last_eval)
                self.maybe_save_best(last_eval)
            if self.step % self.config.checkpoint.save_every == 0 or self.step == max_steps:
                self.save("last", with_train_state=True)
        if not self.val_batches:
            self.save("best", with_train_state=False)  # nothing to select by: best is last
        self._emit("on_train_end", self.step)
        elapsed = time.perf_counter() - run_start
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            initial_val_loss=initial["val_loss"] if initial else None,
            final_val_loss=last_eval["val_loss"] if last_eval else None,
            best_metric=self.best_metric,
            tokens_per_second=self.tokens_seen / max(elapsed, 1e-9),
        )

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss, grad norm, tokens)."""
        self.model.train()
        accum = self.train_cfg.grad_accum_steps
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(accum):
            batch = self._to_device(next(self.batches))
            with self._autocast():
                loss = self.forward_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            self.scaler.scale(loss / accum).backward()
            loss_total += loss.detach() / accum
            tokens += int(batch["input_ids"].numel())
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.train_cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.train_cfg.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_total, grad_norm, tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the same validation blocks every time, and perplexity."""
        self.model.eval()
        loss_sum, count = 0.0, 0
        for batch in self.val_batches:
            batch = self._to_device(batch)
            with self._autocast():
                loss = self.forward_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            # The loss is a mean over predicted positions (labels shifted by one, -100 ignored).
            targets = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(loss) * targets
            count += targets
        val_loss = loss_sum / max(count, 1)
        return {"step": self.step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)}

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
            self.save("best", with_train_state=False)

    def save(self, name: str, with_train_state: bool) -> Path:
        def write_model(folder: Path) -> None:
            save_model(self.model, folder)
            self.data.tokenizer.save_pretrained(folder)

        state = self.train_state() if with_train_state else None
        path = save_checkpoint(self.run_dir / CHECKPOINTS / name, write_model, state)
        self._emit("on_checkpoint", self.step, path)
        return path

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_metric": self.best_metric,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.batches.state_dict(),
        }

    # -- details ---------------------------------------------------------------------------

    def _train_metrics(
        self,
        mean_loss: torch.Tensor,
        grad_norm: torch.Tensor | None,
        window_tokens: int,
        window_start: float,
    ) -> dict[str, float]:
        loss = float(mean_loss)  # the one host sync per log window
        tokens_per_second = window_tokens / max(time.perf_counter() - window_start, 1e-9)
        metrics: dict[str, float] = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_per_second,
            "tokens_seen": self.tokens_seen,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak_flops and hasattr(self.model, "flops_per_token"):
            flops = self.model.flops_per_token(self.config.data.max_seq_len) * tokens_per_second
            metrics["mfu"] = flops / self.peak_flops
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


def build_model(config: Config, vocab_size: int) -> nn.Module:
    """The model the config names, built by the ARCHS registry."""
    builder = ARCHS.get_builder(config.model.arch, "model.arch")
    return builder(config.model, vocab_size)


def prepare_run_dir(config: Config, overwrite: bool) -> Path:
    """Create the run folder; refuse to train over a finished or running one unless told to."""
    run_dir = config.run_dir
    last = run_dir / CHECKPOINTS / "last"
    if last.exists():
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoints/last exists). Nothing was changed. "
                "Pick another run_name (--set run_name=NAME) or pass --overwrite to start over."
            )
        for stale in (CHECKPOINTS, "tb", "metrics.jsonl", "loss.png", "tokenizer"):
            path = run_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_module.save(config, run_dir / config_module.CONFIG_FILE)
    return run_dir


def train(
    config: Config, callbacks: list[Callback] | None = None, overwrite: bool = False
) -> TrainResult:
    """Train the model a config describes; returns where the run went and its val losses."""
    run_dir = prepare_run_dir(config, overwrite)
    seed_everything(config.seed)
    device = resolve_device(config.hardware.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.training.tf32
        torch.backends.cudnn.allow_tf32 = config.training.tf32
    all_callbacks = build_callbacks(config, run_dir) + list(callbacks or [])

    def log(message: str) -> None:
        for callback in all_callbacks:
            callback.on_log(message)

    data = prepare_data(config, run_dir, log=log)
    model = build_model(config, vocab_size=len(data.tokenizer)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model {config.model.arch}: {n_params / 1e6:.2f}M parameters on {device} "
        f"({resolve_precision(config.training.precision, device)})"
    )
    trainer = Trainer(config, model, data, device, run_dir, all_callbacks)
    result = trainer.fit()
    if result.initial_val_loss is not None:
        log(
            f"val perplexity {result.initial_val_ppl:.2f} -> {result.final_val_ppl:.2f} "
            f"(loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f})"
        )
    log(f"run folder: {run_dir}")
    return result

"""The training loop, one for every task (`training/tasks.py`) and model.

`train(config)` (run.py) builds the pieces from the config (the task, its data and model,
callbacks) and runs `Trainer.fit()`; the Trainer builds the optimizer and schedule. The task
owns what is specific to what is learned (data, model, loss, what a checkpoint holds beside
the weights); the loop names none.

The step reads like the textbook: forward, loss, backward, unscale, clip, step, schedule, log.
The guards that keep work from being lost are named calls in that loop: the non-finite check,
EMA, evaluation, early stopping and checkpoints.

Under torchrun every rank runs this same loop on its share of the batches (`distributed.py`);
rank 0 alone writes the run folder, logs and calls the callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from truthgpt.config import RUN_CONFIG, Config
from truthgpt.data import PreparedData
from truthgpt.data.loader import train_batches, val_batches
from truthgpt.errors import CheckpointError, TrainingError
from truthgpt.guard import CHECKPOINTS
from truthgpt.hardware import peak_flops, resolve_precision
from truthgpt.models.decoder import Decoder
from truthgpt.models.flex_attention import check_flex_training
from truthgpt.training import distributed
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import (
    Resumable,
    find_resumable,
    link_checkpoint,
    newest_on_disk,
    prune_step_checkpoints,
    read_train_state,
    save_checkpoint,
    step_folder_name,
)
from truthgpt.training.compiling import compile_blocks, compile_note
from truthgpt.training.distributed import World, gradient_sync
from truthgpt.training.ema import EMA
from truthgpt.training.evaluate import mean_loss, perplexity
from truthgpt.training.fp8 import enable_fp8
from truthgpt.training.micro_batch import Split, global_batch_note
from truthgpt.training.optim import build_optimizer, build_scheduler
from truthgpt.training.rng import rng_state, set_rng_state
from truthgpt.training.sharded import load_sharded, save_sharded
from truthgpt.training.signals import StopRequested
from truthgpt.training.tasks import Task, build_task, task_unit
from truthgpt.training.tasks import build_model as build_model  # re-exported for tests, benchmarks


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


class StepResult(NamedTuple):
    loss: torch.Tensor  # the mean over every target of the step, all ranks together
    grad_norm: torch.Tensor | None
    tokens: int  # this rank's (summed over the ranks at log steps)
    skipped: torch.Tensor  # bool, on the device: the update was skipped (on every rank alike)


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
        world: World | None = None,
        split: Split | None = None,
    ) -> None:
        self.config = config  # as written: what a checkpoint records for the resume check
        self.task = task if task is not None else build_task(config)
        # The training section as this run cuts its batch: `split` is what micro_batch auto
        # chose (micro_batch.py); every batch_size / grad_accum_steps below is the split's.
        given = config.training
        split = split or Split(given.batch_size, given.grad_accum_steps)
        self.train_cfg = given.model_copy(
            update={"batch_size": split.batch_size, "grad_accum_steps": split.grad_accum_steps}
        )
        self.world = world or World()
        self.model = model
        self.data = data
        self.device = device
        self.run_dir = run_dir
        self.checkpoints = run_dir / CHECKPOINTS
        self.callbacks = callbacks
        self.dtype = resolve_precision(self.train_cfg.precision, device)
        if self.train_cfg.fp8 != "none" and not distributed.is_sharded(model):
            enable_fp8(model, self.train_cfg.fp8, device, self.log)
        if self.train_cfg.packed_attention == "flex":
            heads = [m.config.head_dim for m in model.modules() if isinstance(m, Decoder)]
            check_flex_training(device, heads[0] if heads else None)
        note = compile_note(self.train_cfg, device)
        if note:
            self.log(note)
        if self.train_cfg.compile and self.train_cfg.compile_scope == "blocks":
            compile_blocks(model, self.train_cfg.compile_mode)
        # Before the optimizer: FSDP replaces the parameters by their shards.
        param_dtype = distributed.fsdp_param_dtype(self.train_cfg, self.dtype)
        self.forward_model = distributed.wrap_model(model, self.world, device, param_dtype)
        if self.train_cfg.compile and self.train_cfg.compile_scope == "model":
            self.forward_model = torch.compile(self.forward_model, mode=self.train_cfg.compile_mode)
        self.optimizer = build_optimizer(model, config.optim, device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.train_cfg.max_steps)
        # fp16 has too little range for raw gradients; bf16 and fp32 need no scaling.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.batches = train_batches(
            data.train,
            batch_size=self.train_cfg.batch_size,
            seed=config.seed,
            num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda",
            rank=self.world.rank,
            world_size=self.world.size,
        )
        # The blocks eval_batches of the written batch_size hold, however the split cuts them:
        # the validation loss does not depend on what the probe found.
        self.val_batches = (
            val_batches(
                data.val,
                self.train_cfg.batch_size,
                max_items=given.batch_size * self.train_cfg.eval_batches,
            )
            if data.val is not None
            else []
        )
        self.trainable_params = [p for p in model.parameters() if p.requires_grad]
        # CUDA graphs replay into the same output memory: a gradient must be a tensor of its own
        # that backward adds into, never a graph output that autograd adopted as .grad (the next
        # micro-batch's replay would overwrite it).
        self.cuda_graphs = (
            self.train_cfg.compile and self.train_cfg.compile_mode == "reduce-overhead"
        )
        if self.cuda_graphs:
            for param in self.trainable_params:
                param.grad = torch.zeros_like(param)
        self.ema = EMA(model, self.train_cfg.ema.decay) if self.train_cfg.ema.enabled else None
        self.step = 0
        self.saved: tuple[int, Path] | None = None  # the newest resumable checkpoint: step, folder
        self.tokens_seen = 0
        self.best_metric: float | None = None
        self.initial_val_loss: float | None = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0
        # [skipped in total, skipped in a row], counted on the device, read when the loop checks.
        self.skip_counts = torch.zeros(2, device=device)
        # A fused optimizer skips an update itself when told so by a device flag (found_inf,
        # the path GradScaler uses): then the step needs no host sync and the loop reads the
        # counts at log steps only. Others (foreach, Muon) decide on the host every step.
        self.skip_on_device = (
            self.train_cfg.nonfinite.decide == "auto"
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
            and not self.scaler.is_enabled()
        )
        self.data_wait = 0.0  # seconds this window spent waiting for batches
        self.pending_tokens = 0  # this rank's, since tokens_seen was last brought up to date
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.early_best: float | None = None
        self.evals_without_improvement = 0
        self.peak_flops = peak_flops(device, self.dtype)
        # A task that draws pictures of its progress (image generation) says how often.
        self.sample_every = getattr(self.task, "sample_every", 0)
        # What count_tokens counts, which names the throughput metrics (images/s for a
        # diffusion model), and whether the loss is a cross-entropy that perplexity is exp of.
        self.unit = task_unit(task)
        self.reports_perplexity = getattr(task, "reports_perplexity", True)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        max_steps = self.train_cfg.max_steps
        if self.step >= max_steps:
            self.log(
                f"nothing to train: the run is at step {self.step} and training.max_steps is "
                f"{max_steps}; raise max_steps (--set training.max_steps=N) to train on"
            )
        self._emit("on_train_start", self.step, max_steps)
        last_eval = None
        if self.val_batches and self.step == 0:
            last_eval = self.evaluate()
            self.initial_val_loss = last_eval["val_loss"]
            self._emit("on_eval", self.step, last_eval)
        window_start, window_tokens = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)  # over the window's applied updates
        applied = torch.zeros((), device=self.device)
        run_start, start_tokens = time.perf_counter(), self.tokens_seen
        stopped_early = stopped = False
        stop_vote = distributed.StopVote()
        with StopRequested() as stop:
            while self.step < max_steps:
                loss, grad_norm, tokens, skipped = self.train_step()
                self.step += 1
                self.pending_tokens += tokens
                loss_sum += torch.where(skipped, 0.0, loss)
                applied += (~skipped).float()
                logged = self.step % self.train_cfg.log_every == 0 or self.step == max_steps
                evaluated = bool(self.val_batches) and (
                    self.step % self.train_cfg.eval_every == 0 or self.step == max_steps
                )
                sampled = bool(self.sample_every) and (
                    self.step % self.sample_every == 0 or self.step == max_steps
                )
                saves = self.step % self.config.checkpoint.save_every == 0 or self.step == max_steps
                due = logged or evaluated or sampled or saves
                # The loop reads the device only here (every step when the host decides skips).
                if (due or not self.skip_on_device) and self.check_nonfinite():
                    continue  # rolled back: self.step is the checkpoint's step again
                if due:
                    window_tokens += self._count_tokens()
                if logged:
                    metrics = self._train_metrics(
                        loss_sum / applied.clamp(min=1.0), grad_norm, window_tokens, window_start
                    )
                    self._emit("on_step_end", self.step, metrics)
                    window_start, window_tokens, self.data_wait = time.perf_counter(), 0, 0.0
                    loss_sum.zero_()
                    applied.zero_()
                stopped = stop_vote.cast(stop.requested)
                if stopped and not due:  # asked between log steps: the checkpoint needs counts
                    if self.check_nonfinite():
                        continue
                    window_tokens += self._count_tokens()
                # Evaluation, samples and saves are not training: the throughput of the next
                # log line leaves their time out.
                pause_start = time.perf_counter()
                if evaluated:
                    last_eval = self.evaluate()
                    self._emit("on_eval", self.step, last_eval)
                    self.maybe_save_best(last_eval)
                    stopped_early = self.should_stop_early(last_eval)
                if sampled:
                    self.draw_samples()
                ends = stopped or self.step == max_steps
                if ends and not self.val_batches:
                    # Nothing to select by: best/ is the final model, written before the
                    # checkpoint that ends the run, so a kill between the two leaves a resume
                    # that writes both again, never a best/ older than last/.
                    self.save_model_only("best")
                if saves or stopped_early or stopped:
                    self.save_resumable()
                window_start += time.perf_counter() - pause_start
                if stopped_early:
                    self.log(
                        f"early stopping at step {self.step}: no improvement in "
                        f"{self.evals_without_improvement} evaluations"
                    )
                    break
                if stopped:
                    self.log(
                        f"stopped at step {self.step} on request; checkpoint saved. "
                        "Continue with --resume."
                    )
                    break
            stop_vote.finish()
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
            interrupted=stopped,
        )

    def _count_tokens(self) -> int:
        """Move the tokens of the steps since the last call (all ranks) into tokens_seen."""
        tokens = distributed.sum_over_ranks(self.pending_tokens, self.device)
        self.pending_tokens = 0
        self.tokens_seen += tokens
        return tokens

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum_steps micro-batches (on every rank).

        A non-finite loss or gradient norm skips the update: the weights and optimizer state
        are left as they were, and every rank sees the same verdict (the loss and the gradients
        it is read from are already reduced over the ranks). A fused optimizer takes the
        verdict as a device flag, so the step never waits for the GPU; otherwise the verdict is
        read on the host (one sync per step, the price of never applying a NaN update).
        """
        self.model.train()
        loss, tokens = self.accumulate_gradients()
        self.scaler.unscale_(self.optimizer)
        grad_norm = distributed.grad_norm(self.trainable_params)
        if self.train_cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(
                self.trainable_params, self.train_cfg.grad_clip, grad_norm
            )
        if self._wants_histograms():
            self._emit("on_gradients", self.step + 1, self.model)
        skipped = ~torch.isfinite(loss)
        # With fp16 an infinite gradient is the scaler's business (it skips the step itself and
        # lowers the scale).
        if not self.scaler.is_enabled():
            skipped |= ~torch.isfinite(grad_norm.to(skipped.device))
        ema_due = self.ema is not None and (self.step + 1) % self.train_cfg.ema.every == 0
        if self.skip_on_device:
            self.optimizer.found_inf = skipped.float()  # read by the fused kernel
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
            if ema_due:
                self.ema.update(gate=~skipped)
        elif not bool(skipped):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if ema_due:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        self.scheduler.step()
        total, in_a_row = self.skip_counts.unbind()
        self.skip_counts = torch.stack([total + skipped, (in_a_row + 1) * skipped])
        return StepResult(loss, grad_norm, tokens, skipped)

    def accumulate_gradients(self) -> tuple[torch.Tensor, int]:
        """Forward and backward over the step's micro-batches; returns the loss over all ranks
        (a device tensor, read on the host only when the loop checks) and this rank's tokens.

        Every target of the step weighs the same, however micro-batches and ranks split them
        (SFT batches hold different numbers of answer tokens): each micro-batch adds its summed
        loss (mean x count), and the gradients are divided once by the step's target count,
        summed over the ranks. DDP and FSDP average gradients over the ranks; the world size
        in the factor turns that average back into the sum.
        """
        accum = self.train_cfg.grad_accum_steps
        # The most targets a language micro-batch holds: backward sees a loss of about the
        # size of a mean, not of a sum (a sum's gradients would overflow fp16 at once).
        unit = self.train_cfg.batch_size * self.config.data.max_seq_len
        loss_sum = torch.zeros((), device=self.device)
        targets = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(self.batches)
            self.data_wait += time.perf_counter() - waited
            batch = self._to_device(batch)
            # Gradients are reduced across ranks on the last micro-batch only.
            with gradient_sync(self.forward_model, self.world, enabled=micro == accum - 1):
                if self.cuda_graphs:  # the last replay's outputs are read: new ones may go there
                    torch.compiler.cudagraph_mark_step_begin()
                with self._autocast():
                    mean, count = self.task.loss(self.forward_model, batch)
                # A Python count multiplies as it is: a tensor made from it would wait for the GPU.
                if isinstance(count, torch.Tensor):
                    count = count.float()
                summed = mean * count
                self.scaler.scale(summed / unit).backward()
            loss_sum += summed.detach().float()
            targets += count
            tokens += self.task.count_tokens(batch)
        loss_sum, targets = distributed.all_reduce_sum(torch.stack([loss_sum, targets]))
        per_target = unit * self.world.size / targets.clamp(min=1.0)
        grads = [p.grad for p in self.trainable_params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, per_target)
        return loss_sum / targets.clamp(min=1.0), tokens

    def check_nonfinite(self) -> bool:
        """Read the skipped-update counts (a host sync); warn about new skips, and after
        `max_consecutive` in a row stop or roll back (returns True when rolled back)."""
        total, in_a_row = (int(v) for v in self.skip_counts.tolist())
        new = total - self.nonfinite_skipped
        self.nonfinite_skipped, self.nonfinite_in_a_row = total, in_a_row
        if new == 0:
            return False
        self.log(
            f"warning: step {self.step}: {new} update{'s' * (new > 1)} skipped for a non-finite "
            f"loss or gradient norm ({in_a_row} in a row, {total} in total)"
        )
        nonfinite = self.train_cfg.nonfinite
        if in_a_row < nonfinite.max_consecutive:
            return False
        if nonfinite.action == "stop" or self.rollbacks >= nonfinite.max_rollbacks:
            folder = find_resumable(self.checkpoints, self.log) if self.world.is_main else None
            where = f"the last good checkpoint is {folder}" if folder else "no checkpoint yet"
            raise TrainingError(
                f"{in_a_row} non-finite updates in a row at step {self.step} "
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
        found = distributed.from_main(lambda: find_resumable(self.checkpoints, self.log))
        if found is None:
            raise TrainingError(
                f"non-finite updates at step {self.step} and no checkpoint to roll back to; "
                "lower optim.lr or checkpoint.save_every"
            )
        folder = Path(found)
        data_position = self.batches.state_dict()
        skipped, rollbacks, lr_scale = self.nonfinite_skipped, self.rollbacks, self.lr_scale
        self.restore(Resumable(folder, read_train_state(folder)), load_weights=True)
        self.batches.load_state_dict(data_position)
        self.nonfinite_skipped, self.rollbacks = skipped, rollbacks + 1
        self.lr_scale = lr_scale * self.train_cfg.nonfinite.rollback_lr_factor
        factor = self.train_cfg.nonfinite.rollback_lr_factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.nonfinite_in_a_row = 0
        self.skip_counts = torch.tensor([float(skipped), 0.0], device=self.device)
        self.log(f"rolled back to {folder} (step {self.step}); learning rate x{self.lr_scale:g}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the same validation blocks every time (shared out among the ranks),
        and perplexity."""
        use_ema = self.ema is not None and self.train_cfg.ema.evaluate
        with self.ema.applied() if use_ema else contextlib.nullcontext():
            val_loss = mean_loss(
                self.task.loss,
                self.forward_model,
                self.val_batches,
                self.device,
                self.dtype,
                rank=self.world.rank,
                world_size=self.world.size,
            )
        if not self.reports_perplexity:
            return {"step": self.step, "val_loss": val_loss}
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
    # Every rank calls these. Under FSDP every rank writes its shard (sharded.py); otherwise
    # rank 0 writes the single-process format (model.safetensors + train_state.pt) alone.

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
        name = "last" if keep_last == 0 else step_folder_name(self.step)
        path = self._save(self.checkpoints / name, state)
        self.saved = (self.step, path)
        if self.world.is_main:
            if keep_last:
                path = link_checkpoint(path, self.checkpoints / "last")
            prune_step_checkpoints(self.checkpoints, keep_last, self.step)
            self._emit("on_checkpoint", self.step, path)
        return path

    def stopped_at_once(self) -> str:
        """Where the run stands when a Ctrl-C stops it at once, between step boundaries."""
        saved = self.saved
        # A Ctrl-C between a save's rename and its return leaves a newer folder than `saved`.
        on_disk = newest_on_disk(self.checkpoints)
        if on_disk is not None and (saved is None or on_disk[0] > saved[0]):
            saved = on_disk
        if saved is None:
            return f"stopped at step {self.step}, before its first checkpoint: nothing was saved"
        step, folder = saved
        if step >= self.train_cfg.max_steps:  # a Ctrl-C in the last lines the run prints
            return f"interrupted after training finished at step {step}; it is saved in {folder}"
        unsaved = f" (steps {step + 1}-{self.step} were not saved)" if self.step > step else ""
        return (
            f"stopped at step {self.step}{unsaved}; the newest checkpoint is step {step}, "
            f"{folder}: --resume continues from it"
        )

    def save_model_only(self, name: str) -> Path:
        path = self._save(self.checkpoints / name, None)
        self._emit("on_checkpoint", self.step, path)
        return path

    def _save(self, folder: Path, state: dict[str, Any] | None) -> Path:
        if self.world.parallel == "fsdp":
            optimizer = self.optimizer if state is not None else None
            # The EMA's averages are sharded like the weights: into the shards with them.
            ema = state is not None and self.ema is not None
            extra = {"ema": self.ema.named_shadow()} if ema else None
            return save_sharded(
                folder, self.model, optimizer, state, self._write_config, self.world.is_main, extra
            )
        if self.world.is_main:
            save_checkpoint(folder, self._write_model, state)
        return folder

    def _write_model(self, folder: Path) -> None:
        self.task.save(self.model, self.data, folder)
        self._write_config(folder)

    def _write_config(self, folder: Path) -> None:
        # What this checkpoint was trained with, for the resume check (run_folder.py).
        (folder / RUN_CONFIG).write_text(self.config.to_yaml())

    def train_state(self) -> dict[str, Any]:
        """What a resume needs beside the weights. Under FSDP the optimizer state is in the
        shards. With more than one rank, every rank's RNG state is kept (a collective)."""
        rng = rng_state()
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_metric": self.best_metric,
            "initial_val_loss": self.initial_val_loss,
            "optimizer": None if self.world.parallel == "fsdp" else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.batches.state_dict(),
            "world_size": self.world.size,
            # What micro_batch auto chose: the data position above counts these micro-batches.
            "micro_batch": {
                "batch_size": self.train_cfg.batch_size,
                "grad_accum_steps": self.train_cfg.grad_accum_steps,
            },
            "rng": rng,
            "ema": self._ema_state(),
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
        if self.world.size > 1:
            state["rng_by_rank"] = distributed.gather(rng)
            # Streamed data (webdataset) has a position per rank; epoch batches share one.
            state["data_by_rank"] = distributed.gather(state["data"])
        return state

    def restore(self, checkpoint: Resumable, load_weights: bool = False) -> None:
        """Continue from a checkpoint's training state (and its weights, when asked; a sharded
        checkpoint always loads them, with the optimizer state, at any world size)."""
        folder, state = checkpoint.folder, checkpoint.state
        ema_in_shards = bool(state["ema"] and state["ema"].get("in_shards"))
        if checkpoint.sharded:
            load_ema = self.ema is not None and ema_in_shards
            extra = {"ema": self.ema.named_shadow()} if load_ema else None
            load_sharded(folder, self.model, self.optimizer, extra)
        elif self.world.parallel == "fsdp":
            raise CheckpointError(
                f"{folder} was written without FSDP; resume it with training.parallel: ddp or "
                "none (FSDP resumes its own sharded checkpoints, at any number of processes)"
            )
        else:
            if load_weights:
                reloaded = self.task.load_model(folder, self.device)
                own = self.model.state_dict()
                own.update({k: v for k, v in reloaded.state_dict().items() if k in own})
                self.model.load_state_dict(own)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.saved = (self.step, folder)
        self.tokens_seen = int(state["tokens_seen"])
        self.pending_tokens = 0
        self.best_metric = state["best_metric"]
        self.initial_val_loss = state["initial_val_loss"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        by_rank = state.get("rng_by_rank")
        same_world = by_rank is not None and len(by_rank) == self.world.size
        note = global_batch_note(
            state, self.train_cfg.batch_size, self.train_cfg.grad_accum_steps, self.world.size
        )
        if note:
            self.log(note)
        data_by_rank = state.get("data_by_rank")
        self.batches.load_state_dict(
            data_by_rank[self.world.rank] if same_world and data_by_rank else state["data"]
        )
        set_rng_state(by_rank[self.world.rank] if same_world else state["rng"])
        if self.ema is not None:
            if state["ema"] is None:
                self.log("warning: the checkpoint has no EMA state; the average restarts here")
                self.ema = EMA(self.model, self.train_cfg.ema.decay)
            elif not ema_in_shards:  # in the shards: load_sharded filled it above
                self.ema.load_state_dict(state["ema"])
        early = state["early_stopping"]
        self.early_best = early["best"]
        self.evals_without_improvement = early["evals_without_improvement"]
        self.nonfinite_skipped = state["nonfinite"]["skipped"]
        self.skip_counts = torch.tensor([float(self.nonfinite_skipped), 0.0], device=self.device)
        self.rollbacks = state["nonfinite"]["rollbacks"]
        self.lr_scale = state["nonfinite"]["lr_scale"]

    # -- details ---------------------------------------------------------------------------

    def _ema_state(self) -> dict[str, Any] | None:
        """The EMA in the training state; under FSDP its averages go into the shards."""
        if self.ema is None:
            return None
        if self.world.parallel == "fsdp":
            return {"decay": self.ema.decay, "in_shards": True}
        return self.ema.state_dict()

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
        seconds = max(time.perf_counter() - window_start, 1e-9)
        tokens_per_second = window_tokens / seconds
        metrics: dict[str, float] = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            f"{self.unit}_per_second": tokens_per_second,
            f"{self.unit}_seen": self.tokens_seen,
            # The share of the window the loop waited for batches (the loader's workers and
            # pinned memory should keep it near 0).
            "data_wait": self.data_wait / seconds,
        }
        if grad_norm is not None and self.train_cfg.grad_clip is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.nonfinite_skipped:
            metrics["nonfinite_skipped"] = self.nonfinite_skipped
        flops_per_token = self.task.flops_per_token(self.model) if self.peak_flops else None
        if flops_per_token is not None:
            # Tokens of all ranks over the peak of all their accelerators.
            peak = self.peak_flops * self.world.size
            metrics["mfu"] = flops_per_token * tokens_per_second / peak
        if self.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _emit(self, event: str, *args: Any) -> None:
        # A user's callback has any of the events' methods, not necessarily all (callbacks.py).
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(*args)

    def log(self, message: str) -> None:
        self._emit("on_log", message)

"""`training.micro_batch: auto`: the largest micro-batch that fits in GPU memory, for a given
global batch.

The global batch per rank (batch_size x grad_accum_steps) is what is trained and stays as
given; only how it is cut into micro-batches changes. `largest_fitting_divisor` is the search (a
predicate in, a divisor out); `MemoryProbe` is the predicate on CUDA: a real forward and backward
of the model on m sequences of `data.max_seq_len` tokens, with room left for what a probe does
not allocate. `resolve_split` decides a run's split: as given (micro_batch empty, or no GPU to
probe), as its checkpoint chose (a resume: the data position counts micro-batches), or probed
and agreed by every rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from truthgpt.config import Config
from truthgpt.data import PreparedData
from truthgpt.errors import CheckpointError, TrainingError
from truthgpt.hardware import resolve_precision
from truthgpt.training import distributed
from truthgpt.training.distributed import World
from truthgpt.training.rng import rng_state, set_rng_state
from truthgpt.training.tasks import Task

# Kept free beyond what the probe measures: the allocator's fragmentation, the workspaces of
# kernels the probe did not run (compile, the optimizer step), a data batch in flight.
MARGIN = 0.10
# AdamW keeps two fp32 tensors per trainable parameter (exp_avg, exp_avg_sq), made at the first
# step; the other optimizers keep as much or less.
OPTIMIZER_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class Split:
    """How a rank's global batch is cut: `batch_size` sequences per micro-batch, times
    `grad_accum_steps` micro-batches per optimizer step."""

    batch_size: int
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps

    def __str__(self) -> str:
        return f"{self.batch_size} x {self.grad_accum_steps} ({self.global_batch} per process)"


def divisors(n: int) -> list[int]:
    """The divisors of `n`, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def global_batch_note(
    state: dict[str, Any], batch_size: int, grad_accum_steps: int, world_size: int
) -> str | None:
    """On a resume: the line saying that the global batch changes (another number of
    processes, or accumulation), with the grad_accum_steps that keeps it; None if it stays.
    `state` is the checkpoint's train state."""
    split = state.get("micro_batch")
    if split is None:  # a checkpoint from before the train state kept its split
        return None
    saved_world = state.get("world_size", len(state.get("rng_by_rank") or [0]))
    saved = split["batch_size"] * split["grad_accum_steps"] * saved_world
    now = batch_size * grad_accum_steps * world_size
    if now == saved:
        return None
    keep = saved / (batch_size * world_size)
    advice = f"; --set training.grad_accum_steps={int(keep)} keeps it" if keep.is_integer() else ""
    return (
        f"note: the global batch changes from {saved} sequences per step ({saved_world} "
        f"process(es)) to {now} ({world_size}){advice}"
    )


def largest_fitting_divisor(global_batch: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor m of `global_batch` with `fits(m)`; 0 when not even 1 fits.

    Memory grows with m, so `fits` is taken as monotone: the whole batch is tried first (a
    model that fits takes one try), then a binary search over the divisors below it, at most
    1 + ceil(log2(number of divisors)) tries in all (4 for 64), each a forward and backward.
    """
    candidates = divisors(global_batch)
    if fits(candidates[-1]):
        return candidates[-1]
    best, low, high = 0, 0, len(candidates) - 1  # candidates[high] does not fit
    while low < high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            best, low = candidates[middle], middle + 1
        else:
            high = middle
    return best


class MemoryProbe:
    """`probe(m)`: whether a micro-batch of m sequences trains in this GPU's memory.

    One forward and backward of `model` (uncompiled, before DDP/FSDP wrap it) through the
    task's loss under the run's autocast, on m sequences of `data.max_seq_len` tokens, with
    every gradient already allocated as from an earlier micro-batch. It fits when its peak plus
    what the probe does not allocate (the optimizer state, EMA weights, DDP's gradient buckets)
    stays under the budget less MARGIN. Out of memory is a no. Every try frees its gradients
    and the cache and resets the peak-memory statistics (the run's peak_mem_gib is its own).
    Under FSDP the whole unsharded model is probed: a safe overestimate.
    """

    def __init__(
        self, config: Config, task: Task, data: PreparedData, model: nn.Module, world: World
    ) -> None:
        self.device = next(model.parameters()).device
        self.task = task
        self.model = model
        self.seq_len = config.data.max_seq_len
        self.dtype = resolve_precision(config.training.precision, self.device)
        # Packed SFT items carry document_ids (another attention mask): probe with every key.
        train = data.train
        keys = tuple(train[0]) if isinstance(train, Dataset) and len(train) else ()
        self.keys = keys or ("input_ids", "labels")
        self.params = [p for p in model.parameters() if p.requires_grad]
        # This rank's share (its shards under FSDP), in fp32: the most they take.
        param_bytes = sum(distributed.local_numel(p) * 4 for p in self.params)
        self.unprobed_bytes = param_bytes * OPTIMIZER_BYTES_PER_PARAM // 4
        if config.training.ema.enabled:
            self.unprobed_bytes += param_bytes  # an fp32 copy of the trainable weights
        if world.parallel == "ddp":
            self.unprobed_bytes += param_bytes  # buckets: a second copy of the gradients
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # What this process may hold: the free memory and what it holds already (the model),
        # capped by torch.cuda.set_per_process_memory_fraction, if set.
        fraction = torch.cuda.get_per_process_memory_fraction(self.device)
        held = torch.cuda.memory_reserved(self.device)
        self.budget_bytes = int(min(free + held, total * fraction))
        self.peak_bytes: dict[int, int | None] = {}  # by m tried; None: out of memory

    def __call__(self, m: int) -> bool:
        try:
            peak = self._forward_backward(m)
        except torch.OutOfMemoryError:
            peak = None
        # After the except clause: the traceback held the try's tensors until here.
        self.model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_bytes[m] = peak
        return peak is not None and peak + self.unprobed_bytes <= self.budget_bytes * (1 - MARGIN)

    def describe(self, m: int) -> str:
        """Where m was tried and what it took, for the log line and the error."""
        peak = self.peak_bytes.get(m, 0)  # 0: not tried here (another rank's answer)
        if peak is None:
            tried = f"a micro-batch of {m} ran out of memory; "
        elif peak:
            tried = f"the probe of {m} peaked at {peak / 2**30:.1f} GiB; "
        else:
            tried = ""
        return (
            f"{self.budget_bytes / 2**30:.1f} GiB on {self.device} ({tried}"
            f"{self.unprobed_bytes / 2**30:.2f} GiB more for the optimizer state, "
            f"{MARGIN:.0%} kept free)"
        )

    def _forward_backward(self, m: int) -> int:
        batch = {
            key: torch.zeros((m, self.seq_len), dtype=torch.long, device=self.device)
            for key in self.keys
        }
        for param in self.params:
            param.grad = torch.zeros_like(param)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            mean, _ = self.task.loss(self.model, batch)
        mean.backward()
        return torch.cuda.max_memory_allocated(self.device)


def memory_probe(
    config: Config, task: Task, data: PreparedData, model: nn.Module, world: World
) -> MemoryProbe | None:
    """The probe for `model`'s device; None where there is no memory to probe (CPU, MPS)."""
    if next(model.parameters()).device.type != "cuda":
        return None
    return MemoryProbe(config, task, data, model, world)


def resolve_split(
    config: Config,
    task: Task,
    data: PreparedData,
    model: nn.Module,
    world: World,
    log: Callable[[str], None],
    saved: dict[str, Any] | None = None,
) -> Split:
    """The split this run trains with: `training.batch_size` x `grad_accum_steps` unless
    `training.micro_batch` is auto; then the checkpoint's micro-batch on a resume (`saved`,
    the train state's "micro_batch"), else the largest that fits on every rank's GPU.

    Every rank calls this (the probe's answer is the smallest over the ranks). The probe
    leaves the RNG state as it found it, so a run's results do not depend on whether it probed.
    """
    training = config.training
    given = Split(training.batch_size, training.grad_accum_steps)
    if training.micro_batch is None:
        return given
    if saved is not None:
        # The data position counts micro-batches: a resume must cut them as the run did.
        batch_size = int(saved["batch_size"])
        if given.global_batch % batch_size:
            raise CheckpointError(
                f"training.micro_batch: auto chose micro-batches of {batch_size} for this run, "
                f"which do not divide the global batch {given} of the resumed config; set "
                "training.grad_accum_steps back, or start a new run"
            )
        split = Split(batch_size, given.global_batch // batch_size)
        log(f"micro_batch auto: {split}, as the checkpoint chose")
        return split
    if world.parallel == "fsdp" and world.size > 1:
        # A sharded forward gathers weights from every process: one process out of memory in
        # a probe would leave the others waiting in that collective.
        log(f"micro_batch auto: not probed across FSDP processes; keeping the given {given}")
        return given
    probe = memory_probe(config, task, data, model, world)
    if probe is None:
        log(f"micro_batch auto: no GPU memory to probe; keeping the given {given}")
        return given
    tries = 0

    def fits(m: int) -> bool:
        nonlocal tries
        tries += 1
        return probe(m)

    rng, start = rng_state(), time.perf_counter()
    try:
        batch_size = largest_fitting_divisor(given.global_batch, fits)
    finally:
        set_rng_state(rng)
    seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    batch_size = distributed.min_over_ranks(batch_size, device)
    if batch_size == 0:
        where = " on some process" if world.size > 1 else ""
        raise TrainingError(
            f"training.micro_batch: auto: not even 1 sequence of {config.data.max_seq_len} "
            f"tokens trains{where} in {probe.describe(1)}. {_less_memory_hint(config)}"
        )
    split = Split(batch_size, given.global_batch // batch_size)
    ranks = f", the smallest of {world.size} processes" if world.size > 1 else ""
    log(
        f"micro_batch auto: {split} fits in {probe.describe(batch_size)}; "
        f"{tries} probes in {seconds:.1f} s{ranks}"
    )
    return split


def _less_memory_hint(config: Config) -> str:
    steps = []
    if not config.training.gradient_checkpointing:
        steps.append("set training.gradient_checkpointing: true")
    # auto is already on where the probe runs (CUDA, with the Triton kernel)
    if config.training.fused_loss is False and config.model.arch != "hf":
        steps.append("training.fused_loss: true")
    steps.append("lower data.max_seq_len, or shard the model (training.parallel: fsdp)")
    return "To fit: " + ", ".join(steps) + "."

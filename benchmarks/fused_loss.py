"""The LM head + cross-entropy of one micro-batch: ours (`training.fused_loss`) against the
plain compiled loss and Liger-Kernel's fused linear cross-entropy.

Every runner takes the same final hidden states [rows, hidden] and head weight [vocab, hidden]
and returns the mean loss over the targets that are not ignored; each step is its forward and
backward (gradients of the hidden states and of the weight), bf16 autocast on CUDA. Runners:

- plain: `torch.compile` of `F.cross_entropy((h @ w.T).float(), labels)`, the loss of our
  decoder with the switch off and of a compiled transformers model (the whole fp32 logits)
- chunked-torch: ours with the cross-entropy in PyTorch steps (what runs without Triton)
- chunked-triton: ours with the Triton cross-entropy kernel (what runs on CUDA)
- liger: `liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss` when it is installed

Runners take turns, --repeats times; each turn times --steps steps after --warmup (CUDA events).
Prints per runner the median step over the turns' medians with the min-max of those medians,
the peak memory above the inputs, the loss and the step time relative to `plain`.

    python benchmarks/fused_loss.py --shape gpt2 --repeats 3
    python benchmarks/fused_loss.py --shape llama --rows 8192 --chunk-rows 4096 8192

Shapes: gpt2 = GPT-2 small's head (hidden 768, vocabulary 50,304, 16 x 1024 rows); llama =
Llama-3.2-1B's hidden size with a 32,000 vocabulary (hidden 2048, 8 x 1024 rows). --tiny: a
small shape for a CPU smoke run (no Liger, no Triton kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

from truthgpt.models import fused_loss
from truthgpt.models.decoder import IGNORE_INDEX

SHAPES = {
    "gpt2": dict(hidden=768, vocab=50304, rows=16 * 1024),
    "llama": dict(hidden=2048, vocab=32000, rows=8 * 1024),
}
TINY = dict(hidden=64, vocab=1000, rows=512)


def plain(chunk_rows: int) -> Callable:
    def loss(hidden, weight, labels):
        return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)

    return torch.compile(loss)


def chunked(chunk_rows: int, kernel: bool) -> Callable:
    def loss(hidden, weight, labels):
        return fused_loss.linear_cross_entropy(
            hidden, weight, labels, IGNORE_INDEX, chunk_rows, kernel=kernel
        )

    return torch.compile(loss)


def liger(chunk_rows: int) -> Callable:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return lambda hidden, weight, labels: module(weight, hidden, labels)


RUNNERS = {
    "plain": plain,
    "chunked-torch": lambda chunk_rows: chunked(chunk_rows, kernel=False),
    "chunked-triton": lambda chunk_rows: chunked(chunk_rows, kernel=True),
    "liger": liger,
}


def inputs(shape: dict, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Hidden states as a trained model's final norm gives them, a GPT-2-scaled head, labels
    with one row in eight ignored (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(shape["rows"], shape["hidden"], generator=generator)
    weight = torch.randn(shape["vocab"], shape["hidden"], generator=generator) * 0.02
    labels = torch.randint(0, shape["vocab"], (shape["rows"],), generator=generator)
    labels[::8] = IGNORE_INDEX
    return (
        hidden.to(device).requires_grad_(),
        weight.to(device).requires_grad_(),
        labels.to(device),
    )


def measure(step: Callable, tensors: tuple, device: torch.device, steps: int, warmup: int) -> dict:
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    hidden, weight, labels = tensors
    seconds, loss, base = [], None, 0
    for index in range(steps):
        hidden.grad = weight.grad = None
        if index == warmup and cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        with autocast:
            loss = step(hidden, weight, labels)
        loss.backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            seconds.append(time.perf_counter() - began)
    return {
        "ms": statistics.median(seconds[warmup:]) * 1000,
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--rows", type=int, default=None, help="tokens per micro-batch")
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[4096])
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="steps per turn, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="turns of every runner")
    parser.add_argument("--tiny", action="store_true", help="a small shape (CPU smoke)")
    args = parser.parse_args()
    runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown runners {unknown}; choose from {', '.join(RUNNERS)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps} (and >= 0)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(TINY if args.tiny else SHAPES[args.shape])
    if args.rows:
        shape["rows"] = args.rows
    tensors = inputs(shape, device)
    # One setup per runner and chunk size (plain and liger do not chunk: one setup each).
    setups = []
    for name in runners:
        sizes = args.chunk_rows if name.startswith("chunked") else [args.chunk_rows[0]]
        setups += [(f"{name} {size}" if name.startswith("chunked") else name, name, size)
                   for size in sizes]  # fmt: skip
    turns: dict[str, list[dict]] = {label: [] for label, _, _ in setups}
    errors: dict[str, str] = {}
    built: dict[str, Callable] = {}
    for _ in range(args.repeats):
        for label, name, size in setups:
            if label in errors:
                continue
            try:
                if label not in built:
                    built[label] = RUNNERS[name](size)
                turns[label].append(measure(built[label], tensors, device, args.steps, args.warmup))
            except Exception as error:  # a runner that cannot run leaves its reason in the table
                traceback.print_exc()
                errors[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(
        f"\nhead + cross-entropy, forward + backward: {shape['rows']} rows x hidden "
        f"{shape['hidden']} x vocabulary {shape['vocab']}, {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
        + f", torch {torch.__version__}, {args.repeats} turns of {args.steps - args.warmup} steps"
    )
    print("| runner | ms per step (min-max of turns) | peak GiB | loss | vs plain |")
    print("| --- | --- | --- | --- | --- |")
    plain_ms = statistics.median(t["ms"] for t in turns["plain"]) if turns.get("plain") else None
    for label, _, _ in setups:
        if label in errors:
            print(f"| {label} | {errors[label]} | | | |")
            continue
        times = [t["ms"] for t in turns[label]]
        ms = statistics.median(times)
        peak = turns[label][-1]["peak_gib"]
        ratio = f"{plain_ms / ms:.2f}x" if plain_ms else "-"
        print(
            f"| {label} | {ms:.2f} ({min(times):.2f}-{max(times):.2f}) | "
            f"{'-' if peak is None else f'{peak:.2f}'} | {turns[label][-1]['loss']:.4f} | {ratio} |"
        )


if __name__ == "__main__":
    main()

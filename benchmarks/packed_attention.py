"""Packed documents: FlexAttention's block mask against the dense attention mask.

One model (built once, saved with `save_hf`, opened by every runner) runs forward + backward on
the same packed batch: rows of --seq-len tokens holding documents of random lengths (uniform in
1..2 x --mean-doc, the last one of a row cut to fit), bf16 autocast on CUDA. Runners:

- flex: ours, `training.packed_attention: flex` (one BlockMask per forward, compiled
  flex_attention)
- dense: ours, `training.packed_attention: dense` (a boolean [B, 1, T, T] mask for SDPA, which
  then cannot take its flash kernel)
- hf-sdpa: transformers' model with packed position_ids (restarting at 0 per document), which it
  turns into the same boolean mask for SDPA
- hf-flex: the same with attn_implementation="flex_attention" (its own BlockMask)

Prints for each runner and sequence length the median forward + backward time (CUDA events,
min-max spread over --steps timed iterations after --warmup, compilation included there),
tokens/s, peak GPU memory, the loss (the same for all, to bf16 rounding) and the runner's time
over flex's. A runner that fails leaves an error in its row.

    python benchmarks/packed_attention.py --shape gpt2 --seq-lens 2048 4096
    python benchmarks/packed_attention.py --shape llama --seq-lens 2048 4096 --batch-size 4

Shapes: gpt2 = GPT-2 small (124M); llama = Llama-3.2-1B's layers (hidden 2048, 16 layers,
32 query / 8 kv heads) with a 32000-token vocabulary. --tiny: a tiny model of the shape at
seq 100 (no multiple of FlexAttention's 128-token tile), a smoke test that runs on CPU, where
FlexAttention has no backward and the flex runners are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.hf_io import load_hf, save_hf
from truthgpt.quiet import no_load_save_bars

RUNNERS = ("flex", "dense", "hf-sdpa", "hf-flex")
SHAPES = {
    "gpt2": dict(family="gpt2", vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12),
    "llama": dict(
        family="llama",
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
    ),
}
TINY = {
    "gpt2": dict(family="gpt2", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4),
    "llama": dict(
        family="llama",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    ),
}


def packed_batch(
    rows: int, seq_len: int, mean_doc: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """input_ids, document_ids (our packing) and position_ids (HF's), each [rows, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    document_ids, position_ids = [], []
    for _ in range(rows):
        lengths: list[int] = []
        while sum(lengths) < seq_len:
            length = int(torch.randint(1, 2 * mean_doc, (1,), generator=generator))
            lengths.append(min(length, seq_len - sum(lengths)))
        document_ids.append(
            torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        )
        position_ids.append(torch.cat([torch.arange(length) for length in lengths]))
    input_ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    return {
        "input_ids": input_ids,
        "document_ids": torch.stack(document_ids),
        "position_ids": torch.stack(position_ids),
    }


def ours(folder: Path, device: torch.device, packed_attention: str) -> Callable:
    model = load_hf(folder, device=device).train()
    model.packed_attention = packed_attention

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        return model(ids, ids, document_ids=batch["document_ids"]).loss

    return step


def hf(folder: Path, device: torch.device, attn_implementation: str) -> Callable:
    with no_load_save_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation=attn_implementation
        )
    model = model.to(device).train()

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        return model(
            input_ids=ids, labels=ids, position_ids=batch["position_ids"], use_cache=False
        ).loss

    return step


BUILD = {
    "flex": lambda folder, device: ours(folder, device, "flex"),
    "dense": lambda folder, device: ours(folder, device, "dense"),
    "hf-sdpa": lambda folder, device: hf(folder, device, "sdpa"),
    "hf-flex": lambda folder, device: hf(folder, device, "flex_attention"),
}


def measure(
    name: str, folder: Path, batch: dict, device: torch.device, steps: int, warmup: int
) -> dict:
    """Forward + backward `steps` times; the times and peak memory of those after `warmup`."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    step = BUILD[name](folder, device)
    batch = {key: value.to(device) for key, value in batch.items()}
    seconds, loss = [], None
    for index in range(steps):
        if index == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        with autocast:
            loss = step(batch)
        loss.backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            seconds.append(time.perf_counter() - began)
    timed = seconds[warmup:]
    return {
        "median_ms": statistics.median(timed) * 1000,
        "min_ms": min(timed) * 1000,
        "max_ms": max(timed) * 1000,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": float(loss),
    }


def free_memory() -> None:
    """Drop what the last runner left (its model, cached blocks, compiled graphs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch-size", type=int, default=None, help="rows; default 8 (llama 4)")
    parser.add_argument("--mean-doc", type=int, default=300, help="mean document length")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="iterations, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny model at seq 100 (CPU smoke)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    runners = [name.strip() for name in args.runners.split(",") if name.strip()]
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown runners {unknown}; choose from {', '.join(RUNNERS)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps} (and >= 0)")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = (TINY if args.tiny else SHAPES)[args.shape]
    seq_lens = [100] if args.tiny else args.seq_lens
    batch_size = args.batch_size or (2 if args.tiny else 4 if args.shape == "llama" else 8)
    mean_doc = 30 if args.tiny else args.mean_doc
    if not cuda:  # torch has no CPU backward for FlexAttention
        runners = [name for name in runners if not name.endswith("flex")]
    torch.backends.cuda.matmul.allow_tf32 = True
    run = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "tiny": args.tiny,
        "batch_size": batch_size,
        "mean_doc": mean_doc,
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        torch.manual_seed(0)
        model = Decoder(DecoderConfig(**shape, max_position_embeddings=max(seq_lens)))
        save_hf(model, folder)
        run["parameters"] = sum(p.numel() for p in model.parameters())
        del model
        print_run(run)
        for seq_len in seq_lens:
            batch = packed_batch(batch_size, seq_len, mean_doc, shape["vocab_size"])
            documents = int(batch["document_ids"].max(dim=1).values.sum()) + batch_size
            for name in runners:
                row = {"runner": name, "seq_len": seq_len, "documents": documents}
                try:
                    row.update(measure(name, folder, batch, device, args.steps, args.warmup))
                    row["tokens_per_second"] = batch_size * seq_len / (row["median_ms"] / 1000)
                except Exception as exc:  # noqa: BLE001 - a failed runner is a row, not the end
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                free_memory()
                rows.append(row)
                print(format_row(row, rows), flush=True)
                if args.json:  # after each runner: a run cut short still leaves its rows
                    args.json.write_text(json.dumps({**run, "rows": rows}, indent=1) + "\n")
    print()
    print_run(run)
    print_table(rows)


def print_run(run: dict) -> None:
    print(
        f"{run['device']}, torch {run['torch']}, transformers {run['transformers']}; "
        f"{run['shape']}{' (tiny)' if run['tiny'] else ''}: {run['parameters'] / 1e6:,.1f}M "
        f"parameters; {run['batch_size']} rows, documents of mean length {run['mean_doc']}; "
        "forward + backward, bf16 autocast on CUDA",
        flush=True,
    )


HEADER = (
    f"{'runner':<8} {'seq':>5} {'docs':>5} {'median ms (min-max)':>24} {'tokens/s':>10} "
    f"{'peak GiB':>8} {'loss':>8} {'/ flex':>7}"
)


def format_row(row: dict, rows: list[dict]) -> str:
    start = f"{row['runner']:<8} {row['seq_len']:>5} {row['documents']:>5}"
    if "error" in row:
        return f"{start} error: {row['error']}"
    spread = f"{row['median_ms']:.1f} ({row['min_ms']:.1f}-{row['max_ms']:.1f})"
    peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
    flex = next((r for r in rows if r["runner"] == "flex" and r["seq_len"] == row["seq_len"]), None)
    ratio = f"{row['median_ms'] / flex['median_ms']:.2f}x" if flex and "error" not in flex else "-"
    return (
        f"{start} {spread:>24} {row['tokens_per_second']:>10,.0f} {peak:>8} "
        f"{row['loss']:>8.4f} {ratio:>7}"
    )


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    for row in rows:
        print(format_row(row, rows))


if __name__ == "__main__":
    main()

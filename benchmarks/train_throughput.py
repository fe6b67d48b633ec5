"""Training throughput: truthgpt's Trainer vs Hugging Face Trainer on the same GPT-2 model.

Both train GPT-2 small (124M, seq 1024) in bf16 on the same packed blocks with AdamW, the same
micro-batch and accumulation, for the same number of optimizer steps; the first steps are
warm-up and not timed. Prints tokens/s, MFU and peak GPU memory for each and the ratio.

    python benchmarks/train_throughput.py --steps 40 --warmup 10 [--compile]

Needs a CUDA GPU (runs on CPU with --tiny for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from truthgpt.config import load
from truthgpt.hardware import PEAK_BF16_FLOPS
from truthgpt.models.hf_io import save_hf
from truthgpt.training.trainer import Trainer, build_model, prepare_run_dir


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_section(tiny: bool) -> dict:
    if tiny:
        return {
            "arch": "gpt2",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "max_position_embeddings": 128,
            "vocab_size": 512,
        }
    return {
        "arch": "gpt2",
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "max_position_embeddings": 1024,
        "vocab_size": 50304,
    }


class RandomBlocks(torch.utils.data.Dataset):
    """Fixed random token blocks: the same data for both trainers, no tokenizer in the timing."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_ours(args, workdir: Path, dataset: RandomBlocks) -> dict:
    raw = {
        "run_name": "ours",
        "output_dir": str(workdir),
        "model": model_section(args.tiny),
        "data": {"max_seq_len": args.seq_len},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum_steps": args.accum,
            "precision": args.precision if torch.cuda.is_available() else "fp32",
            "compile": args.compile,
            "log_every": 10_000,
            "eval_every": 10_000,
        },
        "checkpoint": {"save_every": 10_000},
        "logging": {"progress": "none", "tensorboard": False, "plot": False},
    }
    config = load(raw, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, vocab_size=config.model.vocab_size).to(device)

    class Data:  # what the Trainer reads from PreparedData
        tokenizer = None
        train = dataset
        val = None

    prepare_run_dir(config, overwrite=True)
    run_dir = config.run_dir
    trainer = Trainer(config, model, Data, device, run_dir, callbacks=[])
    times = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = float(trainer.train_step().loss)
        times.append(time.perf_counter() - start)
        if step + 1 == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    if args.profile:
        profile_steps(trainer, device)
    timed = sum(times[args.warmup :])
    tokens_per_step = args.batch_size * args.accum * args.seq_len
    tps = tokens_per_step * (args.steps - args.warmup) / timed
    flops = model.flops_per_token(args.seq_len) * tps
    return {
        "tokens_per_second": tps,
        "flops_per_second": flops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0,
        "loss": float(loss),
    }


def profile_steps(trainer, device: torch.device, steps: int = 3) -> None:
    """Where the time of a few more steps goes: the kernels by total device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


def run_hf(args, workdir: Path, dataset: RandomBlocks) -> dict:
    from transformers import (
        AutoModelForCausalLM,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers import (
        Trainer as HFTrainer,
    )

    # Same weights layout and init source: build ours, save as HF, open with transformers.
    config = load({"model": model_section(args.tiny)})
    folder = workdir / "hf_model"
    save_hf(build_model(config, vocab_size=config.model.vocab_size), folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            if len(self.times) == args.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    timer = Timer()
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf_out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accum,
        learning_rate=6e-4,
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        bf16=args.precision == "bf16" and torch.cuda.is_available(),
        max_grad_norm=1.0,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=2,
        torch_compile=args.compile,
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        use_cpu=not torch.cuda.is_available(),
    )
    HFTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer]).train()
    timed = sum(timer.times[args.warmup :])
    tps = args.batch_size * args.accum * args.seq_len * (len(timer.times) - args.warmup) / timed
    return {
        "tokens_per_second": tps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--set", action="append", default=[], help="a truthgpt config override, key=value"
    )
    parser.add_argument("--profile", action="store_true", help="print the top kernels")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.batch_size, args.accum = 64, 4, 1
    torch.backends.cuda.matmul.allow_tf32 = True
    vocab = model_section(args.tiny)["vocab_size"]
    dataset = RandomBlocks(
        args.steps * args.batch_size * args.accum + 64,
        args.seq_len,
        50257 if not args.tiny else vocab,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ours = run_ours(args, workdir, dataset)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        hf = None if args.skip_hf else run_hf(args, workdir, dataset)
    peak = peak_flops()
    rows = [("truthgpt", ours)] + ([("HF Trainer", hf)] if hf else [])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\n{device}, torch {torch.__version__}, {args.precision}, compile={args.compile}, "
        f"batch {args.batch_size}x{args.accum}x{args.seq_len}"
    )
    print(f"{'trainer':<12} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9}")
    for name, r in rows:
        flops = ours["flops_per_second"] / ours["tokens_per_second"] * r["tokens_per_second"]
        mfu = f"{flops / peak:.1%}" if peak else "-"
        print(f"{name:<12} {r['tokens_per_second']:>12,.0f} {mfu:>7} {r['peak_mem_gib']:>9.2f}")
    if hf:
        print(
            "ratio truthgpt / HF Trainer: "
            f"{ours['tokens_per_second'] / hf['tokens_per_second']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "hf": hf, "device": device}, indent=1))


if __name__ == "__main__":
    main()

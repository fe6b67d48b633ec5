"""Muon vs AdamW: the same model, data, batches and steps, trained once with each optimizer.

Both runs start from the same initial weights and see the same batches in the same order (one
`prepare_data` for both: the Python standard library's source, a BPE trained on it); only
`optim.name` differs. Validation loss is measured on the same held-out blocks every
`--eval-every` steps. Prints, as it goes, each evaluation; at the end, for each optimizer, the
final validation loss and the training time (evaluation excluded) and steps to reach a target
validation loss, and the ratio of those times.

The target is `--target`, or else the higher of the two final validation losses, so that both
runs reach it; between two evaluations the crossing is interpolated linearly.

    python benchmarks/muon_vs_adamw.py                 # GPU: GPT-2 small shape, ~4 minutes
    python benchmarks/muon_vs_adamw.py --tiny          # CPU smoke run, under a minute

Default shape: GPT-2 small (12 layers, 768 wide, 12 heads, seq 1024) with an 8192-token BPE
(so ~92M parameters rather than 124M), batch 16 x 1024 tokens, 500 steps (~8M tokens, about one
epoch of the ~31 MB stdlib corpus), bf16 on CUDA. AdamW: lr 6e-4, betas (0.9, 0.95), weight
decay 0.1. Muon: `optim.muon_lr` 0.02, momentum 0.95, its AdamW part as the AdamW run. Both:
warm-up then cosine to 0.1x, grad clip 1.0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from truthgpt.config import Config, load
from truthgpt.data import PreparedData, prepare_data
from truthgpt.training.trainer import Trainer, build_model


def raw_config(args: argparse.Namespace, workdir: Path, optimizer: str) -> dict:
    if args.tiny:
        model = {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4}
        data = {"max_documents": 80, "tokenizer": {"vocab_size": 512, "train_max_chars": 400_000}}
    else:
        model = {"arch": "gpt2", "hidden_size": 768, "num_layers": 12, "num_heads": 12}
        data = {"tokenizer": {"vocab_size": 8192, "train_max_chars": 10_000_000}}
    model["max_position_embeddings"] = args.seq_len
    return {
        "run_name": optimizer,
        "output_dir": str(workdir),
        "seed": args.seed,
        "model": model,
        "data": {"source": "python-stdlib", "max_seq_len": args.seq_len, **data},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "eval_batches": args.eval_batches,
            "compile": args.compile,
            "grad_clip": 1.0,
        },
        "optim": {
            "name": optimizer,
            "lr": args.lr,
            "muon_lr": args.muon_lr,
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "warmup_steps": args.warmup,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
        },
        "logging": {"progress": "none", "tensorboard": False, "plot": False},
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    name: str, config: Config, data: PreparedData, device: torch.device, eval_every: int
) -> dict:
    """Train `config` on `data`; returns the evaluations as (step, train seconds, val loss)."""
    torch.manual_seed(config.seed)  # the same initial weights for every optimizer
    model = build_model(config, vocab_size=len(data.tokenizer)).to(device)
    trainer = Trainer(config, model, data, device, config.run_dir, callbacks=[])
    steps = config.training.max_steps
    evals = [(0, 0.0, trainer.evaluate()["val_loss"])]
    print(f"{name:<6} step {0:>5}/{steps}  val_loss {evals[0][2]:.4f}", flush=True)
    train_seconds, tokens = 0.0, 0
    for step in range(1, steps + 1):
        synchronize(device)
        started = time.perf_counter()
        result = trainer.train_step()  # ends in a host sync (the non-finite check)
        synchronize(device)
        train_seconds += time.perf_counter() - started
        tokens += result.tokens
        if step % eval_every == 0 or step == steps:
            val_loss = trainer.evaluate()["val_loss"]
            evals.append((step, train_seconds, val_loss))
            print(
                f"{name:<6} step {step:>5}/{steps}  train_loss {float(result.loss):.4f}  "
                f"val_loss {val_loss:.4f}  train {train_seconds:6.1f}s  "
                f"{tokens / train_seconds:,.0f} tokens/s",
                flush=True,
            )
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "evals": evals,
        "final_val_loss": evals[-1][2],
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds,
    }


def time_to_target(evals: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
    """(step, train seconds) where the validation loss first reaches `target`, interpolated
    linearly between the two evaluations around the crossing; (inf, inf) if it never does."""
    for (step0, time0, loss0), (step1, time1, loss1) in zip(evals, evals[1:]):
        if loss1 <= target:
            share = 1.0 if loss0 <= loss1 else (loss0 - target) / (loss0 - loss1)
            share = min(max(share, 0.0), 1.0)
            return step0 + share * (step1 - step0), time0 + share * (time1 - time0)
    if evals and evals[0][2] <= target:
        return 0.0, 0.0
    return float("inf"), float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 500; tiny 60)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 16; tiny 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; tiny 64)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (25; tiny 10)")
    parser.add_argument("--eval-batches", type=int, default=16, help="batches per evaluation")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 50; tiny 5)")
    parser.add_argument("--lr", type=float, default=6e-4, help="AdamW lr (and Muon's AdamW part)")
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon's lr (hidden matrices)")
    parser.add_argument("--target", type=float, help="target val loss; default: the higher final")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    defaults = (60, 8, 64, 10, 5) if args.tiny else (500, 16, 1024, 25, 50)
    for key, default in zip(
        ("steps", "batch_size", "seq_len", "eval_every", "warmup"), defaults, strict=True
    ):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model gains nothing from more threads
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{where}, torch {torch.__version__}, {args.steps} steps of {args.batch_size} x "
        f"{args.seq_len} tokens, compile={args.compile}",
        flush=True,
    )

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        configs = {name: load(raw_config(args, workdir, name)) for name in ("adamw", "muon")}
        started = time.perf_counter()
        # One data preparation for both runs: the same tokenizer, blocks and batch order.
        data = prepare_data(configs["adamw"], workdir / "data", log=print)
        print(f"data ready in {time.perf_counter() - started:.0f}s", flush=True)
        for name, config in configs.items():
            results[name] = run(name, config, data, device, args.eval_every)

    target = args.target
    if target is None:
        target = max(r["final_val_loss"] for r in results.values())
    print(f"\ntarget val loss {target:.4f}")
    print(
        f"{'optimizer':<10} {'final val':>10} {'steps to target':>16} {'s to target':>12} "
        f"{'train s':>8} {'tokens/s':>12}"
    )
    for name, r in results.items():
        r["steps_to_target"], r["seconds_to_target"] = time_to_target(r["evals"], target)
        print(
            f"{name:<10} {r['final_val_loss']:>10.4f} {r['steps_to_target']:>16.1f} "
            f"{r['seconds_to_target']:>12.1f} {r['train_seconds']:>8.1f} "
            f"{r['tokens_per_second']:>12,.0f}"
        )
    adamw, muon = results["adamw"], results["muon"]
    ratio = adamw["seconds_to_target"] / muon["seconds_to_target"]
    print(
        f"time to target, adamw / muon: {ratio:.2f}x (above 1: muon gets there sooner); "
        f"steps {adamw['steps_to_target'] / muon['steps_to_target']:.2f}x; final val loss "
        f"muon - adamw: {muon['final_val_loss'] - adamw['final_val_loss']:+.4f}"
    )
    if args.json:
        summary = {"device": where, "torch": torch.__version__, "target": target, **results}
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

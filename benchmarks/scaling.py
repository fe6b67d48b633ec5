"""Multi-GPU scaling: truthgpt's Trainer on N processes (torchrun, DDP or FSDP2) against the
same Trainer on one GPU, per-GPU batch fixed (weak scaling, as llm.c and torchtitan report it).

Each setup runs in its own processes, launched as users launch them (`torch.distributed.run
--standalone --nproc-per-node N` for N > 1, a plain process with `training.parallel: none`
for the one-GPU baseline). Every rank trains the model of benchmarks/train_throughput.py's
shape on random token blocks, its micro-batch x accumulation as there, so N processes train
N times the tokens per step; rank 0 times its steps with CUDA events after the warm-up (the
gradient reduction makes every rank wait for the slowest, so rank 0's step is the step).

    python benchmarks/scaling.py --shape gpt2 --nproc 2 --parallel ddp --repeats 3
    python benchmarks/scaling.py --shape llama1b --nproc 2 --parallel fsdp ddp --steps 16 --warmup 6

Prints per setup tokens/s (median of the repeats, min-max), tokens/s per GPU, peak memory of
rank 0, and the scaling efficiency: tokens/s over N x the one-GPU tokens/s. Setups take turns,
so a slow spell of a shared machine falls on all of them. --tiny: a tiny model on CPU
processes (gloo), a smoke test of the launch and the arithmetic, not of speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# benchmarks/ is this script's folder: the shapes, the data and the step clock are shared.
from train_throughput import SHAPES, TINY_SHAPES, RandomBlocks, StepClock

from truthgpt.config import load
from truthgpt.data.prepare import PreparedData
from truthgpt.hardware import peak_flops
from truthgpt.training import distributed
from truthgpt.training.run_folder import prepare_run_dir
from truthgpt.training.trainer import Trainer, build_model


def raw_config(spec: dict, workdir: Path, rank: int) -> dict:
    shape = (TINY_SHAPES if spec["tiny"] else SHAPES)[spec["shape"]]
    return {
        "run_name": f"rank{rank}",
        "output_dir": str(workdir / "runs"),
        "model": shape.model,
        "data": {"max_seq_len": shape.seq_len},
        "training": {
            "max_steps": spec["steps"],
            "batch_size": shape.batch_size,
            "grad_accum_steps": shape.accum,
            "precision": "bf16" if torch.cuda.is_available() else "fp32",
            "compile": torch.cuda.is_available(),
            "parallel": spec["parallel"],
            "log_every": 10_000,
            "eval_every": 10_000,
        },
        "checkpoint": {"save_every": 10_000},
        "logging": {"progress": "none", "tensorboard": False, "plot": False},
    }


def worker(spec: dict) -> None:
    """One rank: train spec["steps"] steps, rank 0 writes its timings to spec["out"]."""
    workdir = Path(spec["workdir"])
    rank = int(os.environ.get("RANK", "0"))
    config = load(raw_config(spec, workdir, rank), spec["set"])
    cuda = torch.cuda.is_available()
    world, device = distributed.start(config, torch.device("cuda" if cuda else "cpu"))
    try:
        shape = (TINY_SHAPES if spec["tiny"] else SHAPES)[spec["shape"]]
        blocks = spec["steps"] * shape.batch_size * shape.accum * world.size + 64
        dataset = RandomBlocks(blocks, shape.seq_len, shape.token_ids)
        data = PreparedData(
            tokenizer=None, train=dataset, val=None, train_tokens=dataset.ids.numel(), val_tokens=0
        )
        torch.manual_seed(0)  # the same initial weights on every rank
        model = build_model(config, vocab_size=config.model.vocab_size)
        if world.parallel != "fsdp":  # FSDP places each shard itself
            model = model.to(device)
        prepare_run_dir(config, overwrite=True, log=lambda message: None)
        trainer = Trainer(config, model, data, device, config.run_dir, [], world=world)
        clock = StepClock(device)
        clock.start()
        for index in range(spec["steps"]):
            if index == spec["warmup"] and cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer.train_step()
            clock.lap()
        seconds = clock.seconds()[spec["warmup"] :]
        if world.is_main:
            tokens = shape.batch_size * shape.accum * shape.seq_len * world.size * len(seconds)
            result = {
                "tokens_per_second": tokens / sum(seconds),
                "step_ms": 1000 * statistics.median(seconds),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "flops_per_token": model.flops_per_token(shape.seq_len),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
            }
            Path(spec["out"]).write_text(json.dumps(result))
        # Leave without tearing torch down. With DDP the gloo group goes in the Reducer's
        # destructor when this frame ends, joining gloo's threads while holding the GIL, and a
        # thread still releasing a collective's tensors waits for the GIL: the smoke test hung
        # there (py-spy: ~ProcessGroupGloo in thread::join, runLoop in decref). A barrier, so
        # no rank leaves one still at work, then a plain exit.
        if world.grouped:
            torch.distributed.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        distributed.stop(world)


def launch(spec: dict, nproc: int) -> dict:
    """Run one setup in fresh processes; rank 0's result, or {"error": ...}."""
    env = {**os.environ}
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # CPU ranks share the cores
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(nproc), *script]
    Path(spec["out"]).unlink(missing_ok=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["out"]).is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error" in line), lines[-1:] or ["?"])
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": str(error)[:160]}
    return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) to scale to")
    parser.add_argument("--parallel", nargs="+", choices=["ddp", "fsdp"], default=["ddp"])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="turns of every setup")
    parser.add_argument("--set", action="append", default=[], help="a config override, key=value")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU processes (smoke)")
    parser.add_argument("--json", type=Path, help="also write the table's rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a rank's spec, from launch()
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps} (and >= 0)")
    if args.nproc < 2:
        parser.error(f"--nproc {args.nproc}: scaling needs at least 2 processes")
    gpus = torch.cuda.device_count()
    if not args.tiny and gpus < args.nproc:
        parser.error(f"--nproc {args.nproc} needs as many GPUs; this machine has {gpus} (--tiny)")

    setups = [("none", 1)] + [(parallel, args.nproc) for parallel in args.parallel]
    results: dict[tuple[str, int], list[dict]] = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for parallel, _ in setups:  # a typo in --set fails here, before any launch
            spec = {"shape": args.shape, "tiny": args.tiny, "steps": args.steps, "set": args.set}
            load(raw_config({**spec, "parallel": parallel}, Path(tmp), 0), args.set)
        for repeat in range(args.repeats):
            for parallel, nproc in setups:
                spec = {
                    "shape": args.shape,
                    "tiny": args.tiny,
                    "parallel": parallel,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "set": args.set,
                    "workdir": str(Path(tmp) / f"{parallel}{nproc}"),
                    "out": str(Path(tmp) / "result.json"),
                }
                result = launch(spec, nproc)
                results[(parallel, nproc)].append(result)
                said = result.get("error") or f"{result['tokens_per_second']:,.0f} tokens/s"
                print(f"-- {parallel} x {nproc} (repeat {repeat + 1}): {said}", flush=True)

    rows = []
    for (parallel, nproc), runs in results.items():
        good = [run for run in runs if "error" not in run]
        row = {"parallel": parallel, "nproc": nproc, "repeats": len(good)}
        if not good:
            row["error"] = runs[-1]["error"]
        else:
            speeds = [run["tokens_per_second"] for run in good]
            row.update(
                tokens_per_second=statistics.median(speeds),
                low=min(speeds),
                high=max(speeds),
                peak_gib=good[-1]["peak_gib"],
                device=good[-1]["device"],
                flops_per_token=good[-1]["flops_per_token"],
            )
        rows.append(row)
    base = rows[0].get("tokens_per_second")
    device = next((row["device"] for row in rows if "device" in row), "?")
    peak = peak_flops(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else None
    print(
        f"\n{args.shape}{' (tiny)' if args.tiny else ''} on {device}, torch {torch.__version__}; "
        f"{args.steps - args.warmup} timed steps after {args.warmup}, {args.repeats} turns; "
        "per-GPU batch fixed"
    )
    print("| setup | tokens/s (min-max) | per GPU | MFU | peak GiB (rank 0) | efficiency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        name = f"{row['parallel']} x {row['nproc']}" if row["nproc"] > 1 else "one GPU"
        if "error" in row:
            print(f"| {name} | failed: {row['error']} | | | | |")
            continue
        per_gpu = row["tokens_per_second"] / row["nproc"]
        mfu = f"{row['flops_per_token'] * per_gpu / peak:.1%}" if peak else "-"
        memory = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        efficiency = f"{per_gpu / base:.1%}" if base else "-"
        print(
            f"| {name} | {row['tokens_per_second']:,.0f} ({row['low']:,.0f}-{row['high']:,.0f}) "
            f"| {per_gpu:,.0f} | {mfu} | {memory} | {efficiency} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

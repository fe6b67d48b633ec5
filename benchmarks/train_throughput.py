"""Training throughput: truthgpt's Trainer against Hugging Face's Trainer and a hand-written loop.

Every runner trains the same model (built once, saved with `save_hf`, opened by each) on the
same random token blocks with AdamW, bf16 autocast, grad clip 1.0 and the same micro-batch and
accumulation, for the same number of optimizer steps; the first steps (compilation included)
are warm-up and not timed:

- truthgpt: our Trainer, torch.compile on (--no-compile: off)
- hf: transformers' Trainer, eager
- hf-compile: transformers' Trainer with torch_compile=True
- plain-compile: the tightest loop a user writes by hand over transformers' model:
  torch.compile, fused AdamW, loss / accum backward, no host sync inside the step

Shapes (--shape): gpt2 = GPT-2 small (124M, seq 1024, micro-batch 16 x accum 4); llama1b =
Llama-3.2-1B's layers in our llama arch with a 32000-token vocabulary instead of Llama 3's
128256 (1.0B parameters, seq 2048, 8 x 4). Prints for each runner tokens/s, MFU (our model's
FLOPs per token for all: it is the same model), peak GPU memory, the median step time with its
min-max spread, and truthgpt's speed over it. A runner that fails leaves an error in its row; one
out of memory is retried once at half the micro-batch and twice the accumulation.

    python benchmarks/train_throughput.py --shape llama1b --json llama1b.json
    python benchmarks/train_throughput.py --runners truthgpt,hf --no-compile --steps 30
    python benchmarks/train_throughput.py --runners truthgpt --repeats 3 \
        --variant graphs:training.compile_mode=reduce-overhead --variant ce:training.fused_loss=true

--variant NAME:KEY=VALUE[,KEY=VALUE]: one more truthgpt runner, `truthgpt:NAME`, with these
config overrides on top of --set; it takes its turns with the others, so a speed switch is
compared in one process against the same baseline.

Needs a CUDA GPU; --tiny runs every runner with a tiny model of the shape as a smoke test (on
CPU: fp32, truthgpt uncompiled unless --compile, and the other compiled runners on
torch.compile's eager backend, which traces the graphs but skips code generation).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters as dynamo_counters

from truthgpt.config import load
from truthgpt.data.prepare import PreparedData
from truthgpt.hardware import peak_flops
from truthgpt.models.build import decoder_config
from truthgpt.models.decoder import Decoder
from truthgpt.models.hf_io import save_hf
from truthgpt.quiet import no_load_save_bars
from truthgpt.training.run_folder import prepare_run_dir
from truthgpt.training.trainer import Trainer, build_model

RUNNER_NAMES = ("truthgpt", "hf", "hf-compile", "plain-compile")


@dataclass(frozen=True)
class Shape:
    about: str  # for the printout
    model: dict  # our config's model section
    seq_len: int
    batch_size: int
    accum: int
    token_ids: int  # the data's ids are below this


SHAPES = {
    "gpt2": Shape(
        "GPT-2 small (124M)",
        {
            "arch": "gpt2",
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "max_position_embeddings": 1024,
            "vocab_size": 50304,
        },
        seq_len=1024,
        batch_size=16,
        accum=4,
        token_ids=50257,  # GPT-2's tokenizer; the 47 rows above it are padding to a multiple of 64
    ),
    # Eager HF Trainer, the hungriest runner, at 8 x 2048: ~34 GiB of saved activations (measured
    # on CPU with saved-tensor hooks) + ~17 GiB of fp32 weights, grads, Adam and bf16 weight casts.
    "llama1b": Shape(
        "Llama-3.2-1B layers, 32000-token vocab (Llama 3: 128256), tied embeddings",
        {
            "arch": "llama",
            "hidden_size": 2048,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "intermediate_size": 8192,
            "max_position_embeddings": 2048,
            "rope_theta": 500000.0,
            "tie_embeddings": True,
            "vocab_size": 32000,
        },
        seq_len=2048,
        batch_size=8,
        accum=4,
        token_ids=32000,
    ),
}

TINY_SHAPES = {
    "gpt2": Shape(
        "tiny gpt2",
        {
            "arch": "gpt2",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "max_position_embeddings": 128,
            "vocab_size": 512,
        },
        seq_len=64,
        batch_size=4,
        accum=2,
        token_ids=512,
    ),
    "llama1b": Shape(
        "tiny llama",
        {
            "arch": "llama",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 128,
            "tie_embeddings": True,
            "vocab_size": 512,
        },
        seq_len=64,
        batch_size=4,
        accum=2,
        token_ids=512,
    ),
}


class RandomBlocks(torch.utils.data.Dataset):
    """Fixed random token blocks: the same data for every runner, no tokenizer in the timing."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@dataclass
class Bench:
    """What every runner reads: the run's settings and the model folder they all start from."""

    device: torch.device
    bf16: bool
    compile_backend: str  # the compiled runners': inductor, or eager on CPU (a smoke test)
    steps: int
    warmup: int
    seq_len: int
    batch_size: int
    accum: int
    hf_folder: Path
    workdir: Path
    dataset: RandomBlocks
    raw_config: dict  # ours, before the --set overrides
    overrides: list[str]
    profile: bool


@dataclass
class Measured:
    step_seconds: list[float]  # every step, warm-up included
    peak_gib: float | None
    mean_loss: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    """Drop what the last runner left (its cycles, cached blocks and compiled graphs), so the
    next one starts from an empty GPU and its peak memory is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


class StepClock:
    """Step boundaries on the device's own timeline (CUDA events), so timing adds no host sync
    to a loop that has none: a sync per step would hide a loop's ability to queue the next
    step while the GPU finishes this one. One sync at the end reads them all."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list = []

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        synchronize(self.device)
        self.marks = [self._mark()]

    def lap(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        synchronize(self.device)
        pairs = zip(self.marks, self.marks[1:])
        if self.device.type != "cuda":
            return [b - a for a, b in pairs]
        return [a.elapsed_time(b) / 1000 for a, b in pairs]


def time_steps(bench: Bench, step: Callable[[], None]) -> list[float]:
    """Seconds of each of bench.steps calls of `step` (device time between step boundaries);
    peak memory counts from the end of warm-up."""
    clock = StepClock(bench.device)
    clock.start()
    for index in range(bench.steps):
        if index == bench.warmup:
            reset_peak_memory(bench.device)
        step()
        clock.lap()
    return clock.seconds()


# -- the runners -----------------------------------------------------------------------------


def run_truthgpt(bench: Bench) -> Measured:
    raw = bench.raw_config
    model_section = {**raw["model"], "init_from": str(bench.hf_folder)}
    training = {**raw["training"], "batch_size": bench.batch_size, "grad_accum_steps": bench.accum}
    config = load({**raw, "model": model_section, "training": training}, bench.overrides)
    model = build_model(config, vocab_size=config.model.vocab_size).to(bench.device)
    data = PreparedData(
        tokenizer=None,
        train=bench.dataset,
        val=None,
        train_tokens=bench.dataset.ids.numel(),
        val_tokens=0,
    )
    prepare_run_dir(config, overwrite=True, log=lambda message: None)
    trainer = Trainer(config, model, data, bench.device, config.run_dir, callbacks=[])
    loss_sum = torch.zeros((), device=bench.device)

    def step() -> None:
        loss_sum.add_(trainer.train_step().loss)

    seconds = time_steps(bench, step)
    peak = peak_memory_gib(bench.device)
    if bench.profile:
        profile_steps(trainer, bench.device)
    return Measured(seconds, peak, float(loss_sum) / bench.steps)


def profile_steps(trainer: Trainer, device: torch.device, steps: int = 3) -> None:
    """Where the time of a few more steps goes: the kernels by total device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def open_hf_model(bench: Bench) -> torch.nn.Module:
    with no_load_save_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            bench.hf_folder, attn_implementation="sdpa", dtype=torch.float32
        )
    # GPT2LMHeadModel's class name matches no loss type, and the warning that says so breaks
    # the compiled graph on every call; name the loss it falls back to anyway.
    model.loss_type = "ForCausalLM"
    return model


def run_hf(bench: Bench, compiled: bool) -> Measured:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        """Each optimizer step's time from the end of the one before (the batch fetching that
        HF does before on_step_begin counts too), on the device's timeline like the others."""

        def __init__(self) -> None:
            self.clock = StepClock(bench.device)
            self.steps = 0

        def on_train_begin(self, *args, **kwargs) -> None:
            reset_peak_memory(bench.device)
            self.clock.start()

        def on_step_end(self, *args, **kwargs) -> None:
            self.clock.lap()
            self.steps += 1
            if self.steps == bench.warmup:
                reset_peak_memory(bench.device)

        @property
        def seconds(self) -> list[float]:
            return self.clock.seconds()

    cuda = bench.device.type == "cuda"
    timer = StepTimer()
    training_args = TrainingArguments(
        output_dir=str(bench.workdir / "hf_out"),
        max_steps=bench.steps,
        per_device_train_batch_size=bench.batch_size,
        gradient_accumulation_steps=bench.accum,
        learning_rate=6e-4,
        weight_decay=0.1,
        adam_beta2=0.95,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        bf16=bench.bf16,
        max_grad_norm=1.0,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=2,
        torch_compile=compiled,
        torch_compile_backend=bench.compile_backend if compiled else None,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        use_cpu=not cuda,
    )
    trainer = HFTrainer(
        model=open_hf_model(bench),
        args=training_args,
        train_dataset=bench.dataset,
        callbacks=[timer],
    )
    output = trainer.train()
    return Measured(timer.seconds, peak_memory_gib(bench.device), output.training_loss)


def run_plain_compile(bench: Bench) -> Measured:
    device, accum = bench.device, bench.accum
    model = open_hf_model(bench).to(device)
    model.train()
    compiled = torch.compile(model, backend=bench.compile_backend)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    loader = torch.utils.data.DataLoader(
        bench.dataset,
        batch_size=bench.batch_size,
        shuffle=True,
        drop_last=True,
        pin_memory=cuda,
    )

    def endless() -> Iterator[dict]:
        while True:
            yield from loader

    batches = endless()
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    autocast = bf16 if bench.bf16 else contextlib.nullcontext()
    loss_sum = torch.zeros((), device=device)

    def step() -> None:
        for _ in range(accum):
            batch = next(batches)
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast:
                loss = compiled(input_ids=input_ids, labels=labels).loss
            (loss / accum).backward()
            loss_sum.add_(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # no host sync: a tensor norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(bench, step)
    return Measured(seconds, peak_memory_gib(device), float(loss_sum) / (bench.steps * accum))


RUNNERS: dict[str, Callable[[Bench], Measured]] = {
    "truthgpt": run_truthgpt,
    "hf": lambda bench: run_hf(bench, compiled=False),
    "hf-compile": lambda bench: run_hf(bench, compiled=True),
    "plain-compile": run_plain_compile,
}


# -- measuring and reporting -----------------------------------------------------------------


def parse_variants(texts: list[str], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """--variant NAME:KEY=VALUE[,KEY=VALUE] -> {"truthgpt:NAME": ["KEY=VALUE", ...]}."""
    variants = {}
    for text in texts:
        name, _, overrides = text.partition(":")
        pairs = [pair.strip() for pair in overrides.split(",") if pair.strip()]
        if not name.strip() or not pairs or not all("=" in pair for pair in pairs):
            parser.error(f"--variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE]")
        variants[f"truthgpt:{name.strip()}"] = pairs
    return variants


def measure(name: str, bench: Bench, flops_per_token: float, peak: float | None) -> dict:
    """Run one runner and make its row; a failure is a row with the error. Out of memory, it is
    retried once with half the micro-batch and twice the accumulation (the same tokens/step)."""
    row: dict = {"runner": name}
    for attempt in range(2):
        free_memory()
        # What the runners before left on the GPU (should be ~0): their peaks are not this one's.
        held = torch.cuda.memory_allocated() / 2**30 if bench.device.type == "cuda" else None
        row.update(batch_size=bench.batch_size, accum=bench.accum, held_at_start_gib=held)
        graphs, breaks = compile_counts()
        try:
            runner = RUNNERS[name.partition(":")[0]]  # truthgpt:NAME is a truthgpt variant
            measured = runner(bench)
        except Exception as exc:  # any failure: report it, keep the other runners' rows
            traceback.print_exc()
            # Inductor wraps an out-of-memory while compiling in its own error.
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
            where = f" at {bench.batch_size}x{bench.accum}" if oom else ""
            error = f"{type(exc).__name__}{where}: {first_line(exc)}"
            if oom and attempt == 0 and bench.batch_size % 2 == 0:
                row["note"] = f"{error}; retried at {bench.batch_size // 2}x{bench.accum * 2}"
                print(f"{name}: {row['note']}", flush=True)
                bench = replace(bench, batch_size=bench.batch_size // 2, accum=bench.accum * 2)
                continue
            row["error"] = error
        else:
            graphs_after, breaks_after = compile_counts()
            row.update(summarize(bench, measured, flops_per_token, peak))
            row.update(compiled_graphs=graphs_after - graphs, graph_breaks=breaks_after - breaks)
        break
    free_memory()
    return row


def with_overrides(bench: Bench, overrides: list[str]) -> Bench:
    """A variant's Bench. Its micro-batch split moves into the Bench's own fields, where its
    row, its tokens/s and the out-of-memory retry read it; the rest stays config overrides."""
    split = {"training.batch_size": "batch_size", "training.grad_accum_steps": "accum"}
    fields, rest = {}, []
    for pair in overrides:
        key, _, value = pair.partition("=")
        if key.strip() in split:
            fields[split[key.strip()]] = int(value)
        else:
            rest.append(pair)
    return replace(bench, overrides=bench.overrides + rest, **fields)


def compile_counts() -> tuple[int, int]:
    """Graphs compiled and graph breaks met by torch.compile so far in this process."""
    return dynamo_counters["stats"]["unique_graphs"], sum(dynamo_counters["graph_break"].values())


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def summarize(bench: Bench, measured: Measured, flops_per_token: float, peak: float | None) -> dict:
    timed = measured.step_seconds[bench.warmup :]
    tokens_per_second = bench.batch_size * bench.accum * bench.seq_len * len(timed) / sum(timed)
    return {
        "tokens_per_second": tokens_per_second,
        "mfu": flops_per_token * tokens_per_second / peak if peak else None,
        "peak_gib": measured.peak_gib,
        "step_ms_median": 1000 * statistics.median(timed),
        "step_ms_min": 1000 * min(timed),
        "step_ms_max": 1000 * max(timed),
        "warmup_s": sum(measured.step_seconds[: bench.warmup]),
        "mean_loss": measured.mean_loss,
    }


def report_row(row: dict) -> None:
    """One runner's line as soon as it finishes: the noise and what compilation cost."""
    if "error" in row:
        print(f"{row['runner']}: failed: {row['error']}", flush=True)
        return
    peak = f"{row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "-"
    if row["held_at_start_gib"] is not None:
        peak += f" ({row['held_at_start_gib']:.2f} GiB held at its start)"
    print(
        f"{row['runner']}: {row['tokens_per_second']:,.0f} tokens/s; step "
        f"{row['step_ms_median']:.1f} ms median "
        f"({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f}); warm-up {row['warmup_s']:.1f} s; "
        f"peak {peak}; {row['compiled_graphs']} graphs, "
        f"{row['graph_breaks']} graph breaks; mean loss {row['mean_loss']:.3f}",
        flush=True,
    )


def print_table(rows: list[dict]) -> None:
    ours = next((r for r in rows if r["runner"] == "truthgpt" and "error" not in r), None)
    print(
        f"{'runner':<20} {'batch':>6} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>9} "
        f"{'step ms (min-max)':>24} {'truthgpt/x':>10}"
    )
    for row in rows:
        batch = f"{row['batch_size']}x{row['accum']}" + ("*" if "note" in row else "")
        if "error" in row:
            print(f"{row['runner']:<20} {batch:>6}  failed: {row['error']}")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        spread = f"{row['step_ms_median']:.1f} ({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f})"
        ratio = f"{ours['tokens_per_second'] / row['tokens_per_second']:.2f}x" if ours else "-"
        repeats = ""
        if row.get("repeats", 1) > 1:
            low, high = row["tokens_per_second_min"], row["tokens_per_second_max"]
            repeats = f"  {row['repeats']} repeats: {low:,.0f}-{high:,.0f} tokens/s"
        print(
            f"{row['runner']:<20} {batch:>6} {row['tokens_per_second']:>11,.0f} {mfu:>6} "
            f"{peak:>9} {spread:>24} {ratio:>10}{repeats}"
        )
    for row in rows:
        if "note" in row:
            print(f"* {row['runner']}: {row['note']}")


def parse_runners(text: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNNER_NAMES]
    if unknown or not names:
        parser.error(f"--runners: unknown {unknown}; choose from {','.join(RUNNER_NAMES)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument(
        "--runners",
        default=",".join(RUNNER_NAMES),
        help=f"a comma list of {','.join(RUNNER_NAMES)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, help="micro-batch (default: the shape's)")
    parser.add_argument("--accum", type=int, help="micro-batches per step (default: the shape's)")
    parser.add_argument("--seq-len", type=int, help="default: the shape's")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile truthgpt's model (default: on with CUDA)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test: a tiny model of the shape, any device"
    )
    parser.add_argument("--skip-hf", action="store_true", help="old spelling of --runners truthgpt")
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a truthgpt config override, key=value (model.* keys: every runner's model)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE[,KEY=VALUE]: also run truthgpt with these overrides, as truthgpt:NAME",
    )
    parser.add_argument("--profile", action="store_true", help="print truthgpt's top kernels")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="keep SDPA off cuDNN's attention (it then takes FlashAttention-2), for the whole "
        "process: every runner alike",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every runner this many times, the runners taking turns (the table gives "
        "the median tokens/s and its range over the repeats)",
    )
    args = parser.parse_args()
    runners = ["truthgpt"] if args.skip_hf else parse_runners(args.runners, parser)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps} (and >= 0)")
    variants = parse_variants(args.variant, parser)
    runners += list(variants)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be at least 1")

    shape = (TINY_SHAPES if args.tiny else SHAPES)[args.shape]
    seq_len = args.seq_len or shape.seq_len
    batch_size = args.batch_size or shape.batch_size
    accum = args.accum or shape.accum
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = args.precision == "bf16" and cuda
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        max_positions = max(shape.model["max_position_embeddings"], seq_len)
        raw_config = {
            "run_name": "truthgpt",
            "output_dir": str(workdir / "runs"),
            "model": {**shape.model, "max_position_embeddings": max_positions},
            "data": {"max_seq_len": seq_len},
            "training": {
                "max_steps": args.steps,
                "batch_size": batch_size,
                "grad_accum_steps": accum,
                "precision": "bf16" if bf16 else "fp32",
                "compile": cuda if args.compile is None else args.compile,
                "log_every": 10_000,
                "eval_every": 10_000,
            },
            "checkpoint": {"save_every": 10_000},
            "logging": {"progress": "none", "tensorboard": False, "plot": False},
        }
        config = load(raw_config, args.set)
        for overrides in variants.values():  # a typo fails here, not after the first runners
            load(raw_config, args.set + overrides)
        # One model for all: its weights saved once and opened by every runner.
        torch.manual_seed(0)
        model = Decoder(decoder_config(config.model, config.model.vocab_size))
        save_hf(model, workdir / "hf_model")
        run = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "precision": "bf16" if bf16 else "fp32",
            "shape": args.shape,
            "about": shape.about,
            "tiny": args.tiny,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seq_len": seq_len,
            "flops_per_token": model.flops_per_token(seq_len),
            "steps": args.steps,
            "warmup": args.warmup,
            "truthgpt_compile": config.training.compile,
        }
        del model
        print_run(run)
        bench = Bench(
            device=device,
            bf16=bf16,
            compile_backend="inductor" if cuda else "eager",
            steps=args.steps,
            warmup=args.warmup,
            seq_len=seq_len,
            batch_size=batch_size,
            accum=accum,
            hf_folder=workdir / "hf_model",
            workdir=workdir,
            dataset=RandomBlocks(args.steps * batch_size * accum + 64, seq_len, shape.token_ids),
            raw_config=raw_config,
            overrides=args.set,
            profile=args.profile,
        )
        peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
        # Runners take turns, so a slow spell of a shared GPU falls on all of them alike.
        for repeat in range(args.repeats):
            for name in runners:
                print(f"-- {name}" + (f" (repeat {repeat + 1})" if args.repeats > 1 else ""))
                mine = with_overrides(bench, variants.get(name, []))
                rows.append({**measure(name, mine, run["flops_per_token"], peak), "repeat": repeat})
                report_row(rows[-1])
                if args.json:  # after each runner: a run cut short still leaves its rows
                    table = combine_repeats(rows)
                    document = {**run, "rows": table, "repeats": rows}
                    args.json.write_text(json.dumps(document, indent=1) + "\n")
    print()
    print_run(run)
    print_table(combine_repeats(rows))


def combine_repeats(rows: list[dict]) -> list[dict]:
    """One row per runner: its median repeat by tokens/s (the lower middle one for an even
    count), with the range over the repeats (`tokens_per_second_min` / `_max`) and how many
    repeats ran without error."""
    combined = []
    for name in dict.fromkeys(row["runner"] for row in rows):
        mine = [row for row in rows if row["runner"] == name]
        good = sorted((r for r in mine if "error" not in r), key=lambda r: r["tokens_per_second"])
        if not good:
            combined.append(mine[-1])
            continue
        middle = dict(good[(len(good) - 1) // 2])
        middle.update(
            tokens_per_second_min=good[0]["tokens_per_second"],
            tokens_per_second_max=good[-1]["tokens_per_second"],
            repeats=len(good),
        )
        combined.append(middle)
    return combined


def print_run(run: dict) -> None:
    print(
        f"{run['device']}, torch {run['torch']}, transformers {run['transformers']}, "
        f"{run['precision']}; {run['shape']}: {run['about']}, {run['parameters'] / 1e6:,.1f}M "
        f"parameters, seq {run['seq_len']}, {run['flops_per_token'] / 1e9:.3f} GFLOP/token; "
        f"{run['steps'] - run['warmup']} timed steps after {run['warmup']} warm-up; truthgpt "
        f"compile={run['truthgpt_compile']}; batch = micro-batch x accumulation",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""training.micro_batch auto: the search, the config key, the split a run trains and resumes
with, and (pytest -m gpu) the real memory probe.

The CPU has no memory to probe, so the CPU runs that need another split than the given one
stand a predicate in for `MemoryProbe` (a pretend GPU that fits up to N sequences); the
references are the search's definition (the largest divisor that fits) and runs without auto.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from truthgpt.config import load
from truthgpt.data import prepare_data
from truthgpt.errors import CheckpointError, ConfigError, TrainingError
from truthgpt.training import micro_batch
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import read_train_state
from truthgpt.training.distributed import World
from truthgpt.training.micro_batch import Split, largest_fitting_divisor, resolve_split
from truthgpt.training.run import train
from truthgpt.training.tasks import build_task
from truthgpt.training.trainer import build_model

# ---------------------------------------------------------------------------------------------
# The search


def largest_divisor_up_to(global_batch: int, limit: int) -> int:
    """The definition: every divisor, from the largest down, until one fits."""
    return next((m for m in range(global_batch, 0, -1) if global_batch % m == 0 and m <= limit), 0)


def test_the_search_finds_the_largest_divisor_that_fits_in_few_tries() -> None:
    for global_batch in range(1, 130):
        most_tries = 1 + math.ceil(math.log2(len(micro_batch.divisors(global_batch))))
        for limit in range(global_batch + 2):
            tried: list[int] = []

            def fits(m: int, limit: int = limit, tried: list[int] = tried) -> bool:
                tried.append(m)
                return m <= limit

            found = largest_fitting_divisor(global_batch, fits)
            assert found == largest_divisor_up_to(global_batch, limit), (global_batch, limit)
            assert len(tried) <= most_tries and len(set(tried)) == len(tried)
            assert all(global_batch % m == 0 for m in tried)


def test_the_search_tries_the_whole_batch_first_and_a_prime_one_twice_at_most() -> None:
    tried: list[int] = []
    assert largest_fitting_divisor(64, lambda m: tried.append(m) or True) == 64
    assert tried == [64]
    tried.clear()
    assert largest_fitting_divisor(7, lambda m: tried.append(m) or m <= 5) == 1
    assert tried == [7, 1]


class FitsUpTo:
    """A pretend GPU where micro-batches of up to `limit` sequences fit (`MemoryProbe`'s face)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tried: list[int] = []

    def __call__(self, m: int) -> bool:
        self.tried.append(m)
        return m <= self.limit

    def describe(self, m: int) -> str:
        return f"a pretend GPU that fits {self.limit}"


def test_nothing_fits_says_what_to_change(monkeypatch, tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, training={"micro_batch": "auto", "batch_size": 6}))
    monkeypatch.setattr(micro_batch, "memory_probe", lambda *args: FitsUpTo(0))
    model = torch.nn.Linear(2, 2)  # only its device is read before the probe
    with pytest.raises(TrainingError) as info:
        resolve_split(config, None, None, model, World(), log=lambda message: None)
    message = str(info.value)
    assert "training.micro_batch" in message and "not even 1 sequence of 32 tokens" in message
    assert "training.gradient_checkpointing: true" in message
    assert "data.max_seq_len" in message


def test_a_resume_reuses_the_checkpoints_micro_batch_and_refuses_one_that_cannot(
    monkeypatch, tmp_path: Path
) -> None:
    config = load(tiny_raw_config(tmp_path, training={"micro_batch": "auto", "batch_size": 6}))
    probe = FitsUpTo(100)
    monkeypatch.setattr(micro_batch, "memory_probe", lambda *args: probe)
    model = torch.nn.Linear(2, 2)
    resolve = lambda saved: resolve_split(config, None, None, model, World(), print, saved)  # noqa: E731
    assert resolve({"batch_size": 3, "grad_accum_steps": 2}) == Split(3, 2)
    assert resolve({"batch_size": 2, "grad_accum_steps": 3}) == Split(2, 3)
    assert probe.tried == []
    with pytest.raises(CheckpointError, match="do not divide the global batch 6 x 1"):
        resolve({"batch_size": 4, "grad_accum_steps": 2})


# ---------------------------------------------------------------------------------------------
# The config key


def test_config_accepts_auto_and_empty_and_names_the_key_of_anything_else(tmp_path: Path) -> None:
    assert load(tiny_raw_config(tmp_path)).training.micro_batch is None
    for value in ("auto", None):
        config = load(tiny_raw_config(tmp_path, training={"micro_batch": value}))
        assert config.training.micro_batch == value
    for value in ("max", 32, True):
        with pytest.raises(ConfigError) as info:
            load(tiny_raw_config(tmp_path, training={"micro_batch": value}))
        message = str(info.value)
        assert "training.micro_batch" in message and repr(value) in message
        assert "allowed: auto, empty" in message


def test_config_refuses_auto_for_the_image_task(tmp_path: Path) -> None:
    raw = {
        "task": "image-generation",
        "data": {"source": "digits"},
        "diffusion_training": {"space": "pixel"},
        "training": {"micro_batch": "auto"},
    }
    with pytest.raises(ConfigError, match="training.micro_batch: 'auto'"):
        load(raw)


# ---------------------------------------------------------------------------------------------
# Runs


class Lines(Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_log(self, message: str) -> None:
        self.lines.append(message)


def run_config(tmp_path: Path, name: str, **training) -> dict:
    return tiny_raw_config(
        tmp_path,
        run_name=name,
        training={"max_steps": 12, "log_every": 1, "eval_every": 6, **training},
        checkpoint={"save_every": 6},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )


def records(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if r["kind"] == kind}


def test_auto_on_the_cpu_trains_the_given_split_and_says_so(tmp_path: Path) -> None:
    reference = train(load(run_config(tmp_path, "given")))
    lines = Lines()
    auto = train(load(run_config(tmp_path, "auto", micro_batch="auto")), callbacks=[lines])
    assert "micro_batch auto: no GPU memory to probe; keeping the given 8 x 1 (8 per process)" in (
        lines.lines
    )
    state = read_train_state(auto.run_dir / "checkpoints" / "last")
    assert state["micro_batch"] == {"batch_size": 8, "grad_accum_steps": 1}
    # fp32 on the CPU: the same run, bit for bit.
    assert records(auto.run_dir, "train", "loss") == records(reference.run_dir, "train", "loss")
    assert records(auto.run_dir, "eval", "val_loss") == records(
        reference.run_dir, "eval", "val_loss"
    )


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step and path.name == "last":
            raise RuntimeError("simulated crash")


def test_a_smaller_split_keeps_the_global_batch_and_a_resume_keeps_the_split(
    monkeypatch, tmp_path: Path
) -> None:
    given = train(load(run_config(tmp_path, "given")))
    monkeypatch.setattr(micro_batch, "memory_probe", lambda *args: FitsUpTo(5))
    lines = Lines()
    full = train(load(run_config(tmp_path, "full", micro_batch="auto")), callbacks=[lines])
    assert any(
        line.startswith("micro_batch auto: 4 x 2 (8 per process) fits in") for line in lines.lines
    )
    # The same 8 blocks a step, the same validation blocks, in halves: equal up to rounding.
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        expected, got = records(given.run_dir, kind, key), records(full.run_dir, kind, key)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-5), kind

    broken = load(run_config(tmp_path, "broken", micro_batch="auto"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(6)])
    # The GPU is another now: a probe would pick 2 x 4, and the data position would break.
    probe = FitsUpTo(2)
    monkeypatch.setattr(micro_batch, "memory_probe", lambda *args: probe)
    lines = Lines()
    train(broken, resume=True, callbacks=[lines])
    assert probe.tried == []
    assert "micro_batch auto: 4 x 2 (8 per process), as the checkpoint chose" in lines.lines
    state = read_train_state(broken.run_dir / "checkpoints" / "last")
    assert state["micro_batch"] == {"batch_size": 4, "grad_accum_steps": 2}
    assert records(broken.run_dir, "train", "loss") == records(full.run_dir, "train", "loss")
    assert records(broken.run_dir, "eval", "val_loss") == records(full.run_dir, "eval", "val_loss")


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu on the GPU machine): the real probe


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_probe_picks_a_divisor_that_trains_within_a_memory_cap(tmp_path: Path) -> None:
    raw = tiny_raw_config(
        tmp_path,
        model={
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 4,
            "max_position_embeddings": 512,
            "dropout": 0.1,
        },
        data={"max_seq_len": 512, "max_documents": 200},
        training={
            "max_steps": 3,
            "batch_size": 96,
            "grad_accum_steps": 2,
            "eval_every": 3,
            "eval_batches": 1,
            "micro_batch": "auto",
            "log_every": 1,
        },
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    config = load(raw)
    device = torch.device("cuda", torch.cuda.current_device())
    cap_gib = 2.0
    total = torch.cuda.mem_get_info(device)[1]
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    try:
        # The probe itself: the RNG, the gradients and the peak statistics as they were.
        data = prepare_data(config, None, log=lambda message: None)
        model = build_model(config, vocab_size=len(data.tokenizer)).to(device)
        cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
        lines = Lines()
        split = resolve_split(config, build_task(config), data, model, World(), lines.on_log)
        assert torch.equal(torch.get_rng_state(), cpu_rng)
        assert torch.equal(torch.cuda.get_rng_state(device), cuda_rng)
        assert all(p.grad is None for p in model.parameters())
        assert 192 % split.batch_size == 0 and split.global_batch == 192
        assert split.batch_size < 192, f"192 sequences fit in {cap_gib} GiB: no teeth"
        del model
        torch.cuda.empty_cache()

        # A run with what it chose trains in the cap (its peak included, with AdamW's state).
        lines = Lines()
        result = train(config, callbacks=[lines])
        assert f"micro_batch auto: {split} fits in" in "\n".join(lines.lines)
        peaks = records(result.run_dir, "train", "peak_mem_gib")
        assert len(peaks) == 3 and max(peaks.values()) < cap_gib
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()

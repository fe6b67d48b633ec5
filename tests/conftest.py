"""Shared fixtures: tiny configs that train in seconds on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

# Two cores in CI: more threads than cores only adds contention. Set before torch loads, and
# read by hardware.default_threads() when a test trains or generates with the default.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_raw_config(tmp_path: Path, **sections: dict) -> dict:
    """A config dict for a tiny llama on a slice of the stdlib corpus; sections override."""
    raw = {
        "run_name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {
            "arch": "llama",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 64,
        },
        "data": {
            "source": "python-stdlib",
            # 47k tokens, 30 steps of 8 x 32 many times over; 40 documents (568k tokens) made
            # training the tokenizer and encoding a second of every run
            "max_documents": 12,
            "max_seq_len": 32,
            "val_fraction": 0.1,
            "tokenizer": {"vocab_size": 300, "train_max_chars": 300_000},
        },
        "training": {
            "max_steps": 30,
            "batch_size": 8,
            "eval_every": 15,
            "eval_batches": 4,
            "log_every": 5,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "checkpoint": {"save_every": 15},
        "logging": {"progress": "none"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    return raw


def digits_raw_config(tmp_path: Path, **sections: dict) -> dict:
    """A tiny pixel-space digits model: 16x16, one channel, a 2-level UNet."""
    raw = {
        "run_name": "digits",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "task": "image-generation",
        "data": {"source": "digits", "val_fraction": 0.1},
        "diffusion_training": {
            "space": "pixel",
            "resolution": 16,
            "caption_dropout": 0.1,
            "unet": {
                "in_channels": 1,
                "block_out_channels": [16, 32],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "norm_num_groups": 8,
            },
            "text_encoder": {"hidden_size": 32, "intermediate_size": 64},
            "samples": {"every": 40, "prompts": ["a handwritten digit one"], "steps": 3},
        },
        "training": {
            "max_steps": 40,
            "batch_size": 16,
            "eval_every": 40,
            "eval_batches": 2,
            "log_every": 10,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "checkpoint": {"save_every": 40},
        "logging": {"progress": "none", "plot": False},
        "hardware": {"device": "cpu"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict:
    return tiny_raw_config(tmp_path)


@pytest.fixture(scope="session")
def triton_interpreter(request: pytest.FixtureRequest) -> dict[str, tuple[bool, str]]:
    """{test module: (passed, output)} of the Triton interpreter checks of every test module
    of this session that asks, run in one subprocess (tests/triton_interpreter.py)."""
    from triton_interpreter import run_checks

    asking = {
        item.module.__name__
        for item in request.session.items
        if "triton_interpreter" in getattr(item, "fixturenames", ())
    }
    return run_checks(sorted(asking))

"""CPU threads: the default follows OMP_NUM_THREADS or the usable cores; train applies the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.hardware import apply_threads, default_threads, usable_cores
from truthgpt.training.run import train


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_follow_omp_num_threads_else_the_usable_cores(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form: the outer count
    assert default_threads() == 4
    for unusable in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert default_threads() == usable_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == usable_cores()
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == len(os.sched_getaffinity(0))


def test_apply_threads_sets_torch(monkeypatch, keep_threads) -> None:
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert apply_threads(None) == 2 and torch.get_num_threads() == 2


def test_threads_key_is_checked() -> None:
    with pytest.raises(ConfigError, match="hardware.threads"):
        load({"hardware": {"threads": 0}})
    assert load({}).hardware.threads is None


def test_train_uses_hardware_threads(tmp_path: Path, keep_threads) -> None:
    torch.set_num_threads(2)
    raw = tiny_raw_config(tmp_path, hardware={"threads": 1}, training={"max_steps": 2})
    train(load(raw))
    assert torch.get_num_threads() == 1

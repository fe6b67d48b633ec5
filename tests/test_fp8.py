"""training.fp8: FP8 linear layers through torchao where the GPU has them, a warning elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.training.callbacks import Callback
from truthgpt.training.run import train


class Lines(Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_log(self, message: str) -> None:
        self.lines.append(message)


def test_fp8_on_a_cpu_trains_without_it_and_says_so(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path, training={"max_steps": 4, "fp8": "tensorwise"})
    lines = Lines()
    result = train(load(raw), callbacks=[lines])
    assert result.steps == 4
    assert any("training.fp8 tensorwise: cpu has no FP8 matmuls" in line for line in lines.lines)


def test_an_unknown_fp8_recipe_names_the_key_and_the_choices(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path, training={"fp8": "e4m3"})
    with pytest.raises(ConfigError, match="training.fp8") as info:
        load(raw)
    assert "tensorwise" in str(info.value) and "rowwise" in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 matmuls",
)
def test_fp8_training_follows_the_bf16_loss_on_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    model = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2}
    finals = {}
    for recipe in ("none", "tensorwise"):
        raw = tiny_raw_config(
            tmp_path / recipe,
            model=model,
            training={"max_steps": 30, "fp8": recipe, "precision": "bf16", "eval_every": 30},
        )
        finals[recipe] = train(load(raw)).final_val_loss
    assert finals["tensorwise"] == pytest.approx(finals["none"], rel=0.03)

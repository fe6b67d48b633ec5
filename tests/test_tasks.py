"""The task seam: the TASKS registry, its config errors, and a task from outside the package
trained, checkpointed and resumed by the real Trainer (which names no task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_raw_config
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from truthgpt.config import load
from truthgpt.data.prepare import PreparedData
from truthgpt.errors import ConfigError
from truthgpt.registry import TASKS
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import verify_checkpoint
from truthgpt.training.run import train
from truthgpt.training.tasks import build_task

VOCAB = 50
WEIGHTS = "model.safetensors"


class MeanTokenIdModel(nn.Module):
    """Predicts the mean token id of a row (scaled to [0, 1)) from its embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.dropout = nn.Dropout(0.1)  # makes the torch RNG part of what resume must restore
        self.head = nn.Linear(16, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids).mean(1))).squeeze(-1)


class Rows(Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]}


@TASKS.register("mean_token_id")
class MeanTokenIdTask:
    """A third-party task: regression, no tokenizer, its own model and weights file."""

    def __init__(self, config) -> None:
        self.config = config

    def build_data(self, run_dir, log) -> PreparedData:
        generator = torch.Generator().manual_seed(self.config.seed)
        rows = torch.randint(0, VOCAB, (96, 8), generator=generator)
        train_rows, val_rows = rows[:80], rows[80:]
        log(f"data: {len(train_rows)} train / {len(val_rows)} val rows")
        return PreparedData(
            None, Rows(train_rows), Rows(val_rows), train_rows.numel(), val_rows.numel()
        )

    def build_model(self, data: PreparedData) -> nn.Module:
        return MeanTokenIdModel()

    def load_model(self, folder: Path, device="cpu") -> nn.Module:
        model = MeanTokenIdModel()
        model.load_state_dict(load_file(Path(folder) / WEIGHTS))
        return model.to(device)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, data: PreparedData, folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        ids = batch["input_ids"]
        target = ids.float().mean(1) / VOCAB
        return F.mse_loss(model(ids), target), torch.tensor(len(ids))

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def flops_per_token(self, model: nn.Module) -> float | None:
        return None


def task_config(tmp_path: Path, name: str) -> dict:
    return tiny_raw_config(
        tmp_path,
        run_name=name,
        task="mean_token_id",
        training={"max_steps": 20, "batch_size": 8, "log_every": 1, "eval_every": 10},
        optim={"lr": 1e-2, "warmup_steps": 2},
        checkpoint={"save_every": 5, "keep_last": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step and path.name == "last":
            raise RuntimeError("simulated crash")


def test_registry_lists_the_builtin_tasks_and_matches_its_static_list() -> None:
    assert {"causal_lm", "sft", "image-generation"} <= set(TASKS.names())
    TASKS.load()
    own = {n for n, b in TASKS.items() if b.__module__ == TASKS.builtin_module}
    assert own == set(TASKS.builtins) == {"causal_lm", "sft", "image-generation"}
    sft = load({"task": "sft", "data": {"source": "jsonl"}})
    assert type(build_task(sft)).__name__ == "SFTTask"


def test_an_unknown_task_is_a_config_error_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load({"task": "casual_lm"})
    message = str(info.value)
    assert "task" in message and "'casual_lm'" in message
    assert "did you mean 'causal_lm'" in message
    # the plugin's name is allowed too
    assert "causal_lm, image-generation, mean_token_id, sft" in message


def test_a_third_party_task_trains_checkpoints_and_resumes_through_the_trainer(
    tmp_path: Path,
) -> None:
    full = train(load(task_config(tmp_path, "full")))
    assert full.steps == 20
    assert full.final_val_loss < full.initial_val_loss
    for name in ("last", "best"):
        folder = full.run_dir / "checkpoints" / name
        verify_checkpoint(folder)
        assert (folder / WEIGHTS).is_file() and (folder / "run_config.yaml").is_file()
        assert not (folder / "tokenizer.json").exists()
    # The reference is the uninterrupted run: a crash at step 10 and a resume give its curve.
    broken = load(task_config(tmp_path, "broken"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    resumed = train(broken, resume=True)
    assert resumed.steps == 20
    assert train_losses(broken.run_dir) == train_losses(full.run_dir)
    assert resumed.final_val_loss == full.final_val_loss

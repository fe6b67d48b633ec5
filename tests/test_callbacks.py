"""Callbacks: TensorBoard histograms, Weights & Biases (offline), and user callbacks by name
receiving the trainer's events in order from a real tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.registry import CALLBACKS
from truthgpt.training.callbacks import (
    Callback,
    HistogramLog,
    TensorBoardLog,
    WandbLog,
    build_callbacks,
)
from truthgpt.training.run import train

RECORDERS: list[EventRecorder] = []


@CALLBACKS.register("test_recorder")
class EventRecorder(Callback):
    """A user callback: remembers every event with its step."""

    def __init__(self, config, run_dir: Path) -> None:
        self.events: list[tuple[str, int]] = []
        RECORDERS.append(self)

    def on_train_start(self, step: int, max_steps: int) -> None:
        self.events.append(("on_train_start", step))

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.events.append(("on_step_end", step))

    def on_eval(self, step: int, metrics: dict) -> None:
        self.events.append(("on_eval", step))

    def on_gradients(self, step: int, model) -> None:
        self.events.append(("on_gradients", step))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.events.append(("on_checkpoint", step))

    def on_train_end(self, step: int) -> None:
        self.events.append(("on_train_end", step))


def histogram_tags(tb_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["histograms"])


def test_histograms_of_weights_and_gradients_land_in_tensorboard(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, logging={"progress": "none", "histograms_every": 5}))
    assert any(isinstance(c, HistogramLog) for c in build_callbacks(config, tmp_path))
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2))
    model.layers[0].mlp_norm.weight.requires_grad_(False)  # frozen weights are not logged
    batch = torch.randint(0, 64, (2, 8))
    model(batch, labels=batch).loss.backward()
    callback = HistogramLog(config, tmp_path)
    callback.on_gradients(5, model)
    callback.on_train_end(5)
    tags = histogram_tags(tmp_path / "tb")
    assert {"weights/embed.weight", "grads/embed.weight", "grads/layers.0.attn.qkv.weight"} <= tags
    assert not any("mlp_norm" in tag for tag in tags)


def test_wandb_without_the_package_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an absent package looks like
    config = load(tiny_raw_config(tmp_path, logging={"progress": "none", "wandb": True}))
    with pytest.raises(ConfigError, match=r"pip install 'truthgpt\[wandb\]'"):
        build_callbacks(config, tmp_path)


def test_user_callback_histograms_wandb_and_jsonl_from_a_real_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb_installed = "wandb" in sys.modules or _importable("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 10, "eval_every": 5, "log_every": 5, "eval_batches": 2},
        checkpoint={"save_every": 5},
        logging={
            "progress": "none",
            "plot": False,
            "histograms_every": 5,
            "wandb": wandb_installed,
            "callbacks": ["test_recorder"],
        },
    )
    RECORDERS.clear()
    result = train(load(raw))
    run_dir = result.run_dir

    (recorder,) = RECORDERS
    names = [name for name, _ in recorder.events]
    assert names[0] == "on_train_start" and names[-1] == "on_train_end"
    assert {"on_step_end", "on_eval", "on_checkpoint", "on_gradients"} <= set(names)
    steps = [step for _, step in recorder.events]
    assert steps == sorted(steps), recorder.events  # events arrive in step order
    assert ("on_step_end", 5) in recorder.events and ("on_step_end", 10) in recorder.events
    assert [s for n, s in recorder.events if n == "on_gradients"] == [5, 10]
    assert [s for n, s in recorder.events if n == "on_eval"] == [0, 5, 10]
    # Within a step: the log line comes before the evaluation and the checkpoint after it.
    at_ten = [name for name, step in recorder.events if step == 10]
    assert at_ten.index("on_step_end") < at_ten.index("on_eval") < at_ten.index("on_checkpoint")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 5, 10]

    tags = histogram_tags(run_dir / "tb")
    assert "weights/embed.weight" in tags and "grads/layers.1.mlp.down.weight" in tags

    if wandb_installed:
        offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1
        assert list(offline_runs[0].glob("*.wandb"))


def test_wandb_logs_offline_without_an_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load(tiny_raw_config(tmp_path, logging={"progress": "none", "wandb": True}))
    callbacks = build_callbacks(config, tmp_path)
    (callback,) = [c for c in callbacks if isinstance(c, WandbLog)]
    callback.on_train_start(0, 2)
    assert callback.run.settings.mode == "offline"
    callback.on_step_end(1, {"step": 1, "loss": 2.5, "lr": 1e-3})
    callback.on_eval(2, {"step": 2, "val_loss": 2.4, "val_ppl": 11.0})
    callback.on_train_end(2)
    for other in callbacks:
        if isinstance(other, TensorBoardLog):
            other.on_train_end(2)
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_rich_and_tqdm_progress_render_loss_lr_rate_and_eta(tmp_path: Path, capsys) -> None:
    from truthgpt.config import load as load_config
    from truthgpt.training.callbacks import RichProgress, TqdmProgress

    config = load_config({"run_name": "bar"})
    metrics = {"step": 5, "loss": 2.5, "lr": 1e-3, "tokens_per_second": 1234.0}
    for bar in (RichProgress(config, tmp_path), TqdmProgress(config, tmp_path)):
        bar.on_train_start(0, 10)
        bar.on_step_end(5, metrics)
        bar.on_eval(5, {"step": 5, "val_loss": 2.4, "val_ppl": 11.0})
        bar.on_log("a message")
        bar.on_train_end(10)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "loss 2.5" in text and "lr 1.00e-03" in text and "1,234 tok/s" in text
    assert "val_loss 2.4" in text and "a message" in text
    assert "ETA" in text or "<" in text  # rich shows "ETA", tqdm shows "elapsed<remaining"


class _Clock:
    """Wall time the test sets: a quickstart-like run, 0.3 s a step, a 10 s eval every 150."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_plain_log_eta_is_smoothed(tmp_path: Path, monkeypatch, capsys) -> None:
    clock = _Clock()
    monkeypatch.setattr("truthgpt.training.callbacks.time", clock)
    log = CALLBACKS["none"](load(tiny_raw_config(tmp_path)), tmp_path)
    log.on_train_start(0, 600)
    for step in range(20, 601, 20):
        # Steps 140-160 hold an eval (and a save): that window is 2.7 times slower.
        clock.now += 20 * 0.3 + (10.0 if (step - 1) // 150 != (step - 21) // 150 else 0.0)
        log.on_step_end(step, {"loss": 1.0})
    etas = []
    for line in capsys.readouterr().out.splitlines():
        hours, minutes, seconds = line.rsplit("ETA ", 1)[1].split(":")
        etas.append(int(hours) * 3600 + int(minutes) * 60 + int(seconds))
    true_seconds_per_step = clock.now / 600
    for step, eta, later in zip(range(40, 600, 20), etas[1:], etas[2:]):
        assert later <= eta * 1.2, (step, eta, later)  # no jumps up
        assert eta == pytest.approx(true_seconds_per_step * (600 - step), rel=0.35)

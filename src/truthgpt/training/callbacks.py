"""Trainer events and the built-in callbacks: progress bar, metrics.jsonl, TensorBoard, loss.png.

A callback is an object with any of the `Callback` methods; the Trainer calls them by name in
its loop. Built-ins and user callbacks are looked up by name in the `CALLBACKS` registry; a
builder takes `(config, run_dir)`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from truthgpt.config import Config
from truthgpt.registry import CALLBACKS

Metrics = dict[str, Any]


class Callback:
    """Trainer events. Override the ones you need; each gets plain numbers."""

    def on_train_start(self, step: int, max_steps: int) -> None: ...

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        """Called every `training.log_every` optimizer steps with loss, lr, tokens/s..."""

    def on_eval(self, step: int, metrics: Metrics) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_log(self, message: str) -> None:
        """A line for the user (a stage finished, a checkpoint written)."""

    def on_train_end(self, step: int) -> None: ...


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_metrics(metrics: Metrics) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "step":
            continue
        if key.startswith("tokens"):
            text = f"{value:,.0f}"
        elif key == "lr":
            text = f"{value:.3e}"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return "  ".join(parts)


class RichProgress(Callback):
    """A rich progress bar (rate, ETA, latest loss) with a log line every log step."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=False, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = None
        self.name = config.run_name

    def on_train_start(self, step: int, max_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.name, total=max_steps, completed=step, status="")

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        status = (
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['tokens_per_second']:,.0f} tok/s"
        )
        self.progress.update(self.task, completed=step, status=status)
        self.progress.console.print(f"step {step:>6}  {_format_metrics(metrics)}")

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self.progress.console.print(f"eval {step:>6}  {_format_metrics(metrics)}")

    def on_log(self, message: str) -> None:
        self.progress.console.print(message)

    def on_train_end(self, step: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step)
        self.progress.stop()


class TqdmProgress(Callback):
    def __init__(self, config: Config, run_dir: Path) -> None:
        self.bar = None

    def on_train_start(self, step: int, max_steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True)

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            tok_s=f"{metrics['tokens_per_second']:,.0f}",
        )
        self.bar.update(step - self.bar.n)

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self.bar.write(f"eval {step:>6}  {_format_metrics(metrics)}")

    def on_log(self, message: str) -> None:
        if self.bar is None:
            print(message, file=sys.stderr)
        else:
            self.bar.write(message)

    def on_train_end(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.close()


class PlainLog(Callback):
    """No bar: one line per log step (with ETA) and per eval, for logs and `progress: none`."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.max_steps = config.training.max_steps
        self.window_step = 0
        self.window_time = 0.0

    def on_train_start(self, step: int, max_steps: int) -> None:
        self.window_step, self.max_steps, self.window_time = step, max_steps, time.perf_counter()

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        # ETA from the latest window, not the whole run: the first steps carry compilation
        # and warm-up and would inflate it for the rest of the run.
        now = time.perf_counter()
        seconds_per_step = (now - self.window_time) / max(step - self.window_step, 1)
        self.window_step, self.window_time = step, now
        eta = seconds_per_step * (self.max_steps - step)
        print(
            f"step {step:>6}/{self.max_steps}  {_format_metrics(metrics)}  ETA {_clock(eta)}",
            flush=True,
        )

    def on_eval(self, step: int, metrics: Metrics) -> None:
        print(f"eval {step:>6}  {_format_metrics(metrics)}", flush=True)

    def on_log(self, message: str) -> None:
        print(message, flush=True)


class JsonlLog(Callback):
    """One JSON object per log step and per eval in metrics.jsonl, flushed as written."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"

    def _write(self, kind: str, metrics: Metrics) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, **metrics}) + "\n")

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        self._write("train", metrics)

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self._write("eval", metrics)


class TensorBoardLog(Callback):
    def __init__(self, config: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def _scalars(self, prefix: str, step: int, metrics: Metrics) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        self._scalars("train", step, metrics)

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self._scalars("eval", step, metrics)

    def on_train_end(self, step: int) -> None:
        self.writer.close()


class LossPlot(Callback):
    """loss.png at the end: train loss per log step and val loss per eval, from metrics.jsonl."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_train_end(self, step: int) -> None:
        write_loss_plot(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def write_loss_plot(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train" and "loss" in record:
                train.append((record["step"], record["loss"]))
            elif record.get("kind") == "eval" and "val_loss" in record:
                val.append((record["step"], record["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


@CALLBACKS.register("rich")
def _rich(config: Config, run_dir: Path) -> Callback:
    # A bar only makes sense on a terminal; logs (CI, nohup) get plain lines instead.
    if not sys.stdout.isatty():
        return PlainLog(config, run_dir)
    return RichProgress(config, run_dir)


CALLBACKS.register("tqdm")(TqdmProgress)
CALLBACKS.register("none")(PlainLog)
CALLBACKS.register("jsonl")(JsonlLog)
CALLBACKS.register("tensorboard")(TensorBoardLog)
CALLBACKS.register("plot")(LossPlot)


def build_callbacks(config: Config, run_dir: Path) -> list[Callback]:
    """The callbacks the config asks for: progress style, jsonl, TensorBoard, plot."""
    names = [config.logging.progress, "jsonl"]
    if config.logging.tensorboard:
        names.append("tensorboard")
    if config.logging.plot:
        names.append("plot")
    return [CALLBACKS.get_builder(name, "logging")(config, run_dir) for name in names]

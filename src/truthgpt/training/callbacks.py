"""Trainer events and the built-in callbacks: progress bar, metrics.jsonl, TensorBoard (scalars
and histograms), Weights & Biases, loss.png.

A callback is an object with any of the `Callback` methods; the Trainer calls them by name in
its loop. Built-ins and user callbacks are looked up by name in the `CALLBACKS` registry; a
builder takes `(config, run_dir)` and returns a Callback. A user callback:

    @CALLBACKS.register("my_log")
    class MyLog(Callback):
        def __init__(self, config, run_dir): ...
        def on_eval(self, step, metrics): ...

and `logging.callbacks: [my_log]` in the YAML (plugins register theirs on import through the
`truthgpt.plugins` entry points).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from truthgpt.config import IMAGE_TASKS, Config
from truthgpt.errors import ConfigError
from truthgpt.registry import CALLBACKS

Metrics = dict[str, Any]


class Callback:
    """Trainer events. Override the ones you need; each gets plain numbers."""

    def on_train_start(self, step: int, max_steps: int) -> None: ...

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        """Called every `training.log_every` optimizer steps with loss, lr, tokens/s..."""

    def on_eval(self, step: int, metrics: Metrics) -> None: ...

    def on_gradients(self, step: int, model: Any) -> None:
        """Every `logging.histograms_every` steps, after backward, while gradients exist."""

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_image(self, step: int, name: str, image: Any) -> None:
        """A PIL image the task drew to show its progress (diffusion samples)."""

    def on_log(self, message: str) -> None:
        """A line for the user (a stage finished, a checkpoint written)."""

    def on_train_end(self, step: int) -> None: ...


def _throughput(metrics: Metrics) -> str:
    """`1,234 tok/s` or `87.5 images/s`: the rate the task counts (its `unit`)."""
    for key, value in metrics.items():
        if key.endswith("_per_second"):
            unit = key.removesuffix("_per_second")
            return f"{value:,.0f} tok/s" if unit == "tokens" else f"{value:,.1f} {unit}/s"
    return ""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_metrics(metrics: Metrics) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "step":
            continue
        if key.startswith("tokens") or key.endswith("_seen"):
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
        status = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {_throughput(metrics)}"
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
            rate=_throughput(metrics),
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


class StepTime:
    """Seconds per optimizer step, an exponential moving average over log windows.

    A window that holds an evaluation or a checkpoint is many times slower than the others;
    the latest window alone made the ETA jump (3 to 45 minutes and back). The average weighs
    each window by `smoothing`, so those costs are spread over the run as they really are. The
    first window is used alone and then dropped: it carries warm-up and compilation.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.average: float | None = None
        self.windows = 0
        self.last_step = 0
        self.last_time = 0.0

    def start(self, step: int, now: float) -> None:
        self.last_step, self.last_time, self.windows, self.average = step, now, 0, None

    def update(self, step: int, now: float) -> float:
        """Seconds per step after a window that ended at `step`, `now`."""
        window = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, now
        self.windows += 1
        if self.windows == 1:
            return window
        if self.average is None:
            self.average = window
        else:
            self.average += self.smoothing * (window - self.average)
        return self.average


class PlainLog(Callback):
    """No bar: one line per log step (with ETA) and per eval, for logs and `progress: none`."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.max_steps = config.training.max_steps
        self.step_time = StepTime()

    def on_train_start(self, step: int, max_steps: int) -> None:
        self.max_steps = max_steps
        self.step_time.start(step, time.perf_counter())

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        eta = self.step_time.update(step, time.perf_counter()) * (self.max_steps - step)
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
    """Scalars under train/ and eval/. A resumed run purges the events logged after its
    checkpoint, so TensorBoard shows one curve, not the crashed run's tail beside the new one."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.log_dir = run_dir / "tb"
        self.writer: Any = None

    def on_train_start(self, step: int, max_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step or None)

    def _scalars(self, prefix: str, step: int, metrics: Metrics) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        self._scalars("train", step, metrics)

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self._scalars("eval", step, metrics)

    def on_image(self, step: int, name: str, image: Any) -> None:
        import numpy as np

        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def on_train_end(self, step: int) -> None:
        if self.writer is not None:
            self.writer.close()


class ImageFiles(Callback):
    """The task's images as PNGs: `<run>/<name>/step_000500.png` (e.g. samples/)."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_image(self, step: int, name: str, image: Any) -> None:
        folder = self.run_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:06d}.png"
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp)
        os.replace(tmp, path)


class HistogramLog(Callback):
    """TensorBoard histograms of every trainable weight and its gradient, on the steps the
    Trainer emits `on_gradients` (every `logging.histograms_every`), under weights/ and grads/."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def on_gradients(self, step: int, model: Any) -> None:
        for name, param in model.named_parameters():
            if not param.requires_grad:  # frozen (LoRA base) weights never change
                continue
            # torch.compile and DDP prefix the names; the tag should not depend on the wrapper.
            tag = name.replace("_orig_mod.", "").removeprefix("module.")
            self.writer.add_histogram(f"weights/{tag}", param.detach().float().cpu(), step)
            if param.grad is not None:
                self.writer.add_histogram(f"grads/{tag}", param.grad.detach().float().cpu(), step)
        self.writer.flush()

    def on_train_end(self, step: int) -> None:
        self.writer.close()


WANDB_MISSING = (
    "logging.wandb is true but the wandb package is not installed: "
    "pip install 'truthgpt[wandb]' (or set logging.wandb: false)"
)


class WandbLog(Callback):
    """Weights & Biases: train metrics under train/, eval metrics under eval/, by optimizer step.

    Offline (files under <run_dir>/wandb, `wandb sync` uploads them later) unless WANDB_API_KEY
    or WANDB_MODE is set: a run never blocks on a login prompt or a network it lacks.
    """

    def __init__(self, config: Config, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(WANDB_MISSING) from None
        self.wandb = wandb
        self.config = config
        self.run_dir = run_dir
        self.run: Any = None

    def on_train_start(self, step: int, max_steps: int) -> None:
        online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
        self.run = self.wandb.init(
            project=self.config.logging.wandb_project,
            name=self.config.run_name,
            dir=str(self.run_dir),
            config=self.config.model_dump(mode="json"),
            mode=None if online else "offline",
        )

    def _log(self, prefix: str, step: int, metrics: Metrics) -> None:
        if self.run is None:
            return
        values = {
            f"{prefix}/{key}": value
            for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float))
        }
        self.run.log(values, step=step)

    def on_step_end(self, step: int, metrics: Metrics) -> None:
        self._log("train", step, metrics)

    def on_eval(self, step: int, metrics: Metrics) -> None:
        self._log("eval", step, metrics)

    def on_train_end(self, step: int) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class LossPlot(Callback):
    """loss.png at the end: train loss per log step and val loss per eval, from metrics.jsonl."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.run_dir = run_dir
        image_task = config.task in IMAGE_TASKS
        self.loss_label = "noise MSE (per element)" if image_task else "cross-entropy (nats/token)"

    def on_train_end(self, step: int) -> None:
        write_loss_plot(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", self.loss_label)


def write_loss_plot(
    metrics_path: Path, png_path: Path, loss_label: str = "cross-entropy (nats/token)"
) -> None:
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
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_label)
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
CALLBACKS.register("images")(ImageFiles)
CALLBACKS.register("tensorboard")(TensorBoardLog)
CALLBACKS.register("plot")(LossPlot)
CALLBACKS.register("histograms")(HistogramLog)
CALLBACKS.register("wandb")(WandbLog)


def build_callbacks(config: Config, run_dir: Path) -> list[Callback]:
    """The callbacks the config asks for: progress style, jsonl, image PNGs, TensorBoard,
    histograms, plot,
    wandb, then each name of `logging.callbacks` (each name once)."""
    logging = config.logging
    names = [logging.progress, "jsonl", "images"]
    if logging.tensorboard:
        names.append("tensorboard")
    if logging.histograms_every:
        names.append("histograms")
    if logging.plot:
        names.append("plot")
    if logging.wandb:
        names.append("wandb")
    names += logging.callbacks
    names = list(dict.fromkeys(names))
    return [CALLBACKS.get_builder(name, "logging.callbacks")(config, run_dir) for name in names]

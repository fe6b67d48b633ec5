"""Training tasks (the TASKS registry): what a run learns, as the Trainer asks for it.

A task builds the data and the model, computes the loss of a batch, counts what throughput and
FLOPs are measured in, and saves the model with what a checkpoint needs beside it (the
tokenizer). Everything that guards a run (resume, non-finite guard, EMA, checkpoints,
callbacks, progress) is the Trainer's, which names no task: `config.task` picks one here.

- `causal_lm`: next-token loss on every token of text packed into `data.max_seq_len` blocks.
- `sft`: next-token loss on the answers of chat rows only (bucketed or packed examples).
- `image-generation`: the denoising loss of a text-to-image diffusion model
  (`diffusion_task.py`).

A task may also draw pictures of its progress: a `sample_every` attribute (steps; 0: never) and
a `samples(model, step)` method returning named PIL images, which the Trainer hands to the
callbacks' `on_image` (TensorBoard, PNGs in the run folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from truthgpt.config import Config
from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.data.prepare import PreparedData, prepare_causal_lm_data, prepare_sft_data
from truthgpt.errors import ConfigError
from truthgpt.models import load_model, save_model
from truthgpt.models.build import checkpoint_hf_activations
from truthgpt.models.export import write_generation_defaults
from truthgpt.registry import ARCHS, TASKS

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """What the Trainer needs from a task. `TASKS` builders take the `Config` and return one.

    `loss` returns (mean loss, target count): the count of targets the mean is over (a tensor
    or an int). It weights each batch: the Trainer sums mean x count over a step's micro-batches
    and ranks and divides by the summed count, so every target of a step weighs the same, and
    an evaluation weighs its batches the same way. `count_tokens` is what throughput counts
    (`tokens_per_second`, `tokens_seen`) and `flops_per_token` its cost, for MFU.

    Optional attributes, read with a default: `unit` names what count_tokens counts ("tokens";
    "images" gives `images_per_second`, `images_seen`), `reports_perplexity` (True) says the
    loss is a cross-entropy whose exp means something, `describe_model(model)` names the model
    in the first log line (default: model.arch), `sample_every` / `samples(model, step)` draw
    pictures of the progress, `builds_on_meta` (True) says `build_model` may run on the meta
    device (FSDP's ranks but the first build there; distributed.build_on_ranks).
    """

    def build_data(self, run_dir: Path | None, log: Callable[[str], None]) -> PreparedData: ...

    def build_model(self, data: PreparedData) -> nn.Module:
        """A fresh model, ready to train (`prepare_model` applied)."""
        ...

    def load_model(self, folder: Path, device: str | torch.device = "cpu") -> nn.Module:
        """The trainable model a checkpoint folder holds, before `prepare_model`."""
        ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def save(self, model: nn.Module, data: PreparedData, folder: Path) -> None:
        """Write the model and what using it needs (the tokenizer) into a checkpoint folder."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def count_tokens(self, batch: Batch) -> int: ...

    def flops_per_token(self, model: nn.Module) -> float | None: ...


def task_unit(task: Task) -> str:
    """What the task's `count_tokens` counts: "tokens" unless the task says otherwise."""
    return getattr(task, "unit", "tokens")


def build_task(config: Config) -> Task:
    """The task `config.task` names, from the TASKS registry."""
    return TASKS.get_builder(config.task, "task")(config)


class LanguageModelTask:
    """Next-token prediction with a decoder from `model.arch`; the subclasses differ in data."""

    # How the subclass reads its data: (config, run_dir, log) -> PreparedData.
    prepare_data: Callable[[Config, Path | None, Callable[[str], None]], PreparedData]

    def __init__(self, config: Config) -> None:
        self.config = config

    def build_data(self, run_dir: Path | None, log: Callable[[str], None]) -> PreparedData:
        return type(self).prepare_data(self.config, run_dir, log)

    def build_model(self, data: PreparedData) -> nn.Module:
        return build_model(self.config, vocab_size=len(data.tokenizer))

    def load_model(self, folder: Path, device: str | torch.device = "cpu") -> nn.Module:
        # A run trained with `arch: hf` resumes on the transformers modules its optimizer
        # state belongs to, even where the native decoder could open the weights.
        native = None if self.config.model.arch != "hf" else False
        return load_model(folder, device=device, trainable=True, native=native)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return prepare_model_for_training(model, self.config)

    def save(self, model: nn.Module, data: PreparedData, folder: Path) -> None:
        save_model(model, folder)
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(folder)
            write_generation_defaults(folder, data.tokenizer)  # generate() stops at its eos

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # The model's loss averages over the labels that are not -100, shifted by one.
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return model(**batch).loss, targets

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["input_ids"].numel())

    def flops_per_token(self, model: nn.Module) -> float | None:
        if not hasattr(model, "flops_per_token"):  # a transformers model
            return None
        return model.flops_per_token(self.config.data.max_seq_len)


@TASKS.register("causal_lm")
class CausalLMTask(LanguageModelTask):
    prepare_data = staticmethod(prepare_causal_lm_data)


@TASKS.register("sft")
class SFTTask(LanguageModelTask):
    prepare_data = staticmethod(prepare_sft_data)


@TASKS.register("image-generation")
def image_generation_task(config: Config) -> Task:
    """Text-to-image diffusion (training/diffusion_task.py); diffusers is imported only here."""
    from truthgpt.quiet import drop_if_clip_notices, drop_torchvision_notices

    # Before diffusers' pipelines load (they touch transformers' image processors), and before
    # a checkpoint of a pixel-space run is opened as IFPipeline.
    drop_torchvision_notices()
    drop_if_clip_notices()
    from truthgpt.training.diffusion_task import ImageGenerationTask

    return ImageGenerationTask(config)


# ---------------------------------------------------------------------------------------------
# Model assembly for the language tasks


def build_model(config: Config, vocab_size: int) -> nn.Module:
    """The model the config names, built by the ARCHS registry, with LoRA and checkpointing."""
    builder = ARCHS.get_builder(config.model.arch, "model.arch")
    model = builder(config.model, vocab_size)
    return prepare_model_for_training(model, config)


def uses_fused_loss(config: Config, model: nn.Module) -> bool:
    """Whether training.fused_loss is on for this model: true, or auto on a native decoder
    where the Triton loss kernel runs (the chunked PyTorch loss alone is slower than plain).
    True on a model that computes its loss in transformers is a ConfigError."""
    setting = config.training.fused_loss
    native = hasattr(model.get_base_model() if _is_peft(model) else model, "fused_loss")
    if setting is True and not native:
        raise ConfigError(
            "training.fused_loss: needs the native decoder (model.arch llama or gpt2); "
            f"model.arch {config.model.arch!r} computes its loss in transformers"
        )
    if setting != "auto":
        return setting
    from truthgpt.hardware import resolve_device
    from truthgpt.models.fused_loss import loss_kernel_available

    return native and loss_kernel_available(resolve_device(config.hardware.device))


def check_residual_dtype(config: Config, dtype: torch.dtype) -> None:
    """A ConfigError when training.residual_dtype cannot work in a run that computes in
    `dtype`: a bf16 stream needs a bf16 run (fp16's range would overflow it)."""
    if config.training.residual_dtype == "bf16" and dtype != torch.bfloat16:
        computes = str(dtype).removeprefix("torch.")
        raise ConfigError(
            f"training.residual_dtype: 'bf16' needs a bf16 run; this one computes in {computes} "
            f"(training.precision {config.training.precision!r})"
        )


def apply_residual_dtype(model: nn.Module, config: Config) -> None:
    """training.residual_dtype onto a native decoder: fp32 or bf16 set its residual stream's
    dtype; auto leaves the embeddings' own (fp32 weights give fp32, FSDP's bf16 gathered
    weights bf16)."""
    setting = config.training.residual_dtype
    if setting == "auto":
        return
    from truthgpt.hardware import resolve_device, resolve_precision

    base = model.get_base_model() if _is_peft(model) else model
    if not hasattr(base, "residual_dtype"):
        raise ConfigError(
            f"training.residual_dtype: {setting!r} needs the native decoder (model.arch llama or "
            f"gpt2); model.arch {config.model.arch!r} keeps its own (allowed here: auto)"
        )
    device = resolve_device(config.hardware.device)
    check_residual_dtype(config, resolve_precision(config.training.precision, device))
    base.residual_dtype = torch.bfloat16 if setting == "bf16" else torch.float32


def prepare_model_for_training(model: nn.Module, config: Config) -> nn.Module:
    if config.training.gradient_checkpointing:
        set_gradient_checkpointing(model)
    if uses_fused_loss(config, model):
        base = model.get_base_model() if _is_peft(model) else model
        base.fused_loss = True
    apply_residual_dtype(model, config)
    if config.training.packed_attention != "dense":
        base = model.get_base_model() if _is_peft(model) else model
        if hasattr(base, "packed_attention"):
            base.packed_attention = config.training.packed_attention
        elif config.training.packed_attention == "flex":
            raise ConfigError(
                "training.packed_attention: 'flex' needs the native decoder (model.arch llama or "
                f"gpt2); model.arch {config.model.arch!r} attends in transformers (allowed "
                "here: auto, dense)"
            )
    if config.model.lora.enabled and not _is_peft(model):
        from truthgpt.models.lora import apply_lora

        model = apply_lora(model, config.model.lora, config.model.arch)
    return model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def set_gradient_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if _is_peft(model) else model
    if hasattr(base, "set_gradient_checkpointing"):  # our Decoder
        base.set_gradient_checkpointing(True)
    else:  # transformers
        checkpoint_hf_activations(base)
        if _is_peft(model) or not any(
            p.requires_grad for p in base.get_input_embeddings().parameters()
        ):
            base.enable_input_require_grads()

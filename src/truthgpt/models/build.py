"""Model builders behind `model.arch` (the ARCHS registry), and opening / saving any model folder.

- `llama`, `gpt2`: the native Decoder, from the config fields or from a local HF folder
  (`model.init_from`).
- `hf`: any `transformers.AutoModelForCausalLM`, from `model.init_from` or a config dict
  (`model.hf_config`, with its `model_type`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from truthgpt.config import CONFIG_FILE, ModelConfig
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.guard import (
    CHECKPOINTS,
    LORA_WEIGHTS,
    SHARDED_DIR,
    STEP_FOLDER,
    is_checkpoint_folder,
)
from truthgpt.local_paths import check_init_from
from truthgpt.manifest import check_manifest
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.hf_io import is_native, load_hf, read_hf_config, save_hf
from truthgpt.models.lora import (
    ADAPTER_DIR,
    adapter_is_native,
    base_state_dict,
    is_peft_model,
    load_adapter,
    plain_decoder,
)
from truthgpt.quiet import no_load_save_bars
from truthgpt.registry import ARCHS

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5 renamed from_pretrained's torch_dtype to dtype and always saves safetensors.
_DTYPE_KWARG = "dtype" if _TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
_SAVE_KWARGS: dict[str, Any] = {} if _TRANSFORMERS_MAJOR >= 5 else {"safe_serialization": True}

# Embedding tables padded to a multiple of 64 rows keep matmuls on fast tensor-core shapes
# (nanoGPT's 50257 -> 50304); the extra ids are never produced by the tokenizer.
VOCAB_MULTIPLE = 64


def round_vocab(vocab_size: int) -> int:
    """vocab_size rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def default_intermediate_size(arch: str, hidden_size: int) -> int:
    """MLP width: gpt2 4*hidden; llama 8/3*hidden (SwiGLU's three matrices then cost what two
    4*hidden ones do, Shazeer 2020), rounded up to a multiple of 64."""
    if arch == "gpt2":
        return 4 * hidden_size
    return -(-8 * hidden_size // (3 * 64)) * 64


def decoder_config(cfg: ModelConfig, vocab_size: int) -> DecoderConfig:
    """The DecoderConfig that the `model:` section describes (without init_from)."""
    return DecoderConfig(
        family=cfg.arch,
        vocab_size=cfg.vocab_size or round_vocab(vocab_size),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size
        or default_intermediate_size(cfg.arch, cfg.hidden_size),
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout,
    )


def _check_vocab(model_vocab: int, vocab_size: int, init_from: str) -> None:
    if vocab_size > model_vocab:
        raise ConfigError(
            f"model.init_from: {init_from!r} has {model_vocab} token embeddings but the tokenizer "
            f"has {vocab_size} tokens; use the tokenizer that came with the model"
        )


def _build_native(cfg: ModelConfig, vocab_size: int) -> Decoder:
    if not cfg.init_from:
        return Decoder(decoder_config(cfg, vocab_size))
    check_init_from(cfg)
    folder = Path(cfg.init_from).expanduser()
    model = load_hf(folder, dtype=torch.float32, dropout=cfg.dropout)
    _check_vocab(model.config.vocab_size, vocab_size, cfg.init_from)
    return model


def _build_hf(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    overrides = dict(cfg.hf_config)
    if cfg.init_from:
        overrides.pop("model_type", None)  # the folder's own config says what it is
        try:
            with no_load_save_bars():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    cfg.init_from, **{_DTYPE_KWARG: torch.float32}, **overrides
                )
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"model.init_from: cannot load {cfg.init_from!r}: {exc}"
            ) from None
        _check_vocab(model.config.vocab_size, vocab_size, cfg.init_from)
        return model
    if "model_type" not in overrides:
        raise ConfigError(
            "model.arch is 'hf' but neither model.init_from (a model folder) nor "
            "model.hf_config.model_type (e.g. gpt_neox, opt) is set"
        )
    overrides.setdefault("vocab_size", round_vocab(vocab_size))
    try:
        hf_config = transformers.AutoConfig.for_model(**overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.hf_config: {exc}") from None
    if not set(overrides) - {"model_type", "vocab_size"}:
        # model.hidden_size and friends are the native decoder's; transformers would build the
        # type's full default size (a gpt_neox is 20B parameters, out of memory on most hosts).
        raise ConfigError(
            f"model.hf_config: gives no shape for a {overrides['model_type']!r} model, and "
            "model.hidden_size / num_layers / num_heads are not read for model.arch hf; put the "
            "type's own fields in model.hf_config (e.g. hidden_size, num_hidden_layers, "
            "num_attention_heads, intermediate_size)"
        )
    try:
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.hf_config: {exc}") from None


def resolve_model_folder(
    path: str | Path, hashes: bool | None = None, warn: Callable[[str], None] | None = None
) -> Path:
    """A run folder -> its newest valid checkpoint of best/, last/, step_N/ (a damaged one is
    skipped with a warning); a checkpoint folder -> itself once its manifest checks out; any
    other model folder -> itself.

    hashes: compare SHA-256 too (True), never (False), or when the folder is small (None).
    """
    warn = warn or _warn
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a model folder)")
    if path.is_file():  # a training YAML, say: `generate` and `serve` take one as --config
        raise CheckpointError(
            f"{path} is a file; expected a run folder (runs/NAME) or a model folder (one with "
            "config.json)"
        )
    checkpoints = path / CHECKPOINTS
    # config.yaml is written when training starts, checkpoints/ only at the first save.
    if checkpoints.is_dir() or (path / CONFIG_FILE).is_file():
        steps = []
        if checkpoints.is_dir():
            steps = sorted(
                (p for p in checkpoints.iterdir() if STEP_FOLDER.fullmatch(p.name)), reverse=True
            )
        found_any = False
        for folder in [checkpoints / "best", checkpoints / "last", *steps]:
            if not folder.is_dir():
                continue
            found_any = True
            try:
                check_manifest(folder, hashes)
            except CheckpointError as exc:
                warn(f"warning: skipping checkpoint {folder.name}/: {exc}")
                continue
            return folder
        if found_any:
            raise CheckpointError(f"{path} is a run folder without a complete checkpoint")
        raise CheckpointError(
            f"{path} is a run folder with no finished checkpoint yet (no checkpoints/best "
            "or checkpoints/last): its training stopped before the first save "
            "(checkpoint.save_every) or is still running; train it further, then try again"
        )
    if is_checkpoint_folder(path):
        check_manifest(path, hashes)
    elif not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a run folder or an HF model folder")
    return path


def check_language_model_folder(folder: Path) -> None:
    """A CheckpointError that says what `folder` holds when it is a model folder of another
    kind than a language model's: FSDP shards, a diffusion pipeline or a diffusion LoRA."""
    if (folder / SHARDED_DIR).is_dir():
        raise CheckpointError(
            f"{folder} holds FSDP shards, not a model folder: write one with "
            "`truthgpt export RUN --out DIR`, then use DIR"
        )
    if (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder} holds a diffusion pipeline (model_index.json), not a language model: "
            "`truthgpt image` generates with it, and diffusers opens it as it is "
            "(DiffusionPipeline.from_pretrained)"
        )
    if (folder / LORA_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} holds a diffusion LoRA adapter ({LORA_WEIGHTS}), not a language model: "
            "`truthgpt image RUN` draws with it on its base pipeline (the run's "
            f"model.init_from), as does `truthgpt image BASE --lora {folder}`"
        )


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    native: bool | None = None,
) -> nn.Module:
    """Open a model folder: the native Decoder when its config maps onto it, else transformers'
    AutoModelForCausalLM (local files only). dtype None keeps the checkpoint's dtype.

    native=False forces transformers (a run trained with `arch: hf` resumes on the same
    modules its optimizer state belongs to); None picks the native decoder where it can.

    A folder with `adapter/` (LoRA, peft format) comes back as a peft.PeftModel around the base;
    trainable=True leaves the adapter weights trainable (to resume training).
    """
    folder = Path(path).expanduser()
    check_language_model_folder(folder)
    hf_config = read_hf_config(folder)  # CheckpointError when the folder or config.json is missing
    if is_checkpoint_folder(folder):
        # Sizes only (one stat per file): resolve_model_folder or find_resumable did the hashes.
        check_manifest(folder, hashes=False)
    adapter = folder / ADAPTER_DIR
    has_adapter = adapter.is_dir()
    # An adapter names the modules of the model it was trained on: one made on a transformers
    # Llama (q_proj, ...) needs that model even where our Decoder could open the base weights.
    use_native = native is not False and is_native(hf_config)
    if use_native and (not has_adapter or adapter_is_native(adapter)):
        try:
            model = load_hf(folder, device=device, dtype=dtype)
        except (OSError, SafetensorError) as exc:  # a damaged file in a folder without manifest
            raise CheckpointError(f"cannot read the weights in {str(folder)!r}: {exc}") from None
    else:
        try:
            with no_load_save_bars():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, local_files_only=True, **{_DTYPE_KWARG: dtype or "auto"}
                )
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the model in {str(folder)!r}: {exc}") from None
        model = model.to(device)
    if has_adapter:
        try:
            model = load_adapter(model, str(adapter), trainable=trainable).to(device)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"cannot load the LoRA adapter in {str(adapter)!r}: {exc}"
            ) from None
    return model


@no_load_save_bars()
def save_model(model: nn.Module, folder: Path) -> None:
    """Write a model folder (config.json + safetensors) that load_model and transformers open.

    A peft.PeftModel is written as its base model (adapters left out) plus `adapter/` in peft
    format (adapter_config.json + adapter_model.safetensors).
    """
    folder = Path(folder)
    if is_peft_model(model):
        base = model.get_base_model()
        if isinstance(base, Decoder):
            save_hf(plain_decoder(model), folder)
        else:
            base.save_pretrained(folder, state_dict=base_state_dict(model), **_SAVE_KWARGS)
        model.save_pretrained(folder / ADAPTER_DIR, **_SAVE_KWARGS)
        return
    if isinstance(model, Decoder):
        save_hf(model, folder)
        return
    model.save_pretrained(folder, **_SAVE_KWARGS)


# ---------------------------------------------------------------------------------------------
# Registry entries: `model.arch` names -> (ModelConfig, tokenizer vocab size) -> model


@ARCHS.register("llama")
def build_llama(cfg: ModelConfig, vocab_size: int) -> Decoder:
    """Llama-family native decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention)."""
    return _build_native(cfg, vocab_size)


@ARCHS.register("gpt2")
def build_gpt2(cfg: ModelConfig, vocab_size: int) -> Decoder:
    """GPT-2 native decoder (learned positions, LayerNorm, GELU)."""
    return _build_native(cfg, vocab_size)


@ARCHS.register("hf")
def build_hf(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """Any transformers AutoModelForCausalLM, from model.init_from or model.hf_config."""
    return _build_hf(cfg, vocab_size)


def checkpoint_hf_activations(model: nn.Module) -> None:
    """Recompute a transformers model's activations in backward (non-reentrant checkpoints).
    transformers 5 renamed gradient_checkpointing_enable, which now warns on every call (gone
    in v6); earlier versions have only that name."""
    options = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

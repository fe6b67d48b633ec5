"""The YAML schema: one pydantic tree that mirrors the file, its loading, overrides and saving.

Every default lives here, next to its field. `load()` reads a YAML file or a run folder, applies
`--set key.path=value` overrides and returns a validated, frozen `Config`; every error names the
full key path, the bad value and what is allowed, with a "did you mean" for unknown keys (the
wording is config_errors.py's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from truthgpt.config_errors import field_error, format_errors, unknown_key_problem
from truthgpt.errors import ConfigError, did_you_mean
from truthgpt.guard import is_run_folder
from truthgpt.registry import (
    ARCHS,
    CALLBACKS,
    IMAGE_SOURCES,
    OPTIMIZERS,
    SCHEDULES,
    SOURCES,
    TASKS,
    Registry,
)

CONFIG_FILE = "config.yaml"
RUN_CONFIG = "run_config.yaml"  # in each checkpoint: the resolved config it was trained with


class Section(BaseModel):
    """A config section: unknown keys are errors, values are read-only after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_registered(registry: Registry, name: str) -> str:
    if not registry.knows(name):
        hint = did_you_mean(name, registry.names())
        raise ValueError(
            f"unknown {registry.kind} {name!r}{hint} (allowed: {', '.join(registry.names())})"
        )
    return name


class TokenizerConfig(Section):
    path: str | None = Field(
        None,
        description="local HF tokenizer folder; empty: train a byte-level BPE on the train split",
    )
    vocab_size: int = Field(8192, ge=260, description="size of the trained BPE vocabulary")
    train_max_chars: int = Field(
        50_000_000, ge=1, description="at most this many characters of text train the BPE"
    )


class DataConfig(Section):
    source: str = Field(
        "python-stdlib",
        description="text: python-stdlib | text | jsonl | hf | webdataset (tar shards); "
        "images: digits | imagefolder",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="text/jsonl/hf: files or globs; webdataset: .tar shards; "
        "imagefolder: one folder",
    )
    val_paths: list[str] = Field(
        default_factory=list, description="explicit validation files; empty: split off val_fraction"
    )
    field: str = Field(
        "text", description="jsonl/hf (webdataset: .json members): the field that holds the text"
    )
    hf_name: str | None = Field(
        None, description="hf: dataset name or builder (json, text, parquet, csv)"
    )
    hf_config_name: str | None = Field(None, description="hf: dataset configuration name")
    hf_split: str = Field("train", description="hf: the split to read")
    streaming: bool = Field(False, description="hf: stream instead of downloading/caching it all")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out")
    max_documents: int | None = Field(
        None, ge=1, description="read at most this many documents (quick runs)"
    )
    max_seq_len: int = Field(256, ge=8, description="tokens per packed training block")
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes (webdataset: one stream each)"
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    sft_format: Literal["auto", "messages", "prompt_completion"] = Field(
        "auto", description="task sft: jsonl rows with `messages`, or `prompt`/`completion`"
    )
    batching: Literal["auto", "pack", "bucket"] = Field(
        "auto",
        description="auto: pack for causal_lm, bucket for sft; bucket = length-grouped batches, "
        "dynamic padding; pack = fixed blocks (sft: attention kept inside each example)",
    )
    overlong: Literal["truncate", "keep_end", "drop"] = Field(
        "truncate",
        description="sft examples longer than max_seq_len: truncate keeps the first max_seq_len "
        "tokens, keep_end the last ones (a long prompt loses its start, the final answer stays, "
        "as TRL's truncation_mode keep_end); an example left without answer tokens is skipped; "
        "drop skips it (all counted, with the longest row's length)",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if IMAGE_SOURCES.knows(value):
            return value
        if not SOURCES.knows(value):
            names = sorted(set(SOURCES.names()) | set(IMAGE_SOURCES.names()))
            hint = did_you_mean(value, names)
            raise ValueError(f"unknown data source {value!r}{hint} (allowed: {', '.join(names)})")
        return value


class LoraConfig(Section):
    enabled: bool = Field(
        False, description="train low-rank adapters (peft) instead of all weights"
    )
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: updates scale by alpha/r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; empty: every attention and MLP projection"
    )


class ModelConfig(Section):
    arch: str = Field("llama", description="llama | gpt2 (native decoder) | hf (any AutoModel)")
    init_from: str | None = Field(
        None,
        description="local HF model folder to start from; its shape overrides the fields below "
        "(task image-generation: a diffusers pipeline folder to fine-tune)",
    )
    hidden_size: int = Field(256, ge=8, description="width of the residual stream")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention (query) heads")
    num_kv_heads: int | None = Field(
        None, ge=1, description="llama: grouped-query attention heads; empty: num_heads"
    )
    intermediate_size: int | None = Field(
        None, ge=1, description="MLP width; empty: llama 8/3*hidden (multiple of 64), gpt2 4*hidden"
    )
    max_position_embeddings: int = Field(1024, ge=8, description="longest sequence the model takes")
    rope_theta: float = Field(10000.0, gt=0, description="llama: RoPE base frequency")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of RMSNorm/LayerNorm")
    tie_embeddings: bool = Field(True, description="share input embedding and output head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and MLP outputs")
    vocab_size: int | None = Field(
        None, ge=1, description="empty: the tokenizer's size, rounded up to a multiple of 64"
    )
    hf_config: dict[str, Any] = Field(
        default_factory=dict,
        description="arch hf: a transformers config dict with model_type and the shape in the "
        "type's own names (hidden_size, num_hidden_layers, ...); model.hidden_size etc. are not "
        "read",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _check_registered(ARCHS, value)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.arch == "hf" or self.init_from:
            return self
        if self.hidden_size % self.num_heads:
            raise field_error(
                "hidden_size",
                f"not divisible by num_heads ({self.num_heads})",
                f"multiples of {self.num_heads}, or a num_heads that divides it",
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise field_error(
                "num_heads",
                f"not divisible by num_kv_heads ({kv})",
                f"multiples of {kv}, or a num_kv_heads that divides it",
            )
        return self


class NonFiniteConfig(Section):
    max_consecutive: int = Field(
        3, ge=1, description="skipped non-finite updates in a row before `action` is taken"
    )
    action: Literal["stop", "rollback"] = Field(
        "stop", description="stop with a message, or reload the last good checkpoint"
    )
    rollback_lr_factor: float = Field(
        0.5, gt=0, le=1, description="rollback: multiply the learning rate by this"
    )
    max_rollbacks: int = Field(3, ge=0, description="rollback: give up after this many")
    decide: Literal["auto", "host"] = Field(
        "auto",
        description="auto: a fused optimizer (AdamW on CUDA) skips a non-finite update on the "
        "device and the loop reads the counts at log steps (no host sync per step); host: "
        "read the verdict every step (one sync per step, for every optimizer)",
    )


class EmaConfig(Section):
    enabled: bool = Field(False, description="keep an exponential moving average of the weights")
    decay: float = Field(0.999, gt=0, lt=1, description="ema = decay*ema + (1-decay)*weights")
    every: int = Field(1, ge=1, description="update the average every k optimizer steps")
    evaluate: bool = Field(False, description="evaluate (and select best) with the EMA weights")


class EarlyStoppingConfig(Section):
    enabled: bool = Field(False, description="stop when the metric stops improving")
    metric: Literal["val_loss", "val_ppl"] = Field(
        "val_loss", description="val_loss | val_ppl: the evaluation metric watched"
    )
    mode: Literal["min", "max"] = Field("min", description="min: lower is better; max: higher")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smaller changes do not count as improvement")


class TrainingConfig(Section):
    max_steps: int = Field(1000, ge=1, description="optimizer steps; caps the run")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    micro_batch: Literal["auto"] | None = Field(
        None,
        description="auto: keep the global batch (batch_size x grad_accum_steps) and train it in "
        "the largest micro-batches that fit in GPU memory (probed at the start; a CPU keeps the "
        "split); empty: as given",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp32"
    )
    tf32: bool = Field(True, description="allow TF32 matmuls on Ampere+ GPUs")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; empty: off")
    eval_every: int = Field(200, ge=1, description="optimizer steps between evaluations")
    eval_batches: int = Field(20, ge=1, description="micro-batches per evaluation")
    log_every: int = Field(10, ge=1, description="optimizer steps between log lines")
    compile: bool = Field(False, description="torch.compile the model")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default",
        description="torch.compile mode: max-autotune-no-cudagraphs also tries more matmul "
        "kernels (minutes to compile); reduce-overhead replays CUDA graphs (no launch cost per "
        "kernel; gradients stay allocated between steps)",
    )
    compile_scope: Literal["model", "blocks"] = Field(
        "model",
        description="what torch.compile covers: model: the whole model as one graph; blocks: each "
        "transformer block on its own, one compilation shared by all of them (a much shorter "
        "warm-up for deep models; embedding, head and loss stay eager)",
    )
    fused_loss: bool | Literal["auto"] = Field(
        "auto",
        description="native decoder: LM head + cross-entropy in row chunks, never holding the "
        "whole logits tensor (less memory for large vocabularies); on CUDA the cross-entropy "
        "between the chunk's GEMMs is one Triton kernel. auto: on where that kernel runs (CUDA "
        "with triton: +5% tokens/s and -37% peak memory on GPT-2, benchmarks/RESULTS.md)",
    )

    residual_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="native decoder: the dtype of the residual stream between blocks (and of "
        "its gradients). fp32: autocast's, as nanoGPT; bf16: half its memory traffic, as llm.c "
        "and torchtitan (needs a bf16 run; GPT-2 on an H100: +5.6% tokens/s, val loss +0.26% "
        "at step 300, benchmarks/RESULTS.md); auto: the weights' dtype, so fp32, except bf16 "
        "under fsdp with bf16 gathered weights (training.fsdp_param_dtype)",
    )

    @field_validator("fused_loss", mode="before")
    @classmethod
    def _fused_loss_choice(cls, value: Any) -> bool | str:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    # Default dense until flex has been timed and checked on a GPU (benchmarks/RESULTS.md).
    packed_attention: Literal["auto", "dense", "flex"] = Field(
        "dense",
        description="native decoder, packed documents (data.batching: pack): dense = a boolean "
        "[T, T] mask for SDPA (off its flash kernel), flex = a FlexAttention block mask that "
        "skips the empty tiles (CUDA only, model.dropout 0, heads of 16 dimensions or more); auto: "
        "flex where it can run, else dense",
    )
    fp8: Literal["none", "tensorwise", "rowwise"] = Field(
        "none",
        description="FP8 matmuls for the linear layers (torchao's float8 recipes, pip install "
        "'truthgpt[fp8]'; GPUs of compute capability 8.9+, elsewhere ignored with a warning); "
        "tensorwise is the faster, "
        "rowwise the more accurate; best with compile",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in backward: less memory, one extra forward per step",
    )
    parallel: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto",
        description="across torchrun processes: ddp (replicas), fsdp (FSDP2 shards of weights, "
        "gradients and optimizer state) or none; auto: ddp with more than one process, else none",
    )
    fsdp_param_dtype: Literal["auto", "fp32"] = Field(
        "auto",
        description="parallel fsdp: the dtype its gathered weights have in forward and backward; "
        "auto: bf16 in a bf16 run (half the all-gather bytes and the gathered copy, the "
        "residual stream in bf16, gradients reduced in fp32, shards and optimizer state stay "
        "fp32, as torchtitan), else fp32; fp32: gathered in fp32 and cast by autocast, as "
        "under ddp",
    )
    resume: bool | Literal["auto"] = Field(
        False,
        description="true: continue from checkpoints/last (error if none); auto: continue if "
        "there is one, else start; false: refuse a run folder that holds a run",
    )
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)


class OptimConfig(Section):
    name: str = Field(
        "adamw",
        description="adamw | adamw8bit (bitsandbytes, CUDA) | muon | lion | adafactor | sgd, or a "
        "plugin's; muon: Muon on the hidden weight matrices, AdamW (lr, betas, eps, "
        "weight_decay) on the rest",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="not applied to norms, biases, embeddings")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam beta1, beta2")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    schedule: str = Field("cosine", description="cosine | linear | constant (after warmup)")
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    fused: bool | None = Field(
        None, description="adamw: fused kernel; empty: fused on CUDA, foreach elsewhere"
    )
    muon_lr: float = Field(
        0.02, gt=0, description="muon: peak lr of the hidden matrices (scaled by the schedule)"
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum")
    muon_weight_decay: float = Field(
        0.01, ge=0, description="muon: decoupled weight decay of the hidden matrices"
    )

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _check_registered(OPTIMIZERS, value)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        return _check_registered(SCHEDULES, value)

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        # Averaging factors of Adam and Lion: torch refuses one outside [0, 1) at the first step.
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(
                "each beta must be in [0, 1) (allowed: two numbers in [0, 1), e.g. [0.9, 0.95])"
            )
        return value


class CheckpointConfig(Section):
    save_every: int = Field(500, ge=1, description="optimizer steps between saves of last/")
    keep_last: int = Field(
        2, ge=0, description="step_N/ folders to keep (one per save); 0: only last/ and best/"
    )
    select_best_by: Literal["val_loss", "val_ppl"] = Field(
        "val_loss", description="metric that picks checkpoints/best"
    )
    best_mode: Literal["min", "max"] = Field("min", description="lower or higher is better")


class LoggingConfig(Section):
    progress: Literal["rich", "tqdm", "none"] = Field(
        "rich", description="progress bar style: rich | tqdm | none (log lines only)"
    )
    tensorboard: bool = Field(True, description="write TensorBoard event files to tb/")
    plot: bool = Field(True, description="write loss.png at the end")
    histograms_every: int = Field(
        0, ge=0, description="TensorBoard weight/gradient histograms every N steps; 0: off"
    )
    wandb: bool = Field(False, description="log to Weights & Biases (offline when no API key)")
    wandb_project: str = Field("truthgpt", description="W&B project name")
    callbacks: list[str] = Field(
        default_factory=list, description="extra callbacks by registered name (plugins)"
    )

    @field_validator("callbacks")
    @classmethod
    def _known_callbacks(cls, value: list[str]) -> list[str]:
        return [_check_registered(CALLBACKS, name) for name in value]


def _check_device(value: str) -> str:
    base = value.split(":")[0]
    if base not in ("auto", "cpu", "cuda", "mps") or (":" in value and base != "cuda"):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


class HardwareConfig(Section):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; empty: OMP_NUM_THREADS if set, else the cores this "
        "process may use",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return _check_device(value)


class InferenceConfig(Section):
    """Generation: sampling defaults (the CLI's and the API's) and the engine's settings."""

    max_new_tokens: int = Field(128, ge=1, description="generation: tokens to sample at most")
    temperature: float = Field(0.8, ge=0, description="0: greedy")
    top_k: int | None = Field(
        50, ge=-1, description="sample among the k likeliest; 0, -1 or empty: all (off)"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="weights and KV cache; auto: bf16 on CUDA, fp32 elsewhere"
    )
    block_size: int = Field(16, ge=1, le=256, description="KV cache block size in tokens")
    num_blocks: int | None = Field(
        None, ge=2, description="KV blocks in the pool; empty: sized from gpu_memory_fraction"
    )
    gpu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of the free GPU memory (after weights) for KV blocks"
    )
    max_num_seqs: int = Field(256, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(
        4096, ge=16, description="tokens per engine step; longer prompts are prefilled in chunks"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="context length (prompt + output); empty: the model's"
    )
    prefix_caching: bool = Field(True, description="reuse the KV blocks of shared prompt prefixes")
    cuda_graphs: bool = Field(True, description="replay decode steps as CUDA graphs (CUDA only)")
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto", description="paged attention: Triton kernels on CUDA (auto) or plain PyTorch"
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two (8, 16, 32...), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return _check_device(value)


class ServeConfig(Section):
    """`truthgpt serve`: the OpenAI-compatible HTTP server on the engine."""

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the server")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(
        None, description="required Bearer key; empty: $TRUTHGPT_API_KEY, else no key"
    )
    served_model_name: str | None = Field(
        None, description="the model id clients send; empty: the model folder's name"
    )
    max_queued_requests: int = Field(
        512, ge=0, description="requests waiting beyond max_num_seqs before a 429"
    )
    max_queued_tokens: int = Field(
        1_000_000, ge=1, description="prompt tokens waiting to start before a 429"
    )
    request_timeout_s: float = Field(
        600, gt=0, description="a request running longer is ended (504, or an error event)"
    )
    shutdown_grace_s: float = Field(
        30, ge=0, description="on SIGTERM, time in-flight requests get to finish"
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="larger request bodies get a 413"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty: CORS off"
    )
    result_cache: bool = Field(
        False, description="answer repeated greedy/seeded requests from a cache"
    )
    result_cache_entries: int = Field(1024, ge=1, description="results kept in memory")
    stall_after_s: float = Field(
        30, gt=0, description="/health fails when the engine loop is silent this long"
    )
    engine: Literal["process", "thread"] = Field(
        "process",
        description="process: the engine in its own process (HTTP work never slows it); "
        "thread: in the server's process (starts faster, one process to watch)",
    )


# The names diffusion/schedulers.py maps to diffusers classes, listed here so a config is checked
# without importing diffusers; tests/test_diffusion.py keeps the two lists equal.
SCHEDULER_NAMES = (
    "ddim",
    "ddpm",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpm++_2m",
    "dpm++_2m_karras",
    "dpm++_2m_sde_karras",
    "dpm++_sde",
    "unipc",
    "lcm",
)


def _check_scheduler(value: str | None) -> str | None:
    if value and value not in SCHEDULER_NAMES:
        hint = did_you_mean(value, SCHEDULER_NAMES)
        raise ValueError(
            f"unknown scheduler {value!r}{hint} (allowed: {', '.join(SCHEDULER_NAMES)};"
            " empty keeps the pipeline's own)"
        )
    return value


class DiffusionConfig(Section):
    model: str | None = Field(
        None, description="local diffusers pipeline folder (or a hub id with allow_download)"
    )
    allow_download: bool = Field(False, description="let a hub id be fetched (offline otherwise)")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="weights and compute dtype; auto: fp16 on a GPU, fp32 on a CPU"
    )
    scheduler: str | None = Field(
        None, description="ddim, euler_a, dpm++_2m_karras, unipc, ...; empty: the pipeline's own"
    )
    memory: Literal["none", "balanced", "aggressive", "ultra", "auto"] = Field(
        "auto", description="memory level: which offload/casting recipe to apply"
    )
    speed: bool = Field(
        False, description="SDPA, channels_last, fused QKV and torch.compile of the denoiser"
    )
    prompt: str = Field("", description="what to draw")
    negative_prompt: str | None = Field(None, description="what to steer away from")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    # A latent model's autoencoder needs multiples of its scale (8 for Stable Diffusion),
    # checked against the loaded model (diffusion/generate.py); pixel-space models take any.
    width: int | None = Field(None, ge=8, description="pixels; empty: the model's default")
    height: int | None = Field(None, ge=8, description="pixels; empty: the model's default")
    seed: int | None = Field(0, description="same seed, same image; empty: random")
    batch: int = Field(1, ge=1, description="images per prompt (a grid PNG is written too)")
    loras: list[str] = Field(
        default_factory=list, description="LoRA adapter folders, each optionally DIR:weight"
    )
    output_dir: str = Field("images", description="where PNGs are written")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return _check_scheduler(value)


# Tasks that learn from images read `data.source` from IMAGE_SOURCES; the others from SOURCES.
IMAGE_TASKS = ("image-generation",)
# The data sources whose rows task sft reads (messages, or prompt and completion).
SFT_SOURCES = ("jsonl", "hf")
# LoRA on a UNet adapts the attention projections (q, k, v and the output projection).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# From scratch: a small UNet and CLIP text encoder; `diffusion_training.unet` / `.text_encoder`
# override any field.
DEFAULT_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
DEFAULT_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}
# The cosine schedule (Nichol & Dhariwal 2021) spends fewer steps on nearly clean images than
# the linear one, which matters most at small resolutions.
DEFAULT_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
}


class SamplesConfig(Section):
    """Validation images drawn during diffusion training: same prompts and seeds every time."""

    every: int = Field(
        0, ge=0, description="optimizer steps between sample grids (and at the end); 0: off"
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="prompts to draw; empty: up to 8 captions of the data (8 unconditional "
        "images when every caption is empty)",
    )
    seed: int = Field(0, description="prompt i is drawn with seed + i")
    steps: int = Field(25, ge=1, description="denoising steps per sample")
    guidance: float = Field(4.0, ge=0, description="classifier-free guidance scale (1: off)")


class DiffusionTrainingConfig(Section):
    """task image-generation: what the denoiser learns and from which inputs."""

    space: Literal["latent", "pixel"] = Field(
        "latent",
        description="latent: denoise the VAE latents of model.init_from's pipeline; pixel: no "
        "VAE, denoise pixels (small images; saved as a DeepFloyd-IF-layout pipeline)",
    )
    resolution: int | None = Field(
        None, ge=8, description="training image size in pixels; empty: what the UNet was made for"
    )
    center_crop: bool = Field(True, description="imagefolder: crop the middle (else a random one)")
    random_flip: bool = Field(False, description="imagefolder: mirror half of the images")
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of captions replaced by the empty one, which classifier-free "
        "guidance needs (0.1 is usual)",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="what the UNet predicts; auto: the pipeline's own, else epsilon"
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="min-SNR-gamma loss weighting (5 is the paper's); empty: off"
    )
    noise_offset: float = Field(
        0.0, ge=0.0, description="add this much per-channel constant noise (darker/brighter)"
    )
    train_text_encoder: bool = Field(False, description="also train the text encoder (full)")
    cache: bool = Field(
        True,
        description="encode frozen inputs once: caption embeddings (text encoder frozen) and "
        "VAE latents (fixed crops, no flips)",
    )
    unet: dict[str, Any] = Field(
        default_factory=dict,
        description="from scratch: UNet2DConditionModel config fields (block_out_channels, ...)",
    )
    text_encoder: dict[str, Any] = Field(
        default_factory=dict, description="from scratch: CLIPTextConfig fields (hidden_size, ...)"
    )
    noise_schedule: dict[str, Any] = Field(
        default_factory=dict,
        description="from scratch: DDPMScheduler config (num_train_timesteps, beta_schedule)",
    )
    sampler: str | None = Field(
        None, description="scheduler saved with the pipeline; empty: the pipeline's own, or ddim"
    )
    samples: SamplesConfig = Field(default_factory=SamplesConfig)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        return _check_scheduler(value)


class Config(Section):
    run_name: str = Field("run", min_length=1, description="name of the run folder")
    output_dir: str = Field("runs", description="the run folder is <output_dir>/<run_name>")
    seed: int = Field(1337, description="seeds python, numpy, torch and the data order")
    task: str = Field(
        "causal_lm",
        description="causal_lm: next-token on all text; sft: loss on answers only; "
        "image-generation: a diffusion model from captioned images; or a plugin's",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    diffusion_training: DiffusionTrainingConfig = Field(default_factory=DiffusionTrainingConfig)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return _check_registered(TASKS, value)

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ValueError(f"run_name {value!r} must be a plain folder name")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_yaml(self, relevant_only: bool = False) -> str:
        """The whole config as YAML. relevant_only: without the sections that only the other
        kind of task reads, while they hold their defaults (what `truthgpt validate` shows)."""
        data = self.model_dump(mode="json")
        if relevant_only:
            image_task = self.task in IMAGE_TASKS
            for name in LANGUAGE_ONLY_SECTIONS if image_task else IMAGE_ONLY_SECTIONS:
                default = type(self).model_fields[name].get_default(call_default_factory=True)
                if getattr(self, name) == default:
                    del data[name]
        return yaml.safe_dump(data, sort_keys=False)


# Sections only one kind of task reads: `generate` and `serve` run language models; `truthgpt
# image` and the image-generation task read the diffusion ones.
LANGUAGE_ONLY_SECTIONS = ("inference", "serve")
IMAGE_ONLY_SECTIONS = ("diffusion", "diffusion_training")


# ---------------------------------------------------------------------------------------------
# Loading


def load(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """Validate a YAML file, a run folder (its config.yaml) or a dict, with `a.b=c` overrides.
    flags: key path -> the command-line flag that set it (`inference.top_p` -> `--top-p`), so
    that an error in it names what the user typed."""
    if isinstance(overrides, str):  # one override, not its characters one by one
        overrides = [overrides]
    elif not isinstance(overrides, list | tuple):
        given = overrides.items() if isinstance(overrides, dict) else ()
        example = [f"{key}={value}" for key, value in given][:1] or ["training.max_steps=50"]
        raise ConfigError(
            f"overrides must be a list of 'key.path=value' strings (e.g. {example}), got "
            f"{type(overrides).__name__}"
        )
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        raw = _read_yaml(Path(source))
        raw.update(_run_location(Path(source)))
    for item in overrides:
        key_path, value = parse_override(item)
        _set_path(raw, key_path, value)
    return validate(raw, flags)


def _run_location(source: Path) -> dict[str, str]:
    """Where a run folder given as the config lies: that folder is the run, wherever it was
    moved or copied. Its config.yaml names the folder it was written in, relative to where
    training ran, so a copy resumed the original and another working directory looked for a run
    that was not there. `--set output_dir=... run_name=...` still names another."""
    if not (source.is_dir() and is_run_folder(source)):
        return {}
    folder = source if source.name not in ("", "..") else source.resolve()
    return {"output_dir": str(folder.parent), "run_name": folder.name}


def load_for_model(
    model: str | Path,
    config: str | Path | None,
    overrides: list[str] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """The config that `generate` and `serve` of `model` run with: `config` (--config), else
    the run folder's own config (of a checkpoint folder: the config it was trained with), else
    the defaults; then the overrides. The run's `hardware.threads` is left out: it said how
    that training shared its machine, not how many cores a later job with the model may use
    (--set hardware.threads=N still sets one)."""
    if config is None:
        folder = Path(model).expanduser()
        own = [path for path in (folder / CONFIG_FILE, folder / RUN_CONFIG) if path.is_file()]
        if own:
            return load(own[0], ["hardware.threads=null", *overrides], flags)
    return load(config, list(overrides), flags)


def validate(raw: dict[str, Any], flags: dict[str, str] | None = None) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, Config, raw, flags or {})) from None
    problems = cross_section_problems(config)
    if problems:
        lines = [f"{len(problems)} config error(s):", *(f"  {p}" for p in problems)]
        raise ConfigError("\n".join(lines))
    return config


def cross_section_problems(config: Config) -> list[str]:
    """Errors that involve two sections (the task and its data source...), as `key: message`."""
    problems = []
    source, image_task = config.data.source, config.task in IMAGE_TASKS
    if image_task and config.training.micro_batch == "auto":
        problems.append(
            f"training.micro_batch: 'auto' probes memory with token sequences of the language "
            f"tasks; task {config.task} trains on images: set training.batch_size and "
            "grad_accum_steps yourself (allowed here: empty)"
        )
    if config.optim.name == "muon" and config.model.lora.enabled:
        problems.append(
            "optim.name: 'muon' does not train LoRA adapters (model.lora.enabled: true): Muon "
            "orthogonalises updates of whole hidden matrices, not of low-rank factors; use "
            "optim.name: adamw with LoRA"
        )
    if image_task and config.training.residual_dtype != "auto":
        problems.append(
            f"training.residual_dtype: {config.training.residual_dtype!r} sets the native "
            f"decoder's residual stream; task {config.task} trains a diffusion model (allowed "
            "here: auto)"
        )
    if image_task and not IMAGE_SOURCES.knows(source):
        problems.append(
            f"data.source: {source!r} is a text source; task {config.task} reads captioned "
            f"images (allowed: {', '.join(IMAGE_SOURCES.names())})"
        )
    elif not image_task and IMAGE_SOURCES.knows(source) and not SOURCES.knows(source):
        problems.append(
            f"data.source: {source!r} is an image source, for task image-generation; task "
            f"{config.task} reads text (allowed: {', '.join(SOURCES.names())})"
        )
    if config.training.packed_attention == "flex" and config.model.dropout > 0:
        problems.append(
            f"training.packed_attention: 'flex' has no attention dropout, and model.dropout is "
            f"{config.model.dropout}; set model.dropout: 0, or packed_attention auto or dense "
            "(allowed: auto, dense, flex)"
        )
    batching = config.data.batching
    if config.task == "causal_lm" and batching == "bucket":
        problems.append(
            "data.batching: 'bucket' is for task: sft; task causal_lm packs documents into "
            "blocks (allowed: auto, pack)"
        )
    if config.task == "sft" and source not in SFT_SOURCES:
        problems.append(
            f"data.source: {source!r} has no sft rows; task sft reads jsonl files (or hf with a "
            f"json builder) whose rows hold `messages` or `prompt` and `completion` (allowed: "
            f"{', '.join(SFT_SOURCES)})"
        )
    if config.task == "sft" and batching == "pack" and config.model.arch == "hf":
        problems.append(
            "data.batching: 'pack' keeps packed sft examples apart with document ids, which "
            "only the native decoder (model.arch llama or gpt2) takes; with model.arch: hf use "
            "data.batching: bucket (allowed: auto, bucket)"
        )
    model = config.model
    positions = model.max_position_embeddings
    native = model.arch in ("llama", "gpt2") and not model.init_from
    if not image_task and native and config.data.max_seq_len > positions:
        # gpt2's learned positions end there (an IndexError mid-run); llama's RoPE would run
        # on, but config.json says the shorter length and generation stops at it.
        problems.append(
            f"data.max_seq_len: {config.data.max_seq_len} is longer than the model takes "
            f"(model.max_position_embeddings: {positions}); raise max_position_embeddings or "
            f"lower max_seq_len (allowed: 8 to {positions})"
        )
    if not image_task:
        return problems
    for key, metric in (
        ("checkpoint.select_best_by", config.checkpoint.select_best_by),
        ("training.early_stopping.metric", config.training.early_stopping.metric),
    ):
        if metric == "val_ppl":
            problems.append(
                f"{key}: 'val_ppl' is a language model's; task {config.task} reports only "
                "val_loss, a noise MSE (allowed here: val_loss)"
            )
    train = config.diffusion_training
    if train.space == "latent" and not config.model.init_from:
        problems.append(
            "diffusion_training.space: 'latent' needs the VAE of a pretrained pipeline: set "
            "model.init_from to a diffusers pipeline folder, or train in pixel space "
            "(allowed: latent, pixel)"
        )
    if config.model.lora.enabled and train.train_text_encoder:
        problems.append(
            "diffusion_training.train_text_encoder: with model.lora.enabled the adapters go on "
            "the UNet only; set train_text_encoder: false, or train without LoRA"
        )
    if config.model.lora.enabled and not config.model.init_from:
        problems.append(
            "model.lora.enabled: LoRA adapts a pretrained UNet; set model.init_from to a "
            "diffusers pipeline folder, or train from scratch without LoRA"
        )
    if config.model.init_from and (train.unet or train.text_encoder or train.noise_schedule):
        given = [k for k in ("unet", "text_encoder", "noise_schedule") if getattr(train, k)]
        problems.append(
            f"diffusion_training.{given[0]}: configures a model built from scratch, but "
            f"model.init_from ({config.model.init_from!r}) gives the pipeline; remove one"
        )
    elif train.unet or train.text_encoder or train.noise_schedule:
        problems += from_scratch_problems(train)
    return problems


def from_scratch_problems(train: DiffusionTrainingConfig) -> list[str]:
    """Unknown keys in the free-form `unet`, `text_encoder` and `noise_schedule` dicts, checked
    against the classes they are passed to, and UNet block lists of different lengths: found at
    load, not when training starts (and CLIPTextConfig would keep a misspelt key silently)."""
    import inspect

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, PretrainedConfig

    def parameters(function: Any) -> set[str]:
        return set(inspect.signature(function).parameters) - {"self", "args", "kwargs"}

    # What the training code sets itself: from the tokenizer, and prediction_type from its key.
    text_fields = parameters(CLIPTextConfig.__init__) - parameters(PretrainedConfig.__init__)
    text_fields -= {"vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"}
    text_fields -= {"pad_token_id"}
    checks = (
        ("unet", train.unet, parameters(UNet2DConditionModel.__init__)),
        ("text_encoder", train.text_encoder, text_fields),
        (
            "noise_schedule",
            train.noise_schedule,
            parameters(DDPMScheduler.__init__) - {"prediction_type"},
        ),
    )
    problems = []
    for name, given, known in checks:
        for key in given:
            if key == "prediction_type" and name == "noise_schedule":
                problems.append(
                    "diffusion_training.noise_schedule.prediction_type: set by "
                    "diffusion_training.prediction_type (allowed: auto, epsilon, v_prediction)"
                )
            elif key not in known:
                problems.append(
                    unknown_key_problem(["diffusion_training", name, key], sorted(known))
                )
    timesteps = {**DEFAULT_NOISE_SCHEDULE, **train.noise_schedule}["num_train_timesteps"]
    if type(timesteps) is not int or timesteps < 1:
        problems.append(
            f"diffusion_training.noise_schedule.num_train_timesteps: {timesteps!r} noise levels; "
            "give a whole number, at least 1 (1000 is usual)"
        )
    unet = {**DEFAULT_UNET, **train.unet}
    down = unet["down_block_types"]
    for key in ("block_out_channels", "up_block_types"):
        if isinstance(unet[key], list) and isinstance(down, list) and len(unet[key]) != len(down):
            problems.append(
                f"diffusion_training.unet.{key}: {unet[key]} gives {len(unet[key])} resolution "
                f"level(s), diffusion_training.unet.down_block_types {down} gives {len(down)}; "
                "give each list one entry per level"
            )
    return problems


def save(config: Config, path: Path) -> None:
    path.write_text(config.to_yaml())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last,
    so an edit further down a long config would silently undo one above it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat keys
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping (lines {lines[key]} and {line}); "
                    "keep one",
                    key_node.start_mark,
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        # An empty file would otherwise validate to every default: a 1000-step run nobody asked for.
        raise ConfigError(
            f"{path}: the config file is empty; give at least the keys you mean to set "
            "(configs/ holds complete examples: quickstart.yaml for a language model, "
            "digits-diffusion.yaml for images)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(raw).__name__}"
        )
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.max_steps=50` -> (["training", "max_steps"], 50); the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def flag_overrides(
    given: dict[str, Any], later: list[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """Command-line flags as overrides, and the flag each key came from, for `load(flags=)`:
    {"inference.top_p": 0.9} -> (["inference.top_p=0.9"], {"inference.top_p": "--top-p"}).
    None values were not given; a key that a `later` override (--set) replaces keeps its name."""
    given = {key: value for key, value in given.items() if value is not None}
    replaced = {item.partition("=")[0].strip() for item in later}
    flags = {
        key: "--" + key.rsplit(".", 1)[-1].replace("_", "-") for key in given if key not in replaced
    }
    return [f"{key}={override_value(value)}" for key, value in given.items()], flags


def override_value(value: Any) -> str:
    """`value` as the text of a `key=value` override that parse_override reads back as the same
    value: a string stays a string ("1e-3", "null" too), a number a number. YAML's own writer,
    not JSON: PyYAML reads JSON's surrogate pair for an emoji as two lone surrogates."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=False)
    return text.removesuffix("...\n").strip()  # a lone scalar is written as a document


def _set_path(raw: dict[str, Any], key_path: list[str], value: Any) -> None:
    node = raw
    for depth, part in enumerate(key_path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(key_path[: depth + 1])
            raise ConfigError(f"override {'.'.join(key_path)}: {where} is a value, not a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[key_path[-1]] = value


def describe_fields() -> list[tuple[str, str, str]]:
    """(key path, default, description) for every leaf, for the README's reference table."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", repr(default), field.description or ""))

    walk(Config, "")
    return rows

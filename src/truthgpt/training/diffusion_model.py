"""The model of task image-generation: a diffusers UNet, a text encoder and (latent space) a VAE.

`DiffusionModel` holds the parts as one `nn.Module`, so the Trainer optimizes, averages (EMA),
moves and checkpoints it like any model; only the parts being trained have `requires_grad`.
It is built from scratch (`build_from_scratch`: config dicts, a character-level CLIP tokenizer
made offline) or opened from a diffusers pipeline folder (`load_components`), and written back
as a pipeline folder that diffusers loads (`save_pipeline`) or as a LoRA adapter in diffusers'
format (`save_lora`, read by `pipe.load_lora_weights`).

Two layouts, picked by `diffusion_training.space`:
- latent: Stable Diffusion (`StableDiffusionPipeline`: vae, text_encoder, tokenizer, unet).
- pixel: no VAE, the UNet denoises pixels; saved as DeepFloyd IF's `IFPipeline`, the diffusers
  pipeline for text-conditioned pixel-space UNets, so plain diffusers draws with it too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    IFPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from truthgpt.config import (
    DEFAULT_NOISE_SCHEDULE,
    DEFAULT_TEXT_ENCODER,
    DEFAULT_UNET,
    UNET_LORA_TARGETS,
    Config,
    LoraConfig,
)
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.guard import LORA_WEIGHTS
from truthgpt.models.build import checkpoint_hf_activations
from truthgpt.models.lora import check_targets
from truthgpt.quiet import no_load_save_bars

CLIP_MAX_TOKENS = 77  # the context both pipelines pad prompts to


class DiffusionModel(nn.Module):
    """UNet + text encoder (+ VAE), the tokenizer and the schedules, as one trainable module.

    noise_scheduler: the DDPM schedule training noises with (its prediction_type is what the
    UNet learns). sample_scheduler: what the saved pipeline draws with.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL | None,
        noise_scheduler: DDPMScheduler,
        sample_scheduler: Any,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.sample_scheduler = sample_scheduler
        if vae is None and "variance_type" not in sample_scheduler.config:
            # IFPipeline asks every scheduler for variance_type to know whether the UNet's
            # variance half is used; DDIM and kin sample without one, so they say "fixed".
            sample_scheduler.register_to_config(variance_type="fixed_small")

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        # Frozen parts stay in eval mode: no dropout in what is not learned (and cached).
        for part in (self.vae, self.text_encoder):
            if part is not None and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    @property
    def space(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) exactly as the pipeline tokenizes a prompt."""
        if self.vae is None:
            # IFPipeline lower-cases and strips prompts (without its optional caption cleaner).
            captions = [text.lower().strip() for text in captions]
            max_length = CLIP_MAX_TOKENS
        else:
            max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids, tokens.attention_mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Caption embeddings [B, tokens, dim] as the pipeline computes them for the UNet."""
        # IF passes the mask; Stable Diffusion only when the encoder's config asks for it.
        if self.vae is None or getattr(self.text_encoder.config, "use_attention_mask", False):
            return self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        return self.text_encoder(input_ids)[0]

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, caption_index: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output for `noisy` at `timesteps`, conditioned on the captions at
        `caption_index` of the caption table (`caption_ids`, `caption_mask` and, for a frozen
        text encoder, `caption_embeddings`: buffers the training task registers).

        Everything trained runs inside this call: DDP and FSDP wrap the module and act around
        its forward only (gradient sync, gathering the shards), not around its parts' calls.
        """
        cached = getattr(self, "caption_embeddings", None)
        if cached is not None:
            text = cached[caption_index]
        else:
            text = self.encode_text(
                self.caption_ids[caption_index], self.caption_mask[caption_index]
            )
        return self.unet(noisy, timesteps, encoder_hidden_states=text).sample

    def fsdp_plan(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """What FSDP shards (distributed.shard_model): the UNet's blocks and the UNet, each a
        unit of its own, and so the text encoder when it trains; and what every rank keeps
        whole: the frozen parts. They have no gradients or optimizer state to shard, and run
        outside `forward` (encoding latents and captions), where no FSDP hook gathers shards.
        Units of their own let the sample pipeline call the UNet and text encoder directly."""
        unet = self.unet
        units = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block else []), *unet.up_blocks]
        units.append(unet)
        whole = [part for part in (self.vae, self.text_encoder) if part is not None]
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            whole.remove(self.text_encoder)
            units.append(self.text_encoder)
        return units, whole

    def pipeline(self) -> DiffusionPipeline:
        """A diffusers pipeline over these very modules (no copy), for samples and saving."""
        if self.vae is None:
            pipe = IFPipeline(
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                unet=self.unet,
                scheduler=self.sample_scheduler,
                safety_checker=None,
                feature_extractor=None,
                watermarker=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=self.sample_scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ---------------------------------------------------------------------------------------------
# Building and opening


def build_from_scratch(config: Config, resolution: int) -> DiffusionModel:
    """A pixel-space model from `diffusion_training.unet/.text_encoder/.noise_schedule` with a
    character-level CLIP tokenizer (nothing is downloaded)."""
    train = config.diffusion_training
    tokenizer = char_clip_tokenizer()
    text_fields = {**DEFAULT_TEXT_ENCODER, **train.text_encoder}
    try:
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=CLIP_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_fields,
        )
        text_encoder = CLIPTextModel(text_config)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        # transformers' config checks wrap their ValueError in huggingface_hub's error.
        cause = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc
        raise ConfigError(f"diffusion_training.text_encoder: {cause}") from None
    unet_fields = {**DEFAULT_UNET, **train.unet}
    unet_fields.setdefault("sample_size", resolution)
    unet_fields.setdefault("cross_attention_dim", text_config.hidden_size)
    # IFPipeline takes the UNet's output as [noise, variance] halves (IF learns the variance);
    # here only the noise half is trained, and IF's fixed-variance schedulers drop the other.
    in_channels = unet_fields.get("in_channels", 3)
    if unet_fields.setdefault("out_channels", 2 * in_channels) != 2 * in_channels:
        raise ConfigError(
            f"diffusion_training.unet.out_channels: a pixel-space UNet outputs noise and variance, "
            f"2 x in_channels = {2 * in_channels}; got {unet_fields['out_channels']} (leave it out)"
        )
    try:
        unet = UNet2DConditionModel(**unet_fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"diffusion_training.unet: {exc}") from None
    schedule = {**DEFAULT_NOISE_SCHEDULE, **train.noise_schedule}
    prediction = train.prediction_type if train.prediction_type != "auto" else "epsilon"
    try:
        noise_scheduler = DDPMScheduler(**schedule, prediction_type=prediction)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"diffusion_training.noise_schedule: {exc}") from None
    sample_scheduler = _sampler(train.sampler or "ddim", noise_scheduler.config)
    return DiffusionModel(unet, text_encoder, tokenizer, None, noise_scheduler, sample_scheduler)


def load_components(folder: str | Path, config: Config) -> DiffusionModel:
    """The parts of the diffusers pipeline folder `folder` (model.init_from or a checkpoint)."""
    train = config.diffusion_training
    folder = Path(folder).expanduser()
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder}: no model_index.json, so this is not a diffusers pipeline folder "
            "(model.init_from must be one, written by pipe.save_pretrained)"
        )
    try:
        with no_load_save_bars():
            pipe = DiffusionPipeline.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: could not load the diffusers pipeline: {exc}") from exc
    vae = getattr(pipe, "vae", None)
    missing = [n for n in ("unet", "text_encoder", "tokenizer") if getattr(pipe, n, None) is None]
    if missing:
        raise CheckpointError(
            f"{folder}: a {type(pipe).__name__} without {', '.join(missing)}; task "
            "image-generation trains UNet text-to-image pipelines (Stable Diffusion 1.x/2.x "
            "layouts, or pixel-space IF layouts)"
        )
    space = "pixel" if vae is None else "latent"
    if space != train.space:
        raise ConfigError(
            f"diffusion_training.space: {train.space!r}, but {folder} is a {space}-space "
            f"pipeline ({type(pipe).__name__}); set space: {space} (allowed: latent, pixel)"
        )
    schedule = dict(pipe.scheduler.config)
    if train.prediction_type != "auto":
        schedule["prediction_type"] = train.prediction_type
    noise_scheduler = DDPMScheduler.from_config(schedule)
    sample_scheduler = (
        _sampler(train.sampler, schedule)
        if train.sampler
        else type(pipe.scheduler).from_config(schedule)
    )
    return DiffusionModel(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, vae, noise_scheduler, sample_scheduler
    )


def _sampler(name: str, schedule: Any) -> Any:
    # The named schedulers are diffusion/'s; importing the table from there would turn the
    # layer order around, so the few names a training config may pick are resolved here.
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    choices = {
        "ddim": (DDIMScheduler, {}),
        "ddpm": (DDPMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "dpm++_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "unipc": (UniPCMultistepScheduler, {}),
    }
    if name not in choices:
        raise ConfigError(
            f"diffusion_training.sampler: {name!r} cannot be saved with a trained pipeline "
            f"(allowed: {', '.join(choices)}); pick another at draw time with --scheduler"
        )
    cls, extra = choices[name]
    return cls.from_config(schedule, **extra)


def char_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256 byte symbols and no merges: every character is a token.

    Real CLIP tokenizer code with a vocabulary that needs no training and no download, enough
    for short captions; saved with the pipeline like any other tokenizer.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    # GPT-2/CLIP's byte -> unicode map: printable bytes stand for themselves, the rest move up.
    codes = printable + [256 + n for n in range(256 - len(printable))]
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(folder) / "vocab.json"),
            str(Path(folder) / "merges.txt"),
            model_max_length=CLIP_MAX_TOKENS,
        )


# ---------------------------------------------------------------------------------------------
# Training setup


def prepare_for_training(model: DiffusionModel, config: Config) -> DiffusionModel:
    """Freeze what is not trained, add LoRA adapters, turn on gradient checkpointing."""
    train = config.diffusion_training
    if model.vae is not None:
        model.vae.requires_grad_(False)
        model.vae.eval()
    model.text_encoder.requires_grad_(train.train_text_encoder)
    if not train.train_text_encoder:
        model.text_encoder.eval()  # no dropout in a frozen encoder: cached embeddings stay valid
    if config.model.lora.enabled:
        if not model.is_lora:
            add_lora(model.unet, config.model.lora)
    else:
        model.unet.requires_grad_(True)
    if config.training.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if train.train_text_encoder:
            checkpoint_hf_activations(model.text_encoder)
    return model


def add_lora(unet: UNet2DConditionModel, lora: LoraConfig) -> None:
    """peft LoRA on the UNet's attention projections; only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    targets = list(lora.target_modules or UNET_LORA_TARGETS)
    check_targets(unet, targets, list(UNET_LORA_TARGETS), "the UNet's attention")
    unet.add_adapter(
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            # Gaussian A, zero B: the adapted UNet starts out equal to the base one.
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )


# ---------------------------------------------------------------------------------------------
# Writing and reading back


def save_pipeline(model: DiffusionModel, folder: Path) -> None:
    """A diffusers pipeline folder (model_index.json, unet/, text_encoder/, ...)."""
    with no_load_save_bars():
        model.pipeline().save_pretrained(str(folder), safe_serialization=True)


def save_lora(model: DiffusionModel, folder: Path) -> None:
    """The UNet adapters as diffusers writes them: `pipe.load_lora_weights(folder)` loads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), unet_lora_layers=layers, safe_serialization=True
    )


def load_lora(model: DiffusionModel, folder: Path) -> None:
    """Put the adapter weights `save_lora` wrote into the UNet's adapters (added before)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {LORA_WEIGHTS}, so this is not a LoRA checkpoint")
    state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(folder))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(model.unet, convert_unet_state_dict_to_peft(unet_state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} weights fit no adapter of this UNet (e.g. {unexpected[0]})"
        )

"""Task image-generation: a text-to-image diffusion model trained by the one Trainer.

The task reads captioned images (`data.source`: digits, imagefolder), builds or opens the model
(`diffusion_model.py`), computes the denoising loss (`denoising.py`) and saves a diffusers
pipeline folder (or a LoRA adapter). Frozen inputs are encoded once when they can be
(`diffusion_training.cache`): caption embeddings when the text encoder is frozen, VAE latents
when crops and flips are fixed. Validation images come from `samples()`, which the Trainer calls
every `diffusion_training.samples.every` steps.

Every random draw of a training step (caption dropout, noise, timesteps, the VAE's sample) is
taken from torch's global RNG inside `loss`, which the Trainer checkpoints: a resumed run
repeats the uninterrupted one exactly. Validation items carry their own noise and timesteps,
so the validation loss of the same weights is the same number every time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from truthgpt.config import Config
from truthgpt.data.prepare import PreparedData
from truthgpt.errors import ConfigError
from truthgpt.hardware import resolve_device
from truthgpt.registry import IMAGE_SOURCES
from truthgpt.training.denoising import denoising_loss, draw_noise
from truthgpt.training.diffusion_model import (
    DiffusionModel,
    add_lora,
    build_from_scratch,
    load_components,
    load_lora,
    prepare_for_training,
    save_lora,
    save_pipeline,
)
from truthgpt.training.distributed import unwrapped

Batch = dict[str, torch.Tensor]
DEFAULT_RESOLUTION = 32  # from scratch, when neither resolution nor unet.sample_size is given
MAX_DEFAULT_PROMPTS = 8
ENCODE_BATCH = 64  # images or captions per forward when caching


class DenoisingItems(Dataset):
    """Items of a training split: the image (pixels, or cached latent mean and std) and the index
    of its caption in the task's caption table. `fixed_noise` (validation): each item also
    carries noise and a timestep drawn from its own seeded generator."""

    def __init__(
        self,
        images: Dataset | None,
        caption_index: list[int],
        latents: tuple[torch.Tensor, torch.Tensor] | None = None,
        fixed_noise: tuple[int, int, tuple[int, ...]] | None = None,
    ) -> None:
        self.images = images
        self.caption_index = caption_index
        self.latents = latents
        self.fixed_noise = fixed_noise  # (seed, num_train_timesteps, latent shape)

    def __len__(self) -> int:
        return len(self.caption_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"caption_index": torch.tensor(self.caption_index[index])}
        if self.latents is not None:
            item["latent_mean"] = self.latents[0][index]
            item["latent_std"] = self.latents[1][index]
        else:
            item["pixel_values"] = self.images[index]["pixel_values"]
        if self.fixed_noise is not None:
            seed, timesteps, shape = self.fixed_noise
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            item["noise"] = torch.randn(shape, generator=generator)
            item["timesteps"] = torch.randint(0, timesteps, (), generator=generator)
        return item


class ImageGenerationTask:
    """Text-to-image denoising; the model is a `DiffusionModel`."""

    unit = "images"  # count_tokens counts images: images_per_second, images_seen
    reports_perplexity = False  # the loss is a noise MSE, not a cross-entropy
    # build_model encodes the captions with the text encoder: real weights on every rank.
    builds_on_meta = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.train_cfg = config.diffusion_training
        self.sample_every = self.train_cfg.samples.every  # read by the Trainer
        self.captions: list[str] = []  # the caption table; its last row is the empty caption
        self._base: DiffusionModel | None = None  # built for the data, handed to build_model

    # -- data ------------------------------------------------------------------------------

    def build_data(self, run_dir: Path | None, log: Callable[[str], None]) -> PreparedData:
        started = time.perf_counter()
        base = self._base = self._open_base()
        resolution = self._resolution(base)
        channels = base.unet.config.in_channels if base.vae is None else 3
        data = self.config.data
        build = IMAGE_SOURCES.get_builder(data.source, "data.source")
        train_images, val_images = build(
            data,
            resolution,
            channels,
            self.config.seed,
            center_crop=self.train_cfg.center_crop,
            random_flip=self.train_cfg.random_flip,
        )
        train_captions = list(train_images.captions)
        val_captions = list(val_images.captions) if val_images is not None else []
        self.captions = sorted(set(train_captions) | set(val_captions)) + [""]
        position = {text: i for i, text in enumerate(self.captions)}
        latent_shape = self._latent_shape(base, resolution)
        timesteps = base.noise_scheduler.config.num_train_timesteps
        cache_latents = base.vae is not None and self._latents_are_fixed(log)

        def items(images: Dataset, captions: list[str], fixed: bool) -> DenoisingItems:
            latents = _encode_latents(base, images, self._device()) if cache_latents else None
            noise = (self.config.seed, timesteps, latent_shape) if fixed else None
            index = [position[text] for text in captions]
            return DenoisingItems(images if latents is None else None, index, latents, noise)

        train = items(train_images, train_captions, fixed=False)
        val = items(val_images, val_captions, fixed=True) if val_images is not None else None
        log(
            f"data: {data.source}: {len(train)} train / {len(val) if val else 0} val images at "
            f"{resolution}x{resolution} ({base.space} space, {len(self.captions) - 1} distinct "
            f"captions{', latents cached' if cache_latents else ''}) "
            f"({time.perf_counter() - started:.1f}s)"
        )
        return PreparedData(base.tokenizer, train, val, len(train), len(val) if val else 0)

    def _open_base(self) -> DiffusionModel:
        if self.config.model.init_from:
            return load_components(self.config.model.init_from, self.config)
        resolution = self.train_cfg.resolution or self.train_cfg.unet.get(
            "sample_size", DEFAULT_RESOLUTION
        )
        return build_from_scratch(self.config, resolution)

    def _resolution(self, model: DiffusionModel) -> int:
        made_for = model.unet.config.sample_size * model.vae_scale_factor
        resolution = self.train_cfg.resolution or made_for
        if resolution % model.vae_scale_factor:
            raise ConfigError(
                f"diffusion_training.resolution: {resolution} is not a multiple of "
                f"{model.vae_scale_factor}, the VAE's downsampling factor"
            )
        return resolution

    @staticmethod
    def _latent_shape(model: DiffusionModel, resolution: int) -> tuple[int, ...]:
        side = resolution // model.vae_scale_factor
        return (model.unet.config.in_channels, side, side)

    def _latents_are_fixed(self, log: Callable[[str], None]) -> bool:
        if not self.train_cfg.cache:
            return False
        if self.config.data.source == "imagefolder" and (
            self.train_cfg.random_flip or not self.train_cfg.center_crop
        ):
            log("data: VAE latents are not cached: random crops or flips change the pixels")
            return False
        return True

    def _device(self) -> torch.device:
        return resolve_device(self.config.hardware.device)

    # -- model -----------------------------------------------------------------------------

    def build_model(self, data: PreparedData) -> nn.Module:
        model = self._base if self._base is not None else self._open_base()
        self._base = None
        return self.prepare_model(model)

    def load_model(self, folder: Path, device: str | torch.device = "cpu") -> nn.Module:
        self._base = None  # a resumed run trains the checkpoint's model, not the base
        if self.config.model.lora.enabled:
            # A LoRA checkpoint holds the adapters; the base is model.init_from.
            model = load_components(self.config.model.init_from, self.config)
            add_lora(model.unet, self.config.model.lora)
            load_lora(model, Path(folder))
        else:
            model = load_components(folder, self.config)
        return model.to(device)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = prepare_for_training(model, self.config)
        if not self.captions:
            raise RuntimeError("build_data must run before the model is prepared")
        # The caption table as tokens, and as embeddings when the text encoder is frozen.
        input_ids, attention_mask = model.tokenize(self.captions)
        model.register_buffer("caption_ids", input_ids, persistent=False)
        model.register_buffer("caption_mask", attention_mask, persistent=False)
        if self.train_cfg.cache and not self.train_cfg.train_text_encoder:
            model.register_buffer("caption_embeddings", _encode_captions(model), persistent=False)
        return model

    def save(self, model: nn.Module, data: PreparedData, folder: Path) -> None:
        if model.is_lora:
            save_lora(model, folder)
        else:
            save_pipeline(model, folder)

    # -- loss ------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # `model` may be wrapped (DDP, torch.compile): the parts and schedules are read from the
        # module itself, and the forward goes through the wrapper, which syncs the gradients.
        module = unwrapped(model)
        latents = self._clean_latents(module, batch)
        count = latents.shape[0]
        caption_index = batch["caption_index"]
        if module.training and self.train_cfg.caption_dropout > 0:
            # Classifier-free guidance (Ho & Salimans 2022) needs the unconditional model too:
            # some captions are replaced by the empty one, the last row of the table.
            dropped = torch.rand(count, device=latents.device) < self.train_cfg.caption_dropout
            caption_index = torch.where(dropped, len(self.captions) - 1, caption_index)
        scheduler = module.noise_scheduler
        noise = batch.get("noise")
        if noise is None:
            noise = draw_noise(latents, self.train_cfg.noise_offset)
        timesteps = batch.get("timesteps")
        if timesteps is None:
            total = scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, total, (count,), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, caption_index)
        # A pixel-space (IF-layout) UNet also outputs variance channels; the noise comes first.
        prediction = prediction[:, : latents.shape[1]]
        loss = denoising_loss(
            prediction, latents, noise, timesteps, scheduler, self.train_cfg.snr_gamma
        )
        return loss, torch.tensor(count, device=latents.device)

    def _clean_latents(self, model: DiffusionModel, batch: Batch) -> torch.Tensor:
        if "latent_mean" in batch:
            mean = batch["latent_mean"]
            if not model.training:
                return mean
            return mean + batch["latent_std"] * torch.randn_like(mean)
        pixels = batch["pixel_values"]
        if model.vae is None:
            return pixels
        with torch.no_grad():
            dist = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist
            latents = dist.sample() if model.training else dist.mode()
        return latents * model.vae.config.scaling_factor

    def count_tokens(self, batch: Batch) -> int:
        """Images (`unit`): the throughput is images per second."""
        return int(batch["caption_index"].numel())

    def describe_model(self, model: nn.Module) -> str:
        """`UNet 1.05M + text encoder 0.06M` (+ VAE): the parts and their sizes."""
        parts = [("UNet", model.unet), ("text encoder", model.text_encoder), ("VAE", model.vae)]
        sizes = [
            f"{name} {sum(p.numel() for p in part.parameters()) / 1e6:.2f}M"
            + ("" if any(p.requires_grad for p in part.parameters()) else " frozen")
            for name, part in parts
            if part is not None
        ]
        return f"{self.train_cfg.space}-space diffusion ({' + '.join(sizes)})"

    def flops_per_token(self, model: nn.Module) -> float | None:
        return None

    # -- validation images -----------------------------------------------------------------

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int) -> dict[str, Image.Image]:
        """One grid of the sample prompts, each drawn from its fixed seed."""
        cfg = self.train_cfg.samples
        # Without prompts: the data's captions, or for a set without any (an unconditional
        # one) as many unconditional images, each from its own seed.
        prompts = cfg.prompts or [c for c in self.captions if c][:MAX_DEFAULT_PROMPTS]
        prompts = prompts or [""] * MAX_DEFAULT_PROMPTS
        was_training = model.training
        model.eval()
        pipe = model.pipeline()
        images = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed + i)
            images += pipe(
                prompt=prompt,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                generator=generator,
                **({"clean_caption": False} if model.vae is None else {}),
            ).images
        model.train(was_training)
        return {"samples": image_grid(images)}


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in rows of ceil(sqrt(n)), on black."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    # Empty cells stay black: the digits' background, no white boxes beside them.
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


@torch.no_grad()
def _encode_captions(model: DiffusionModel) -> torch.Tensor:
    chunks = []
    for start in range(0, len(model.caption_ids), ENCODE_BATCH):
        ids = model.caption_ids[start : start + ENCODE_BATCH]
        mask = model.caption_mask[start : start + ENCODE_BATCH]
        chunks.append(model.encode_text(ids, mask).float())
    return torch.cat(chunks)


@torch.no_grad()
def _encode_latents(
    model: DiffusionModel, images: Dataset, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution (mean, std) of every image, scaled as the UNet sees it;
    training samples from it each step, validation takes the mean."""
    vae = model.vae.to(device)
    scale = vae.config.scaling_factor
    means, stds = [], []
    for start in range(0, len(images), ENCODE_BATCH):
        stop = min(start + ENCODE_BATCH, len(images))
        pixels = torch.stack([images[i]["pixel_values"] for i in range(start, stop)])
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        means.append((dist.mean * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
    vae.to("cpu")
    return torch.cat(means), torch.cat(stds)

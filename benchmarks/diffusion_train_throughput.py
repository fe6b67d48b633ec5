"""Diffusion training throughput: truthgpt's Trainer vs a plain diffusers + accelerate loop.

Both train the same SD-1.5-shaped UNet (random weights, saved as a pipeline folder: UNet 860M,
VAE, CLIP ViT-L-shaped text encoder) at 512x512 in bf16 autocast over fp32 weights with AdamW,
on the same images, with gradient checkpointing off and on. Both train from VAE latents and
caption embeddings computed once before the timing (truthgpt caches them when the VAE and text
encoder are frozen; the peer loop is given the same tensors), so the timed work is the UNet's
forward, backward and optimizer step, plus each side's own loop. Prints images/s and peak GPU
memory for each, and the ratio.

    python benchmarks/diffusion_train_throughput.py                # GPU: SD-1.5 shape, 512 px
    python benchmarks/diffusion_train_throughput.py --tiny         # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over the 256 byte symbols and no merges (offline, real code)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2/CLIP byte-level BPE's byte -> unicode map: printable bytes stand for themselves.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = [chr(c) for c in printable + [256 + n for n in range(256 - len(printable))]]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(folder)


def build_pipeline_folder(folder: Path, tiny: bool) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(folder / "tokenizer_src")
    width = 32 if tiny else 768
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 4,
            num_attention_heads=4 if tiny else 12,
            num_hidden_layers=2 if tiny else 12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    if tiny:
        vae = AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=4,
            cross_attention_dim=width,
        )
    else:  # Stable Diffusion 1.5's shapes (the configs of its model card's folders)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def write_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i % 7}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for index in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if index + 1 == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    return times[warmup:]


def run_ours(args, sd: Path, images: Path, workdir: Path, checkpointing: bool, device) -> dict:
    from truthgpt.config import load
    from truthgpt.training.run_folder import prepare_run_dir
    from truthgpt.training.tasks import build_task
    from truthgpt.training.trainer import Trainer

    raw = {
        "run_name": f"ours-{checkpointing}",
        "output_dir": str(workdir),
        "task": "image-generation",
        "model": {"init_from": str(sd)},
        "data": {"source": "imagefolder", "paths": [str(images)], "val_fraction": 0.0},
        "diffusion_training": {"resolution": args.resolution},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "precision": "bf16" if device.type == "cuda" else "fp32",
            "gradient_checkpointing": checkpointing,
            "log_every": 10_000,
            "eval_every": 10_000,
        },
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "checkpoint": {"save_every": 10_000},
        "logging": {"progress": "none", "tensorboard": False, "plot": False},
        "hardware": {"device": device.type},
    }
    config = load(raw)
    prepare_run_dir(config, overwrite=True)
    task = build_task(config)
    data = task.build_data(config.run_dir, lambda message: None)
    model = task.build_model(data).to(device)
    trainer = Trainer(config, model, data, device, config.run_dir, callbacks=[], task=task)
    return summary(
        timed_steps(trainer.train_step, args.steps, args.warmup, device), args.batch_size, device
    )


def run_peer(args, sd: Path, images: Path, checkpointing: bool, device) -> dict:
    """The loop of diffusers' train_text_to_image.py example, on precomputed inputs."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(
        mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu"
    )
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").to(device)
    text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").to(device)
    tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    # The same inputs as ours: latents and caption embeddings of the images, once.
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    with torch.no_grad():
        pixels = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(
                        Image.open(images / row["file_name"])
                        .convert("RGB")
                        .resize((args.resolution, args.resolution))
                    )
                ).permute(2, 0, 1)
                for row in rows
            ]
        )
        pixels = pixels.float().div(127.5).sub(1).to(device)
        latents = (
            torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(4)])
            * vae.config.scaling_factor
        )
        ids = tokenizer(
            [row["text"] for row in rows],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        text = text_encoder(ids)[0]
    del vae, text_encoder
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        pick = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        batch, hidden = latents[pick], text[pick]
        noise = torch.randn_like(batch)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(batch),), device=device
        )
        noisy = scheduler.add_noise(batch, noise, timesteps)
        with accelerator.accumulate(unet):
            prediction = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return summary(timed_steps(step, args.steps, args.warmup, device), args.batch_size, device)


def summary(times: list[float], batch_size: int, device: torch.device) -> dict:
    rates = [batch_size / t for t in times]
    return {
        "images_per_second": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test, tiny shapes")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.resolution = 32 if args.tiny else 512
    if args.tiny:
        args.steps, args.warmup, args.batch_size = min(args.steps, 4), 1, 2
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sd = build_pipeline_folder(root, args.tiny)
        images = write_images(root / "images", 32, args.resolution)
        for checkpointing in (False, True):
            runs = {
                "truthgpt": lambda ckpt=checkpointing: run_ours(
                    args, sd, images, root / "runs", ckpt, device
                ),
                "diffusers+accelerate": lambda ckpt=checkpointing: run_peer(
                    args, sd, images, ckpt, device
                ),
            }
            for name, run in runs.items():
                result = run()
                report[f"{name}/ckpt={checkpointing}"] = result
                print(name, f"gradient checkpointing {checkpointing}", result, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {args.resolution}px, batch {args.batch_size}")
    print("gradient checkpointing | trainer | images/s [min-max] | peak GiB | ours / peer")
    for checkpointing in (False, True):
        ours = report[f"truthgpt/ckpt={checkpointing}"]
        peer = report[f"diffusers+accelerate/ckpt={checkpointing}"]
        for label, r in (("truthgpt", ours), ("diffusers+accelerate", peer)):
            ratio = (
                f"{ours['images_per_second'] / peer['images_per_second']:.2f}" if r is ours else ""
            )
            print(
                f"{checkpointing} | {label} | {r['images_per_second']:.2f} "
                f"[{r['min']:.2f}-{r['max']:.2f}] | {r['peak_gib']:.1f} | {ratio}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

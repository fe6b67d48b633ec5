"""Image generation memory and latency: stock diffusers vs truthgpt's memory levels and speed mode.

Builds SD-1.5- and SDXL-shaped pipelines at their real sizes from configs written here, with
random weights (no hub; random weights leave memory and time unchanged), in fp16. Each setup gets
a freshly built pipeline with the same weights, one warm-up run, then one measured run of
--steps steps (512x512 for SD-1.5, 1024x1024 for SDXL, batch 1, guidance 7.5):

    stock            pipe.to("cuda")                      (plain diffusers)
    stock_offload    pipe.enable_model_cpu_offload()      (plain diffusers)
    none | balanced | aggressive | ultra                   truthgpt memory levels
    speed            truthgpt speed mode (+ memory none), compiled and warmed up before timing
    speed_cudagraphs speed mode with torch.compile mode "reduce-overhead"
    speed_regional   speed mode compiling only the repeated transformer blocks

    python benchmarks/diffusion_memory.py --models sd15,sdxl --json diffusion.json
    python benchmarks/diffusion_memory.py --tiny          # CPU smoke test, tiny configs

Rows are printed as they finish and the JSON is rewritten after each, so a run cut short keeps
what it measured; the table and the target checks come last.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from truthgpt.diffusion import (
    LEVELS,
    MemoryMonitor,
    apply_memory_level,
    compile_denoiser,
    component_bytes,
    prepare_for_speed,
)

SETUPS = (
    "stock",
    "none",
    "balanced",
    "speed",
    "ultra",
    "aggressive",
    "stock_offload",
    "speed_cudagraphs",
    "speed_regional",
)
DEFAULT_SETUPS = SETUPS[:-1]  # regional compile is known to gain little on a UNet
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
GIB = 1024**3

# Stable Diffusion's noise schedule (both models were trained with it).
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# ---------------------------------------------------------------------------------------------
# Configs: the real architectures (the shapes of the public model_index/config.json files)


def unet_config(model: str, tiny: bool) -> dict:
    if tiny:
        common = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=4,
        )
        if model == "sd15":
            return common | dict(cross_attention_dim=32)
        return common | dict(
            cross_attention_dim=64,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
        )
    if model == "sd15":
        return dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    return dict(
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,  # CLIP-L 768 + OpenCLIP bigG 1280, side by side
        attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads here
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # pooled bigG 1280 + 6 time ids x 256
    )


def vae_config(model: str, tiny: bool) -> dict:
    if tiny:
        channels, size = (16, 32), 64
    else:
        channels, size = (128, 256, 512, 512), 512 if model == "sd15" else 1024
    return dict(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=8 if tiny else 32,
        sample_size=size,
        scaling_factor=0.18215 if model == "sd15" else 0.13025,
        # SDXL's VAE overflows in fp16, so its pipeline decodes in fp32; SD-1.5's does not
        force_upcast=model == "sdxl",
    )


def text_config(kind: str, tiny: bool, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
    )
    if tiny:
        sizes = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2)
        return CLIPTextConfig(
            vocab_size=len(tokenizer), num_attention_heads=4, projection_dim=32, **sizes, **ids
        )
    if kind == "clip_l":  # CLIP ViT-L/14 text tower
        sizes = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
        return CLIPTextConfig(
            vocab_size=49408,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
            **sizes,
            **ids,
        )
    sizes = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32)  # OpenCLIP bigG
    return CLIPTextConfig(
        vocab_size=49408,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        **sizes,
        **ids,
    )


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's byte-level BPE over the 256 byte symbols and no merges: with random weights the
    vocabulary's content is irrelevant, only its ids must fit the embedding."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = printable + [256 + n for n in range(256 - len(printable))]
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(folder)


def build_pipeline(model: str, tiny: bool, device: torch.device, dtype: torch.dtype, tok_dir: Path):
    """Random weights, seeded: every setup of a model gets the same pipeline."""
    tokenizer = make_tokenizer(tok_dir)
    torch.manual_seed(0)
    # Initialising on the GPU takes well under a second even for SDXL's 3.5B parameters,
    # against minutes of CPU random-number generation; offloading setups move it out after.
    # The default dtype makes the weights fp16 from the start: no fp32 copy, no cast.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config(model, tiny))
            vae = AutoencoderKL(**vae_config(model, tiny))
            text_encoder = CLIPTextModel(text_config("clip_l", tiny, tokenizer))
            if model == "sdxl":
                text_encoder_2 = CLIPTextModelWithProjection(text_config("bigg", tiny, tokenizer))
    finally:
        torch.set_default_dtype(default_dtype)
    if model == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(skip_prk_steps=True, **_BETAS),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **_BETAS),
    )


# ---------------------------------------------------------------------------------------------
# One setup


def set_up(pipe, setup: str, device: torch.device, call: dict, log) -> None:
    if setup == "stock":
        pipe.to(device)
    elif setup == "stock_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif setup in LEVELS:
        pipe.to(device if setup == "none" else "cpu")
        apply_memory_level(pipe, setup, device, log)
    elif setup.startswith("speed"):
        prepare_for_speed(pipe, log)
        apply_memory_level(pipe, "none", device, log)
        options = {
            "speed": {},
            "speed_cudagraphs": {"mode": "reduce-overhead"},
            "speed_regional": {"scope": "regional"},
        }[setup]
        warm = dict(call, num_inference_steps=2, output_type="latent")
        compile_denoiser(pipe, device, warm_up=lambda: pipe(**warm), log=log, **options)
    else:
        raise ValueError(f"unknown setup {setup!r}; known: {', '.join(SETUPS)}")


def measure(model: str, setup: str, args, device: torch.device, tok_dir: Path) -> dict:
    size = 64 if args.tiny else (512 if model == "sd15" else 1024)
    row: dict = {"model": model, "setup": setup, "size": size, "steps": args.steps}
    call = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        width=size,
        height=size,
    )
    notes: list[str] = []
    pipe = None
    cudnn_benchmark = torch.backends.cudnn.benchmark  # speed mode turns it on; rows stay apart
    try:
        pipe = build_pipeline(model, args.tiny, device, args.dtype, tok_dir)
        pipe.set_progress_bar_config(disable=True)
        row["weights_gib"] = sum(component_bytes(pipe).values()) / GIB
        started = time.perf_counter()
        set_up(pipe, setup, device, call, notes.append)
        _free(device)
        pipe(**dict(call, num_inference_steps=args.warmup_steps))
        row["setup_s"] = time.perf_counter() - started  # includes compile and the warm-up run
        with MemoryMonitor(device) as monitor:
            pipe(**call, generator=torch.Generator("cpu").manual_seed(0))
        stats = monitor.stats
        row |= {
            "peak_allocated_gib": stats.peak_allocated_gib,
            "peak_reserved_gib": stats.peak_reserved_gib,
            "host_rss_gib": stats.host_rss_gib,
            "latency_s": stats.latency_s,
        }
    except Exception as exc:  # one failing setup must not cost the other rows
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        notes.append(traceback.format_exc(limit=3).splitlines()[-1])
    finally:
        del pipe
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # compiled code of this setup must not serve the next one
        _free(device)
    row["notes"] = notes
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Report


def find(rows: list[dict], model: str, setup: str) -> dict | None:
    row = next((r for r in rows if r["model"] == model and r["setup"] == setup), None)
    return row if row and "latency_s" in row else None


def target_checks(rows: list[dict], on_gpu: bool) -> list[dict]:
    """The targets for the full-size GPU run, each with its measured value."""
    checks = []
    limits = {"sdxl": 3.0, "sd15": 1.2}
    for model, limit in limits.items():
        ultra = find(rows, model, "ultra")
        if ultra and on_gpu:  # no GPU memory to speak of on a CPU run
            value = ultra["peak_allocated_gib"]
            checks.append(_check(f"{model} ultra peak < {limit} GiB", value, value < limit))
    for model in limits:
        none, balanced = find(rows, model, "none"), find(rows, model, "balanced")
        if none and balanced:
            ratio = balanced["latency_s"] / none["latency_s"]
            checks.append(_check(f"{model} balanced latency <= 1.5x none", ratio, ratio <= 1.5))
        stock = find(rows, model, "stock")
        for setup in ("speed", "speed_cudagraphs", "speed_regional"):
            fast = find(rows, model, setup)
            if stock and fast:
                gain = stock["latency_s"] / fast["latency_s"]
                name = f"{model} {setup} >= 1.3x faster than stock"
                checks.append(_check(name, gain, gain >= 1.3))
    return checks


def _check(name: str, value: float, ok: bool) -> dict:
    return {"check": name, "value": round(value, 3), "pass": bool(ok)}


def table(rows: list[dict]) -> str:
    lines = [
        f"{'model':6} {'setup':17} {'alloc GiB':>9} {'resvd GiB':>9} {'latency s':>9} "
        f"{'vs stock':>8} {'host GiB':>8}"
    ]
    for row in rows:
        if "latency_s" not in row:
            lines.append(f"{row['model']:6} {row['setup']:17} error: {row.get('error', '?')}")
            continue
        stock = find(rows, row["model"], "stock")
        speedup = f"{stock['latency_s'] / row['latency_s']:.2f}x" if stock else "-"
        lines.append(
            f"{row['model']:6} {row['setup']:17} {row['peak_allocated_gib']:9.2f} "
            f"{row['peak_reserved_gib']:9.2f} {row['latency_s']:9.2f} {speedup:>8} "
            f"{row['host_rss_gib']:8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument(
        "--levels", default=",".join(DEFAULT_SETUPS), help=f"comma list of {', '.join(SETUPS)}"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 25 (4 with --tiny)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the warm-up run")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a CPU smoke test")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.tiny else 25)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # fp16 as people run these models; CPUs lack fast fp16 kernels, so the smoke test uses fp32
    args.dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = [m for m in args.models.split(",") if m]
    setups = [s for s in args.levels.split(",") if s]
    unknown = [m for m in models if m not in ("sd15", "sdxl")] + [
        s for s in setups if s not in SETUPS
    ]
    if unknown:
        parser.error(f"unknown model or setup: {', '.join(unknown)}")

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": str(args.dtype).removeprefix("torch."),
        "tiny": args.tiny,
        "steps": args.steps,
        "rows": [],
    }
    print(f"# {report['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for setup in setups:
                row = measure(model, setup, args, device, Path(tmp))
                report["rows"].append(row)
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                print(json.dumps(shown), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=1))
    report["checks"] = target_checks(report["rows"], on_gpu=device.type == "cuda")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print()
    print(table(report["rows"]))
    if args.tiny:
        print("(tiny CPU smoke test: the targets below are for the full-size GPU run)")
    for check in report["checks"]:
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['check']}: {check['value']}")


if __name__ == "__main__":
    main()

"""Diffusion layer on tiny real diffusers pipelines with random weights (built, saved, reloaded)."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from truthgpt.config import SCHEDULER_NAMES, DiffusionConfig
from truthgpt.diffusion import (
    LEVELS,
    SCHEDULERS,
    MemoryMonitor,
    apply_memory_level,
    choose_level,
    generate_images,
    load_pipeline,
    memory_needs,
    parse_lora,
    resolve_dtype,
    set_scheduler,
)
from truthgpt.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------
# Tiny pipelines


def _write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256 byte symbols and no merges: real code, tiny vocab."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    # the byte -> unicode map of GPT-2/CLIP byte-level BPE
    codes = printable + [256 + n for n in range(256 - len(printable))]
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(tokenizer: CLIPTokenizer, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _unet(**extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        **({"cross_attention_dim": 32} | extra),
    )


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline folder (32x32 images)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    tokenizer = _write_clip_tokenizer(root / "tok")
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="module")
def sd_pipe(sd_dir: Path):
    """One loaded pipeline shared by tests that only swap its scheduler."""
    return load_pipeline(sd_dir, torch.float32)


def _cfg(tmp_path: Path, model: Path | None = None, **fields) -> DiffusionConfig:
    values = dict(
        model=str(model) if model else None,
        prompt="a red lighthouse",
        negative_prompt="blurry",
        steps=3,
        guidance=5.0,
        seed=7,
        memory="none",
        scheduler="ddim",
        output_dir=str(tmp_path / "images"),
    )
    return DiffusionConfig(**(values | fields))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _run(cfg: DiffusionConfig, pipe=None, logs: list[str] | None = None):
    sink = logs.append if logs is not None else (lambda _: None)
    return generate_images(cfg, pipe=pipe, log=sink, device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------
# Schedulers


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_generates(tmp_path: Path, sd_pipe, name: str) -> None:
    result = _run(_cfg(tmp_path, scheduler=name, steps=3), pipe=sd_pipe)
    cls, extra = SCHEDULERS[name]
    assert type(sd_pipe.scheduler) is cls
    assert all(sd_pipe.scheduler.config[key] == value for key, value in extra.items())
    pixels = _pixels(result.images[0])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    assert result.metadata["scheduler"] == name


class _Records(logging.Handler):
    """What diffusers logs (its loggers all pass through "diffusers") while in use."""

    def __enter__(self) -> list[str]:
        self.messages: list[str] = []
        logging.getLogger("diffusers").addHandler(self)
        return self.messages

    def __exit__(self, *exc) -> None:
        logging.getLogger("diffusers").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_dpm_sde_draws_as_diffusers_does_without_its_lower_order_notice(
    tmp_path: Path, sd_dir: Path, sd_pipe
) -> None:
    # diffusers switches the single-step solver to lower_order_final itself, and said so on
    # every image: " `last_sigmas_type='zero'` is not supported ... Changing scheduler
    # {self.config} ..." (an unformatted template). Same picture, no notice.
    with _Records() as messages:
        ours = _run(_cfg(tmp_path, scheduler="dpm++_sde", steps=3), pipe=sd_pipe)
    assert messages == []
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.scheduler = DPMSolverSinglestepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++"
    )
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        "a red lighthouse", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images[0]  # fmt: skip
    assert np.array_equal(_pixels(ours.images[0]), _pixels(reference))


def test_scheduler_swap_keeps_the_noise_schedule(sd_pipe) -> None:
    set_scheduler(sd_pipe, "dpm++_2m_karras")
    set_scheduler(sd_pipe, "dpm++_2m")  # the Karras switch must not leak through the config
    assert sd_pipe.scheduler.config.use_karras_sigmas is False
    assert sd_pipe.scheduler.config.steps_offset == 1  # the model's own setting survives


def test_unknown_scheduler_lists_names(sd_pipe) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'euler_a'") as info:
        set_scheduler(sd_pipe, "euler-a")
    assert "dpm++_2m_karras" in str(info.value)


def test_flow_matching_pipeline_is_refused(sd_dir: Path) -> None:
    pipe = load_pipeline(sd_dir, torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ConfigError, match="flow-matching"):
        set_scheduler(pipe, "euler")


# ---------------------------------------------------------------------------------------------
# Loading


def test_a_hub_id_that_cannot_be_fetched_says_the_hub_was_not_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # HF_HUB_OFFLINE makes huggingface_hub refuse at once what a machine without a network
    # refuses after its retries; diffusers then reports a missing model_index.json.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="hub could not be reached") as caught:
        load_pipeline("someone/some-model", allow_download=True)
    assert "model_index.json" not in str(caught.value)


def test_bad_model_folders_give_checkpoint_errors(tmp_path: Path, sd_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_pipeline(tmp_path)  # a folder, but not a pipeline
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pipeline(tmp_path / "missing" / "sd")
    with pytest.raises(CheckpointError, match="allow_download"):
        load_pipeline("someone/some-model")

    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((sd_dir / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index))  # no component folders at all
    with pytest.raises(CheckpointError, match="could not load"):
        load_pipeline(broken)


def test_generate_needs_a_multiple_of_the_vae_scale(tmp_path: Path, sd_dir: Path) -> None:
    # The tiny VAE downsamples by 2: its multiple, not a fixed 8, is what is checked.
    with pytest.raises(ConfigError, match="multiple of 2, which this model's autoencoder"):
        _run(_cfg(tmp_path, sd_dir, width=33))


def test_a_pixel_space_model_draws_any_size(tmp_path: Path, if_dir: Path) -> None:
    cfg = _cfg(tmp_path, if_dir, width=12, height=10, scheduler=None, dtype="fp32", steps=2)
    assert _run(cfg).images[0].size == (12, 10)


def test_a_size_that_does_not_fit_in_memory_is_a_one_line_error(
    tmp_path: Path, if_dir: Path
) -> None:
    # The allocator's RuntimeError (torch.OutOfMemoryError on a GPU) was a traceback. 2^23
    # pixels a side is 256 TiB of noise: more than any address space, so no machine tries it.
    side = 2**23
    cfg = _cfg(tmp_path, if_dir, width=side, height=side, scheduler=None, steps=1)
    with pytest.raises(ConfigError) as info:
        _run(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"diffusion: out of memory on cpu drawing 1 image(s) at {side}x")
    assert "256.0 TiB" in message and "--size" in message and "--batch" in message
    assert not (tmp_path / "images").exists()


def test_config_scheduler_names_are_the_mapped_ones() -> None:
    assert list(SCHEDULER_NAMES) == list(SCHEDULERS)


# ---------------------------------------------------------------------------------------------
# Seeds, PNGs, grid


def test_same_seed_same_image_and_seed_per_image(tmp_path: Path, sd_pipe) -> None:
    first = _run(_cfg(tmp_path, seed=11), pipe=sd_pipe)
    again = _run(_cfg(tmp_path, seed=11), pipe=sd_pipe)
    other = _run(_cfg(tmp_path, seed=12), pipe=sd_pipe)
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))
    assert not np.array_equal(_pixels(first.images[0]), _pixels(other.images[0]))

    batch = _run(_cfg(tmp_path, seed=11, batch=2), pipe=sd_pipe)
    # image i of a batch is drawn from seed + i, as if it had been drawn alone
    assert np.abs(_pixels(batch.images[1]) - _pixels(other.images[0])).max() <= 1
    assert np.abs(_pixels(batch.images[0]) - _pixels(first.images[0])).max() <= 1


def test_png_metadata_and_grid(tmp_path: Path, sd_pipe) -> None:
    result = _run(_cfg(tmp_path, batch=2, seed=3, scheduler="euler_a"), pipe=sd_pipe)
    assert len(result.paths) == 2 and all(p.is_file() for p in result.paths)
    text = Image.open(result.paths[1]).text
    assert text["prompt"] == "a red lighthouse" and text["negative_prompt"] == "blurry"
    assert text["seed"] == "4"  # seed + 1 for the second image
    assert (text["steps"], text["guidance"], text["scheduler"]) == ("3", "5", "euler_a")
    assert (text["width"], text["height"], text["memory"]) == ("32", "32", "none")
    assert text["dtype"] == "float32" and text["device"] == "cpu"
    # On a CPU the memory figure is the process's RSS (an allocator peak would read 0).
    assert "peak_gib" not in text and float(text["host_rss_gib"]) > 0
    assert float(text["latency_s"]) > 0

    assert result.grid_path is not None and result.grid_path.is_file()
    grid = Image.open(result.grid_path)
    assert grid.size == (64, 32)
    assert np.array_equal(_pixels(grid.crop((32, 0, 64, 32))), _pixels(result.images[1]))

    # Three images in a 2x2 grid: the empty cell is black, the background, not white.
    three = _run(_cfg(tmp_path, batch=3, seed=3), pipe=sd_pipe)
    empty = _pixels(Image.open(three.grid_path).crop((32, 32, 64, 64)))
    assert empty.max() == 0


def test_an_image_stopped_mid_write_leaves_no_partial_png(
    tmp_path: Path, sd_pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from truthgpt import atomic

    def ctrl_c(path: Path) -> None:  # between the PNG's bytes and their rename into place
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, seed=3), pipe=sd_pipe)
    left = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert not [name for name in left if name.endswith(".png") or name.startswith(".tmp-")], left


# ---------------------------------------------------------------------------------------------
# Memory levels and the monitor


@pytest.mark.parametrize("level", [*LEVELS, "auto"])
def test_every_memory_level_runs_on_cpu(tmp_path: Path, sd_dir: Path, level: str) -> None:
    logs: list[str] = []
    # 64 px is two latent tiles per side for the tiny VAE (32 px), so tiling really decodes
    result = _run(_cfg(tmp_path, sd_dir, memory=level, width=64, height=64), logs=logs)
    reference = _run(_cfg(tmp_path, sd_dir, memory="none", width=64, height=64))
    pixels = _pixels(result.images[0])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    diff = np.abs(pixels - _pixels(reference.images[0])).mean()
    if level in ("none", "auto"):
        assert diff == 0  # auto on a CPU is none
        assert level == "none" or "no CUDA GPU" in result.memory_reason
    else:
        # FP8 storage and tiled decoding change rounding, not the picture
        assert diff < 12
        assert any("offloading" in line and "skipped" in line for line in logs)
    assert result.memory_level == ("none" if level == "auto" else level)


def test_memory_level_recipes_applied(sd_dir: Path) -> None:
    pipe = load_pipeline(sd_dir, torch.float32)
    apply_memory_level(pipe, "ultra", "cpu", log=lambda _: None)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    assert pipe.unet.down_blocks[1].attentions[0].norm.weight.dtype == torch.float32  # norms kept
    assert pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn  # stored in FP8
    blocks = [m for m in pipe.unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    assert blocks and all(b._chunk_size == 1 and b._chunk_dim == 0 for b in blocks)
    with pytest.raises(ConfigError, match="unknown level"):
        apply_memory_level(pipe, "extreme", "cpu")


def test_auto_level_follows_free_memory(sd_pipe) -> None:
    needs = memory_needs(sd_pipe)
    assert needs["none"] > needs["balanced"] > needs["aggressive"] > 0
    picks = [
        choose_level(sd_pipe, "cuda", free_bytes=int(free))[0]
        for free in (needs["none"] + 1, needs["balanced"] + 1, needs["aggressive"] + 1, 0)
    ]
    assert picks == ["none", "balanced", "aggressive", "ultra"]
    level, why = choose_level(sd_pipe, "cuda", free_bytes=int(needs["balanced"]) + 1)
    assert "GiB" in why and "'balanced'" in why
    assert choose_level(sd_pipe, "cpu")[0] == "none"


class _Node:
    other: _Node | None = None


def test_monitor_frees_and_times_after_an_exception() -> None:
    monitor = MemoryMonitor("cpu")
    gc.disable()  # only the monitor's own collection may free the cycle below
    try:
        with pytest.raises(RuntimeError, match="boom"), monitor:
            a, b = _Node(), _Node()
            a.other, b.other = b, a
            freed = weakref.ref(a)
            del a, b
            time.sleep(0.02)
            raise RuntimeError("boom")
    finally:
        gc.enable()
    assert freed() is None
    assert monitor.stats is not None and monitor.stats.latency_s >= 0.02
    assert monitor.stats.host_rss_gib > 0 and monitor.stats.peak_allocated_gib == 0


# ---------------------------------------------------------------------------------------------
# Speed, LoRA, SDXL


def test_speed_mode_degrades_cleanly_on_cpu(tmp_path: Path, sd_dir: Path) -> None:
    logs: list[str] = []
    fast = _run(_cfg(tmp_path, sd_dir, speed=True), logs=logs)
    plain = _run(_cfg(tmp_path, sd_dir))
    assert any("torch.compile skipped" in line for line in logs)
    assert any("fused QKV" in line for line in logs)
    assert np.abs(_pixels(fast.images[0]) - _pixels(plain.images[0])).max() <= 2


@pytest.fixture(scope="module")
def lora_dir(sd_dir: Path, tmp_path_factory) -> Path:
    """A random rank-4 LoRA on the UNet's attention projections, saved the diffusers way."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = load_pipeline(sd_dir, torch.float32).unet
    target = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target))
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it do something
            torch.nn.init.normal_(param, std=0.5)
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


def test_lora_weight_changes_the_image(tmp_path: Path, sd_dir: Path, lora_dir: Path) -> None:
    plain = _pixels(_run(_cfg(tmp_path, sd_dir)).images[0])
    with_lora = _pixels(_run(_cfg(tmp_path, sd_dir, loras=[f"{lora_dir}:0.8"])).images[0])
    at_zero = _run(_cfg(tmp_path, sd_dir, loras=[f"{lora_dir}:0"], memory="aggressive"))
    assert np.abs(with_lora - plain).mean() > 1
    # weight 0 is the base model, also under FP8 storage (peft layers are left in full precision)
    plain_fp8 = _run(_cfg(tmp_path, sd_dir, memory="aggressive"))
    assert np.array_equal(_pixels(at_zero.images[0]), _pixels(plain_fp8.images[0]))
    assert at_zero.metadata["loras"] == f"{lora_dir}:0"


def test_speed_mode_keeps_lora(tmp_path: Path, sd_dir: Path, lora_dir: Path) -> None:
    logs: list[str] = []
    fast = _run(_cfg(tmp_path, sd_dir, loras=[f"{lora_dir}:0.8"], speed=True), logs=logs)
    plain = _run(_cfg(tmp_path, sd_dir, loras=[f"{lora_dir}:0.8"]))
    assert "speed: fused QKV skipped, LoRA adapters are loaded" in logs
    assert np.abs(_pixels(fast.images[0]) - _pixels(plain.images[0])).max() <= 2


def test_a_lora_of_another_model_is_a_one_line_error_and_diffusers_adds_nothing(
    tmp_path: Path, sd_dir: Path, lora_dir: Path, if_dir: Path
) -> None:
    # A LoRA that fits printed diffusers' "No LoRA keys associated to CLIPTextModel found ...
    # open an issue" on every image; one for another model printed its error twice, with a
    # line per weight of the state dict (19 lines for this tiny UNet, thousands for SDXL).
    with _Records() as messages:
        _run(_cfg(tmp_path, sd_dir, loras=[str(lora_dir)]))
        with pytest.raises(CheckpointError) as info:
            _run(_cfg(tmp_path, if_dir, loras=[f"{lora_dir}:0.5"], scheduler=None))
    assert messages == []
    message = str(info.value)
    assert "\n" not in message, message
    assert f"diffusion.loras[0]: {str(lora_dir)!r} does not fit this pipeline's unet: " in message
    assert "weight(s) have other shapes (e.g. " in message and "[4, 64] in the adapter" in message


def test_lora_spec_parsing_and_missing_folder(tmp_path: Path, sd_dir: Path) -> None:
    assert parse_lora("styles/ink:0.8") == ("styles/ink", 0.8)
    assert parse_lora("styles/ink") == ("styles/ink", 1.0)
    assert parse_lora("C:\\loras\\ink") == ("C:\\loras\\ink", 1.0)
    with pytest.raises(CheckpointError, match="does not exist"):
        _run(_cfg(tmp_path, sd_dir, loras=[str(tmp_path / "nope") + ":0.5"]))


def test_sdxl_pipeline_generates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = _write_clip_tokenizer(tmp_path / "tok")
    unet = _unet(
        cross_attention_dim=64,  # both encoders' hidden states side by side (32 + 32)
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + six size/crop ids
        transformer_layers_per_block=(1, 2),
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        text_encoder_2=_text_encoder(tokenizer, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
    )
    pipe.save_pretrained(tmp_path / "sdxl")
    loaded = load_pipeline(tmp_path / "sdxl", torch.float32)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    result = _run(_cfg(tmp_path, scheduler="euler", memory="aggressive"), pipe=loaded)
    pixels = _pixels(result.images[0])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    assert loaded.text_encoder_2.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu on the GPU machine): the offload paths that need CUDA streams


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("level", LEVELS)
def test_cuda_memory_levels_draw_the_same_picture(tmp_path: Path, sd_dir: Path, level: str) -> None:
    def run(memory: str, **fields):
        cfg = _cfg(tmp_path, sd_dir, memory=memory, dtype="fp16", width=64, height=64, **fields)
        return generate_images(cfg, log=lambda _: None, device="cuda", progress=False)

    result, reference = run(level), run("none")
    diff = np.abs(_pixels(result.images[0]) - _pixels(reference.images[0])).mean()
    assert diff < 12  # FP8 storage and tiling change rounding, not the picture
    # the tiny model is too small for the order of the peaks to tell anything; the benchmark
    # (benchmarks/diffusion_memory.py) measures them at full size
    assert result.stats.peak_allocated_gib > 0 and result.memory_level == level


@pytest.mark.gpu
@needs_cuda
def test_cuda_speed_mode_compiles(tmp_path: Path, sd_dir: Path) -> None:
    logs: list[str] = []
    cfg = _cfg(tmp_path, sd_dir, dtype="fp16", speed=True, memory="balanced")
    result = generate_images(cfg, log=logs.append, device="cuda", progress=False)
    assert any("torch.compile of UNet2DConditionModel" in line for line in logs)
    assert _pixels(result.images[0]).std() > 0


def test_image_cli_writes_pngs_and_reports_memory(tmp_path: Path, sd_dir: Path) -> None:
    from typer.testing import CliRunner

    from truthgpt.cli import app

    out = tmp_path / "imgs"
    args = [
        "image",
        str(sd_dir),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--size",
        "64",
        "--seed",
        "5",
        "--batch",
        "2",
        "--scheduler",
        "euler_a",
        "--memory",
        "balanced",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "memory level balanced: host RSS" in result.stdout and "grid:" in result.stdout
    assert "peak 0.00 GiB" not in result.stdout
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3  # two images and the grid
    assert Image.open(pngs[0]).text["scheduler"] == "euler_a"
    yaml_path = tmp_path / "img.yaml"
    yaml_path.write_text(
        f"diffusion:\n  model: {sd_dir}\n  prompt: a dog\n  steps: 2\n"
        f"  width: 64\n  height: 64\n  dtype: fp32\n  output_dir: {out}\n"
    )
    again = CliRunner().invoke(app, ["image", "--config", str(yaml_path), "--memory", "nope"])
    assert again.exit_code == 1 and "diffusion.memory" in again.output
    for size in ("big", "16x", "16 x 16", "16x16x16"):
        bad_size = CliRunner().invoke(app, ["image", str(sd_dir), "--prompt", "x", "--size", size])
        assert bad_size.exit_code == 1 and "WIDTHxHEIGHT" in bad_size.output, bad_size.output


def test_image_cli_keeps_a_prompt_beyond_the_basic_plane(tmp_path: Path, sd_dir: Path) -> None:
    # Flags went to the config as JSON, which writes an emoji as a surrogate pair that PyYAML
    # reads as two lone surrogates: the tokenizer raised a TypeError traceback.
    from typer.testing import CliRunner

    from truthgpt.cli import app
    from truthgpt.config import override_value, parse_override

    prompt, negative = "a 🐱 on a 猫 rug", "no 🌧"
    args = ["image", str(sd_dir), "--prompt", prompt, "--negative-prompt", negative]
    args += ["--steps", "1", "--memory", "none", "--out", str(tmp_path / "imgs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with Image.open(next((tmp_path / "imgs").glob("*.png"))) as png:
        assert (png.text["prompt"], png.text["negative_prompt"]) == (prompt, negative)
    for value in (prompt, "\x85 \u2028", "1e-3", "null", "", 0.9, True, None, ["a:0.8", "b"]):
        assert parse_override(f"diffusion.x={override_value(value)}")[1] == value


def test_image_command_is_quiet(tmp_path: Path, sd_dir: Path) -> None:
    # A fresh process: transformers shows its torchvision notices once per process. The dtype
    # is the default (auto), which is fp32 on a CPU without a note.
    args = ["image", str(sd_dir), "--prompt", "a cat", "--steps", "2", "--scheduler", "euler_a"]
    args += ["--memory", "none", "--out", str(tmp_path / "imgs")]
    code = f"from truthgpt.cli import app\napp({args!r}, standalone_mode=False)\n"
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for noise in ("torchvision", "Loading weights", "Loading pipeline components", "copy keyword"):
        assert noise not in done.stderr, done.stderr
    assert "fp16" not in done.stdout, done.stdout


def test_dtype_auto_and_the_fp16_note_comes_after_model_errors(tmp_path: Path) -> None:
    notes: list[str] = []
    assert resolve_dtype("auto", torch.device("cpu"), notes.append) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), notes.append) == torch.float16
    assert notes == []
    assert resolve_dtype("fp16", torch.device("cpu"), notes.append) == torch.float32
    assert notes and "using fp32" in notes[0]
    # A missing model is the one thing said: no dtype note before the error.
    logs: list[str] = []
    with pytest.raises(CheckpointError, match="no such folder"):
        _run(_cfg(tmp_path, tmp_path / "missing" / "sd", dtype="fp16"), logs=logs)
    assert logs == []


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory) -> Path:
    """A tiny pixel-space pipeline as task image-generation saves it (IF layout, CLIP text)."""
    from truthgpt.config import load
    from truthgpt.training.diffusion_model import build_from_scratch, save_pipeline

    unet = {"in_channels": 1, "block_out_channels": [8, 16], "norm_num_groups": 4}
    unet |= {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}
    unet |= {"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    config = load(
        {
            "task": "image-generation",
            "data": {"source": "digits"},
            "diffusion_training": {"space": "pixel", "unet": unet, "text_encoder": text},
        }
    )
    folder = tmp_path_factory.mktemp("tiny-if") / "if"
    save_pipeline(build_from_scratch(config, 8), folder)
    return folder


def test_an_if_layout_run_loads_without_diffusers_t5_type_notice(if_dir: Path) -> None:
    """Pixel-space runs save IFPipeline layouts with a CLIP text encoder; diffusers warns that
    IF's annotation says T5. That one notice is dropped, other type notices still pass."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        pipe = load_pipeline(if_dir, torch.float32)
        logger.warning("Expected types for unet: (UNet2DConditionModel,), got int.")
    finally:
        logger.removeHandler(handler)
    assert type(pipe).__name__ == "IFPipeline"
    assert [r.getMessage() for r in records] == [
        "Expected types for unet: (UNet2DConditionModel,), got int."
    ]

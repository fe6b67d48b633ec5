"""Task image-generation through the one Trainer: digits from scratch (loss falls, the run folder
is a pipeline diffusers and `truthgpt image` load), a LoRA fine-tune of a tiny Stable Diffusion
pipeline (exact resume, adapter loaded by diffusers' own `load_lora_weights`), the objective
against diffusers' scheduler, and config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import digits_raw_config, tiny_raw_config
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel
from typer.testing import CliRunner

from truthgpt.cli import app
from truthgpt.config import LoraConfig, load
from truthgpt.diffusion import load_pipeline
from truthgpt.errors import ConfigError, TruthGPTError
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import verify_checkpoint
from truthgpt.training.denoising import denoising_loss, snr
from truthgpt.training.diffusion_model import LORA_WEIGHTS, add_lora, char_clip_tokenizer
from truthgpt.training.evaluate import evaluate_run
from truthgpt.training.run import train
from truthgpt.training.tasks import build_task


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


# ---------------------------------------------------------------------------------------------
# From scratch: digits


def test_digits_from_scratch_loss_falls_and_the_run_is_a_diffusers_pipeline(
    tmp_path: Path,
) -> None:
    class Lines(Callback):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def on_log(self, message: str) -> None:
            self.lines.append(message)

    logged = Lines()
    result = train(load(digits_raw_config(tmp_path)), callbacks=[logged])
    assert result.steps == 40
    # The log and metrics speak of images and a noise loss, not of tokens and perplexity.
    model_line = next(line for line in logged.lines if line.startswith("model "))
    assert model_line.startswith("model pixel-space diffusion (UNet "), model_line
    assert "text encoder" in model_line and "llama" not in model_line
    assert not any("perplexity" in line for line in logged.lines)
    assert any(line.startswith("val loss ") for line in logged.lines)
    for record in [
        *records(result.run_dir, "train").values(),
        *records(result.run_dir, "eval").values(),
    ]:
        assert not any(key.startswith("tokens") or key == "val_ppl" for key in record), record
    assert {"images_per_second", "images_seen"} <= records(result.run_dir, "train")[40].keys()
    # The validation loss uses fixed noise and timesteps: the same weights give the same
    # number, so a lower one is learning, not luck.
    assert result.final_val_loss < 0.8 * result.initial_val_loss
    train_losses = [r["loss"] for r in records(result.run_dir, "train").values()]
    assert train_losses[-1] < train_losses[0]
    assert (result.run_dir / "samples" / "step_000040.png").is_file()
    assert any((result.run_dir / "tb").iterdir())

    best = result.run_dir / "checkpoints" / "best"
    verify_checkpoint(best)
    # Plain diffusers reads the checkpoint as a pipeline, and draws 16x16 single-channel images.
    pipe = DiffusionPipeline.from_pretrained(best, local_files_only=True)
    assert type(pipe).__name__ == "IFPipeline"
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a handwritten digit one", num_inference_steps=2, generator=generator, clean_caption=False
    ).images[0]
    assert image.size == (16, 16)
    # `truthgpt image RUN` resolves the run folder to the same checkpoint.
    ours = load_pipeline(result.run_dir, torch.float32)
    reference = dict(pipe.unet.state_dict())
    assert all(torch.equal(v, reference[k]) for k, v in ours.unet.state_dict().items())
    # ... and draws with the run's own sampling settings unless told otherwise.
    from truthgpt.config import DiffusionConfig
    from truthgpt.diffusion import generate_images

    def drawn(**given) -> tuple[str, str]:
        cfg = DiffusionConfig(
            model=str(result.run_dir), prompt="a handwritten digit one", memory="none",
            dtype="fp32", seed=0, output_dir=str(tmp_path / f"images{len(given)}"), **given,
        )  # fmt: skip
        metadata = generate_images(cfg, pipe=ours, log=lambda m: None, device="cpu").metadata
        return metadata["guidance"], metadata["steps"]

    assert drawn() == ("4", "3")  # the run's samples: guidance 4.0 (the default), 3 steps
    assert drawn(guidance=1.5) == ("1.5", "3")  # what the user gives wins


def test_eval_of_a_diffusion_run_gives_the_loss_its_training_logged(tmp_path: Path) -> None:
    """`truthgpt eval RUN` evaluates an image-generation run as its training does: the task's
    noise loss on the fixed-noise validation items, over images, without a perplexity."""
    ema = {"enabled": True, "decay": 0.5, "evaluate": True}  # best/ holds the EMA weights
    raw = digits_raw_config(
        tmp_path,
        training={"max_steps": 6, "eval_every": 3, "log_every": 3, "ema": ema},
        checkpoint={"save_every": 3},
        diffusion_training={"samples": {"every": 0}},
    )
    run_dir = train(load(raw)).run_dir
    logged = {step: r["val_loss"] for step, r in records(run_dir, "eval").items() if step}
    best = min(logged, key=logged.get)
    batches = str(raw["training"]["eval_batches"])  # the blocks training evaluates
    out = CliRunner().invoke(app, ["eval", str(run_dir), "--max-batches", batches])
    assert out.exit_code == 0, out.output
    assert "checkpoints/best on val" in out.stdout and "(32 images, 2 batches)" in out.stdout
    assert "perplexity" not in out.stdout
    result = evaluate_run(run_dir, max_batches=2, device="cpu")
    assert result["loss"] == pytest.approx(logged[best], rel=1e-6)
    assert result["ppl"] is None and result["images"] == 32
    text = tmp_path / "some.txt"
    text.write_text("a handwritten digit one\n")
    refused = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(text)])
    assert refused.exit_code == 1 and "--data: " in refused.output
    assert "drop --data" in refused.output, refused.output


def test_caption_embeddings_match_the_pipelines_own_encode_prompt(tmp_path: Path) -> None:
    config = load(digits_raw_config(tmp_path))
    task = build_task(config)
    model = task.build_model(task.build_data(None, lambda message: None))
    prompt = "A Handwritten digit seven "  # the pipeline lower-cases and strips it
    ours = model.encode_text(*model.tokenize([prompt]))
    reference, _ = model.pipeline().encode_prompt(prompt, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    index = task.captions.index("a handwritten digit seven")
    torch.testing.assert_close(model.caption_embeddings[index], reference[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# LoRA fine-tune of a tiny Stable Diffusion pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    tokenizer = char_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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
        cross_attention_dim=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Twelve 40x36 pictures of two kinds, with captions in metadata.jsonl."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        kind = ("red square", "blue stripes")[i % 2]
        pixels = rng.integers(0, 60, (36, 40, 3), dtype=np.uint8)
        if i % 2 == 0:
            pixels[8:28, 10:30, 0] = 230
        else:
            pixels[:, ::6, 2] = 230
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {kind}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def lora_config(tmp_path: Path, name: str, sd: Path, images: Path) -> dict:
    return tiny_raw_config(
        tmp_path,
        run_name=name,
        task="image-generation",
        model={"init_from": str(sd), "lora": {"enabled": True, "r": 4, "alpha": 4}},
        data={"source": "imagefolder", "paths": [str(images)], "val_fraction": 0.25},
        diffusion_training={
            "resolution": 32,
            "caption_dropout": 0.2,
            "prediction_type": "v_prediction",
            "snr_gamma": 5.0,
            "noise_offset": 0.05,
        },
        training={"max_steps": 10, "batch_size": 4, "log_every": 1, "eval_every": 5},
        optim={"lr": 1e-3, "warmup_steps": 2},
        checkpoint={"save_every": 5, "keep_last": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
        hardware={"device": "cpu"},
    )


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step and path.name == "last":
            raise RuntimeError("simulated crash")


def test_lora_finetune_resumes_exactly_and_diffusers_loads_the_adapter(
    tmp_path: Path, tiny_sd: Path, image_folder: Path
) -> None:
    full_config = load(lora_config(tmp_path, "full", tiny_sd, image_folder))
    full = train(full_config)
    assert full.steps == 10
    # The reference is the uninterrupted run: a crash after step 5 and a resume give its curve.
    broken = load(lora_config(tmp_path, "broken", tiny_sd, image_folder))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(5)])
    resumed = train(broken, resume=True)
    assert resumed.steps == 10
    full_losses = {s: r["loss"] for s, r in records(full.run_dir, "train").items()}
    assert {s: r["loss"] for s, r in records(broken.run_dir, "train").items()} == full_losses
    assert resumed.final_val_loss == full.final_val_loss

    last = full.run_dir / "checkpoints" / "last"
    assert (last / LORA_WEIGHTS).is_file() and not (last / "unet").exists()
    # diffusers' own loader puts the adapter on the base pipeline; its UNet must compute what
    # the trained one does.
    task = build_task(full_config)
    task.build_data(None, lambda message: None)
    ours = task.load_model(last)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.load_lora_weights(last)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        expected = ours.unet(sample, timesteps, encoder_hidden_states=text).sample
        got = pipe.unet(sample, timesteps, encoder_hidden_states=text).sample
        base = (
            StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
            .unet(sample, timesteps, encoder_hidden_states=text)
            .sample
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, expected)  # the adapter did learn something
    # `truthgpt image RUN` of a LoRA run: the base of model.init_from with the adapter on it.
    through_run = load_pipeline(full.run_dir, torch.float32)
    with torch.no_grad():
        drawn = through_run.unet(sample, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(drawn, expected, rtol=1e-5, atol=1e-5)
    # `--lora RUN` on that base draws the same picture (it was "no file named
    # pytorch_lora_weights.bin found in directory RUN").
    from truthgpt.config import DiffusionConfig
    from truthgpt.diffusion import generate_images

    def draw(model: Path, loras: list[str]) -> np.ndarray:
        cfg = DiffusionConfig(
            model=str(model), loras=loras, prompt="a red square", steps=2, guidance=3.0,
            width=32, height=32, memory="none", dtype="fp32", seed=0,
            output_dir=str(tmp_path / f"images-{len(loras)}"),
        )  # fmt: skip
        return np.asarray(generate_images(cfg, log=lambda m: None, progress=False).images[0])

    assert np.array_equal(draw(tiny_sd, [f"{full.run_dir}:1"]), draw(full.run_dir, []))
    # `image RUN --lora OTHER` keeps the run's own adapter on beside OTHER (set_adapters turned
    # it off); `--lora RUN` on the run itself would apply it twice, and is refused.
    other = shutil.copytree(last, tmp_path / "style-lora")
    pipe = load_pipeline(full.run_dir, torch.float32)
    cfg = DiffusionConfig(
        model=str(full.run_dir), loras=[f"{other}:0.5"], prompt="a red square", steps=2,
        width=32, height=32, memory="none", dtype="fp32", output_dir=str(tmp_path / "both"),
    )  # fmt: skip
    generate_images(cfg, pipe=pipe, log=lambda m: None, progress=False)
    assert pipe.get_active_adapters() == ["default_0", "lora0_style_lora"]
    with pytest.raises(ConfigError, match=r"loras\[0\].*adapter of the run being drawn from"):
        draw(full.run_dir, [f"{full.run_dir}:0.5"])


def test_full_finetune_with_the_text_encoder_saves_a_stable_diffusion_pipeline(
    tmp_path: Path, tiny_sd: Path, image_folder: Path
) -> None:
    raw = lora_config(tmp_path, "full-ft", tiny_sd, image_folder)
    raw["model"]["lora"] = {"enabled": False}
    # Random flips: latents are encoded every step; a trained encoder: captions too.
    raw["diffusion_training"] |= {"train_text_encoder": True, "random_flip": True}
    raw["training"] |= {"max_steps": 3, "gradient_checkpointing": True}
    result = train(load(raw))
    pipe = load_pipeline(result.run_dir, torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what the UNet learned
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    for part in ("unet", "text_encoder", "vae"):
        trained = dict(getattr(pipe, part).state_dict())
        same = all(torch.equal(v, trained[k]) for k, v in getattr(base, part).state_dict().items())
        assert same == (part == "vae"), part  # the VAE is frozen, the others learned
    # A run that trained a whole pipeline is a model, not a --lora.
    from truthgpt.config import DiffusionConfig
    from truthgpt.diffusion import generate_images

    cfg = DiffusionConfig(
        model=str(tiny_sd), loras=[str(result.run_dir)], output_dir=str(tmp_path / "images")
    )
    with pytest.raises(TruthGPTError, match=r"loras\[0\]: .* holds no LoRA adapter"):
        generate_images(cfg, log=lambda m: None, progress=False)


# ---------------------------------------------------------------------------------------------
# The objective against diffusers' scheduler


def test_denoising_loss_targets_and_min_snr_weights() -> None:
    torch.manual_seed(0)
    latents, noise, prediction = torch.randn(3, 4, 2, 8, 8).unbind(0)
    timesteps = torch.tensor([5, 300, 900, 999])
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    plain = denoising_loss(prediction, latents, noise, timesteps, eps)
    torch.testing.assert_close(plain, F.mse_loss(prediction, noise))
    velocity = v.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(
        denoising_loss(prediction, latents, noise, timesteps, v), F.mse_loss(prediction, velocity)
    )
    # min-SNR-gamma: examples whose SNR is under gamma keep weight 1 (epsilon), the others
    # are scaled by gamma / SNR.
    ratio = snr(eps, timesteps)
    alphas = eps.alphas_cumprod[timesteps]
    torch.testing.assert_close(ratio, alphas / (1 - alphas))
    gamma = 5.0
    per_example = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    weights = torch.where(ratio > gamma, gamma / ratio, torch.ones_like(ratio))
    weighted = denoising_loss(prediction, latents, noise, timesteps, eps, snr_gamma=gamma)
    torch.testing.assert_close(weighted, (per_example * weights).mean())


# ---------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data": {"source": "python-stdlib"}}, ["data.source", "digits, imagefolder"]),
        ({"diffusion_training": {"space": "latent"}}, ["diffusion_training.space", "pixel"]),
        ({"diffusion_training": {"space": "latnt"}}, ["diffusion_training.space", "latent"]),
        ({"diffusion_training": {"sampler": "dim"}}, ["diffusion_training.sampler", "'ddim'"]),
        ({"diffusion_training": {"caption_drop": 0.1}}, ["caption_dropout"]),
        ({"diffusion_training": {"caption_dropout": 1.5}}, ["diffusion_training.caption_dropout"]),
        (
            {"diffusion_training": {"prediction_type": "x0"}},
            ["diffusion_training.prediction_type", "epsilon, v_prediction"],
        ),
        ({"model": {"lora": {"enabled": True}}}, ["model.lora.enabled", "model.init_from"]),
        ({"data": {"source": "digitz"}}, ["data.source", "did you mean 'digits'"]),
        ({"checkpoint": {"select_best_by": "val_ppl"}}, ["checkpoint.select_best_by", "val_loss"]),
        # The free-form dicts are checked against the classes they feed, at load.
        (
            {"diffusion_training": {"unet": {"block_out_chanels": [16, 32]}}},
            ["diffusion_training.unet.block_out_chanels", "'diffusion_training.unet.block_out_"],
        ),
        (
            {"diffusion_training": {"noise_schedule": {"beta_schedul": "linear"}}},
            ["Did you mean 'diffusion_training.noise_schedule.beta_schedule'", "beta_start"],
        ),
        # CLIPTextConfig itself keeps any keyword: the misspelt width would train silently.
        (
            {"diffusion_training": {"text_encoder": {"hidden_sise": 64}}},
            ["Did you mean 'diffusion_training.text_encoder.hidden_size'", "num_hidden_layers"],
        ),
        (
            {"diffusion_training": {"noise_schedule": {"prediction_type": "epsilon"}}},
            ["noise_schedule.prediction_type: set by diffusion_training.prediction_type"],
        ),
        # 0 steps trained on to the first batch, then failed in torch.randint with a traceback.
        (
            {"diffusion_training": {"noise_schedule": {"num_train_timesteps": 0}}},
            ["diffusion_training.noise_schedule.num_train_timesteps: 0 ", "at least 1"],
        ),
        (
            {"diffusion_training": {"unet": {"block_out_channels": [32]}}},
            ["diffusion_training.unet.block_out_channels", "unet.down_block_types"],
        ),
    ],
)
def test_bad_diffusion_training_config_names_the_key(
    tmp_path: Path, changes: dict, expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(digits_raw_config(tmp_path, **changes))
    for text in expected:
        assert text in str(info.value)


def test_a_run_that_fails_at_data_preparation_leaves_no_run_folder(tmp_path: Path) -> None:
    empty = tmp_path / "no-images"
    empty.mkdir()
    data = {"source": "imagefolder", "paths": [str(empty)]}
    config = load(digits_raw_config(tmp_path, data=data))
    with pytest.raises(TruthGPTError):
        train(config)
    assert not config.run_dir.exists()
    # ... while a run folder that held a run before is left as it was.
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "notes.txt").write_text("mine")
    with pytest.raises(TruthGPTError):
        train(config)
    assert (config.run_dir / "notes.txt").read_text() == "mine"


def test_uncaptioned_images_train_and_draw_unconditional_samples(tmp_path: Path) -> None:
    # Every caption empty (an unconditional set): the sample grid had no prompt to draw and
    # the run died of a ZeroDivisionError at its first samples, before saving last/.
    folder = tmp_path / "plain"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rows = [json.dumps({"file_name": f"{i}.png", "text": ""}) for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    unet = digits_raw_config(tmp_path)["diffusion_training"]["unet"]
    raw = digits_raw_config(
        tmp_path,
        data={"source": "imagefolder", "paths": [str(folder)], "val_fraction": 0.0},
        diffusion_training={
            "resolution": 8,
            "unet": {**unet, "in_channels": 3, "block_out_channels": [8, 16], "norm_num_groups": 4},
            "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2},
            "samples": {"every": 2, "prompts": [], "steps": 1},
        },
        training={"max_steps": 2, "batch_size": 2, "log_every": 1},
        checkpoint={"save_every": 2},
        logging={"tensorboard": False},
    )
    result = train(load(raw))
    assert (result.run_dir / "checkpoints" / "last").is_dir()
    with Image.open(result.run_dir / "samples" / "step_000002.png") as grid:
        cells = np.asarray(grid.convert("RGB")).reshape(3, 8, 3, 8, 3).swapaxes(1, 2)
    # Eight unconditional images (seeds 0..7), each its own: the ninth cell stays black.
    drawn = cells.reshape(9, -1)[:8]
    assert len({cell.tobytes() for cell in drawn}) == 8
    assert not cells[2, 2].any()


def test_a_run_folder_inside_the_image_folder_is_refused_leaving_nothing(
    tmp_path: Path, image_folder: Path
) -> None:
    # The refusal said "nothing was written" after the run folder's lock had created
    # output_dir (an empty runs/) inside the user's picture folder.
    data = {"source": "imagefolder", "paths": [str(image_folder)]}
    raw = digits_raw_config(tmp_path, data=data) | {"output_dir": str(image_folder / "runs")}
    before = sorted(image_folder.iterdir())
    with pytest.raises(TruthGPTError, match="nothing was written"):
        train(load(raw))
    assert sorted(image_folder.iterdir()) == before


def test_gradient_checkpointing_of_the_text_encoder_is_on_without_a_deprecation(
    tmp_path: Path,
) -> None:
    # transformers 5 warned on every such run: "`gradient_checkpointing_enable` is deprecated
    # and will be removed in v6".
    import warnings

    from truthgpt.training.diffusion_model import build_from_scratch, prepare_for_training

    raw = digits_raw_config(
        tmp_path,
        training={"gradient_checkpointing": True},
        diffusion_training={"train_text_encoder": True},
    )
    config = load(raw)
    model = build_from_scratch(config, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prepare_for_training(model, config)
    for part in (model.text_encoder, model.unet):
        assert any(getattr(module, "gradient_checkpointing", False) for module in part.modules())


def test_sample_grid_leaves_empty_cells_black() -> None:
    from truthgpt.training.diffusion_task import image_grid

    grey = Image.new("L", (4, 4), 128)
    grid = np.asarray(image_grid([grey] * 3))  # 2x2: one cell empty
    assert grid.shape == (8, 8, 3)
    assert (grid[4:, 4:] == 0).all() and (grid[:4, :4] == 128).all()


def test_an_image_source_for_a_text_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.source: 'digits' is an image source"):
        load(tiny_raw_config(tmp_path, data={"source": "digits"}))


def test_a_bad_unet_config_is_a_config_error(tmp_path: Path) -> None:
    # Keys diffusers knows, values it refuses: still a config error naming the dict.
    unet = {**digits_raw_config(tmp_path)["diffusion_training"]["unet"], "act_fn": "no_such_act"}
    config = load(digits_raw_config(tmp_path, diffusion_training={"unet": unet}))
    with pytest.raises(ConfigError, match="diffusion_training.unet"):
        build_task(config).build_data(None, lambda message: None)
    # transformers' config checks raise huggingface_hub's StrictDataclassError (no ValueError):
    # it was a traceback.
    text = {"hidden_size": 30, "num_attention_heads": 4}
    config = load(digits_raw_config(tmp_path, diffusion_training={"text_encoder": text}))
    with pytest.raises(ConfigError, match=r"^diffusion_training.text_encoder: The hidden size"):
        build_task(config).build_data(None, lambda message: None)


def test_every_key_the_from_scratch_builder_takes_passes_validation(tmp_path: Path) -> None:
    # The allowed keys come from the classes: the defaults and every field of the tiny config
    # are among them, and the model builds from what validated.
    from truthgpt.config import DEFAULT_NOISE_SCHEDULE, DEFAULT_TEXT_ENCODER, DEFAULT_UNET

    config = load(
        digits_raw_config(
            tmp_path,
            diffusion_training={
                "unet": {**DEFAULT_UNET, "in_channels": 1},
                "text_encoder": {**DEFAULT_TEXT_ENCODER, "hidden_act": "gelu"},
                "noise_schedule": {**DEFAULT_NOISE_SCHEDULE, "beta_end": 0.02},
            },
        )
    )
    from truthgpt.training.diffusion_model import build_from_scratch

    model = build_from_scratch(config, 16)
    assert model.text_encoder.config.hidden_act == "gelu"
    assert model.noise_scheduler.config.beta_end == 0.02


def test_adamw8bit_without_a_gpu_is_a_clear_config_error(tmp_path: Path) -> None:
    config = load(digits_raw_config(tmp_path, optim={"name": "adamw8bit"}))
    with pytest.raises(ConfigError, match="optim.name: 'adamw8bit' runs on a CUDA GPU only"):
        train(config)
    # Refused before the first step: no half-started run folder is left to --overwrite.
    assert not config.run_dir.exists()


def test_a_misspelt_unet_lora_target_beside_a_good_one_is_an_error(tiny_sd: Path) -> None:
    # peft refuses only a list that matches nothing: [to_q, to_vv] adapted to_q alone.
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    lora = LoraConfig(enabled=True, r=4, target_modules=["to_q", "to_vv"])
    with pytest.raises(ConfigError, match="'to_vv' names no module.*did you mean 'to_v'"):
        add_lora(unet, lora)
    add_lora(unet, LoraConfig(enabled=True, r=4, target_modules=["to_q", "to_v"]))
    assert any(p.requires_grad for p in unet.parameters())

"""`training.residual_dtype`: the native decoder's residual stream in bf16 (as llm.c and
torchtitan's FSDP) or fp32 (autocast's, as nanoGPT). The blocks see the chosen dtype, the loss
and gradients stay close to the fp32 stream's, a bf16 run trains as the fp32-stream run does,
and settings that cannot work are ConfigErrors that name the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_raw_config

from truthgpt import train
from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.training.tasks import apply_residual_dtype, build_model


def block_input_dtypes(model: Decoder, ids: torch.Tensor) -> tuple[set[torch.dtype], torch.Tensor]:
    """The dtypes the blocks receive, and the loss, of one bf16 autocast forward + backward."""
    seen: set[torch.dtype] = set()
    hooks = [
        block.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype))
        for block in model.layers
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return seen, loss.detach()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_blocks_see_the_chosen_dtype_and_the_loss_stays_close(family: str) -> None:
    torch.manual_seed(0)
    config = DecoderConfig(
        family=family, vocab_size=97, hidden_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2 if family == "llama" else None, intermediate_size=128,
        max_position_embeddings=64,
    )  # fmt: skip
    plain = Decoder(config)
    narrow = copy.deepcopy(plain)
    narrow.residual_dtype = torch.bfloat16
    ids = torch.randint(0, 97, (4, 33))

    wide_dtypes, wide_loss = block_input_dtypes(plain, ids)
    narrow_dtypes, narrow_loss = block_input_dtypes(narrow, ids)
    assert wide_dtypes == {torch.float32}  # autocast leaves the fp32 embeddings' stream fp32
    assert narrow_dtypes == {torch.bfloat16}
    torch.testing.assert_close(narrow_loss, wide_loss, rtol=2e-2, atol=0)
    for (name, a), b in zip(plain.named_parameters(), narrow.parameters(), strict=True):
        assert a.grad.dtype == b.grad.dtype == torch.float32, name  # weights' grads stay fp32
        cosine = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_fp32_holds_the_stream_in_fp32_even_when_the_embeddings_are_bf16() -> None:
    """What FSDP's bf16 gathered weights give (`fsdp_param_dtype: auto`): `fp32` widens it."""
    torch.manual_seed(0)
    config = DecoderConfig(
        family="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = Decoder(config).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 17))
    assert block_input_dtypes(model, ids)[0] == {torch.bfloat16}
    model.residual_dtype = torch.float32
    assert block_input_dtypes(model, ids)[0] == {torch.float32}


def test_a_bf16_stream_run_trains_as_the_fp32_stream_run(tmp_path: Path) -> None:
    results = {}
    for setting in ("fp32", "bf16"):
        raw = tiny_raw_config(
            tmp_path / setting,
            training={"max_steps": 30, "precision": "bf16", "residual_dtype": setting},
            logging={"progress": "none", "tensorboard": False, "plot": False},
        )
        results[setting] = train(load(raw))
    wide, narrow = results["fp32"], results["bf16"]
    assert wide.initial_val_loss == pytest.approx(narrow.initial_val_loss, rel=1e-2)
    assert narrow.final_val_loss < narrow.initial_val_loss - 1.0  # it learns
    assert narrow.final_val_loss == pytest.approx(wide.final_val_loss, rel=3e-2)

    # Evaluated where it computes in fp32 (a bf16 GPU run's `precision: auto` on a CPU): the
    # stream follows the weights there, not a refusal.
    from truthgpt.training.evaluate import evaluate_run

    run = narrow.run_dir
    fp32 = evaluate_run(run, max_batches=4, device="cpu", overrides=["training.precision=auto"])
    bf16 = evaluate_run(run, max_batches=4, device="cpu")
    assert fp32["loss"] == pytest.approx(bf16["loss"], rel=2e-2)


def test_settings_that_cannot_work_are_config_errors() -> None:
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "max_position_embeddings": 256}
    cpu = {"device": "cpu"}

    def config(precision: str, setting: str = "bf16"):
        training = {"residual_dtype": setting, "precision": precision}
        return load({"model": tiny, "training": training, "hardware": cpu})

    assert build_model(config("bf16"), vocab_size=64).residual_dtype == torch.bfloat16
    assert build_model(config("bf16", "fp32"), vocab_size=64).residual_dtype == torch.float32
    assert build_model(config("bf16", "auto"), vocab_size=64).residual_dtype is None
    # auto computes in fp32 on a CPU; fp16's range would overflow the stream.
    for precision, computes in (("fp32", "float32"), ("auto", "float32"), ("fp16", "float16")):
        with pytest.raises(
            ConfigError, match=f"residual_dtype: 'bf16' needs a bf16 run.*{computes}"
        ):
            build_model(config(precision), vocab_size=64)

    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    with pytest.raises(ConfigError, match=r"residual_dtype.*native decoder.*allowed here: auto"):
        apply_residual_dtype(hf_model, config("bf16"))
    apply_residual_dtype(hf_model, config("bf16", "auto"))  # auto: nothing to set, no error
    with pytest.raises(ConfigError, match=r"training.residual_dtype.*'bf16'"):
        load({"training": {"residual_dtype": "bf61"}})
    image_task = {"task": "image-generation", "data": {"source": "digits"}}
    with pytest.raises(ConfigError, match=r"residual_dtype: 'fp32'.*diffusion model"):
        load({**image_task, "training": {"residual_dtype": "fp32"}})


def test_train_refuses_a_bf16_stream_in_an_fp32_run_before_building_anything(
    tmp_path: Path,
) -> None:
    """`validate` checks the config, not the machine: `train` says it before a tokenizer is
    trained or a corpus encoded, and leaves no run folder."""
    raw = tiny_raw_config(tmp_path, training={"precision": "fp32", "residual_dtype": "bf16"})
    config = load(raw)
    with pytest.raises(ConfigError, match="residual_dtype: 'bf16' needs a bf16 run"):
        train(config)
    assert not config.run_dir.exists()

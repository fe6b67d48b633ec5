"""Packed documents on FlexAttention (`training.packed_attention`) against the dense SDPA mask
and against each document run alone.

torch has no CPU backward for FlexAttention: on CPU the logits are checked (eager flex, forward
only); gradients and training runs are checked on the GPU (pytest -m gpu).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from truthgpt.config import load
from truthgpt.errors import ConfigError
from truthgpt.models import Decoder, DecoderConfig
from truthgpt.models.flex_attention import BlockMask, check_flex_training, flex_available, use_flex
from truthgpt.training.tasks import prepare_model_for_training

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
CUDA = torch.cuda.is_available()
# Eager flex_attention (CPU) warns that it is not the fused kernel: true, and what we test here.
eager_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny(family: str, **fields) -> Decoder:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    if family == "llama":
        shape["num_kv_heads"] = 2  # grouped-query attention
    shape.update(fields)  # e.g. a wider model for the GPU test
    return Decoder(DecoderConfig(family=family, max_position_embeddings=512, **shape))


def packed_rows(lengths: list[list[int]], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens [B, T] and document ids numbering each row's documents of `lengths`."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = sum(lengths[0])
    input_ids = torch.randint(0, VOCAB, (len(lengths), seq_len), generator=generator)
    document_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    )
    return input_ids, document_ids


# Rows of uneven documents; T = 150 is no multiple of the 128-token tile, and documents cross
# the tile boundary.
LENGTHS = [[37, 50, 13, 41, 9], [120, 1, 29], [150]]


@eager_flex
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_flex_gives_the_logits_of_the_dense_mask_and_of_each_document_alone(family: str) -> None:
    model = tiny(family).eval()
    input_ids, document_ids = packed_rows(LENGTHS)
    with torch.no_grad():
        dense = model(input_ids, input_ids, document_ids=document_ids)
        model.packed_attention = "flex"
        flex = model(input_ids, input_ids, document_ids=document_ids)
        model.packed_attention = "dense"
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for length in lengths:
                alone = model(input_ids[row : row + 1, start : start + length]).logits
                got = flex.logits[row : row + 1, start : start + length]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
                start += length
    torch.testing.assert_close(flex.logits, dense.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex.loss, dense.loss)


@eager_flex
def test_one_block_mask_serves_every_layer_and_padding_masks_stay_dense() -> None:
    model = tiny("llama").eval()
    model.packed_attention = "flex"
    input_ids, document_ids = packed_rows([[60, 40], [100]])
    positions, mask = model._positions_and_mask(input_ids, 0, False, document_ids, None)
    assert isinstance(mask, BlockMask)
    assert positions[0, 59].item() == 59 and positions[0, 60].item() == 0  # restart per document
    # A left-padding mask beside the documents: the dense path, which handles both.
    keep = torch.ones_like(input_ids)
    _, mask = model._positions_and_mask(input_ids, 0, False, document_ids, keep)
    assert isinstance(mask, torch.Tensor)


@eager_flex
@pytest.mark.slow
def test_a_compiled_model_takes_the_block_mask_from_outside_its_graph() -> None:
    # Inductor cannot lower flex_attention whose mask reads a tensor computed in the same graph
    # (torch 2.13): the mask is built outside, and new documents need no recompilation.
    from torch._dynamo.utils import counters

    model = tiny("llama").eval()
    compiled = torch.compile(model)
    graphs = None
    for seed, lengths in enumerate([[[37, 50, 13], [70, 30]], [[10, 90], [99, 1]]]):
        input_ids, document_ids = packed_rows(lengths, seed=seed)
        with torch.no_grad():
            model.packed_attention = "dense"
            dense = model(input_ids, document_ids=document_ids).logits
            model.packed_attention = "flex"
            flex = compiled(input_ids, document_ids=document_ids).logits
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
        graphs = graphs or counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_auto_is_dense_on_cpu_and_flex_only_where_it_can_train() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_flex("auto", cpu, dropout=0.0, head_dim=64)
    assert not use_flex("dense", cuda, dropout=0.0, head_dim=64)
    assert not use_flex("auto", cuda, dropout=0.1, head_dim=64)  # flex_attention has no dropout
    assert not use_flex("auto", cuda, dropout=0.0, head_dim=8)  # under tl.dot's 16
    assert use_flex("auto", cuda, dropout=0.0, head_dim=16) == flex_available(cuda)
    assert use_flex("flex", cpu, dropout=0.0, head_dim=8)  # asked for: forward works on CPU
    model = tiny("gpt2").eval()
    config = load({"training": {"packed_attention": "auto"}})
    assert prepare_model_for_training(model, config).packed_attention == "auto"
    input_ids, document_ids = packed_rows([[30, 20]])
    _, mask = model._positions_and_mask(input_ids, 0, False, document_ids, None)
    assert isinstance(mask, torch.Tensor)  # auto on CPU: the dense mask


# ---------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.skipif(not flex_available(torch.device("cuda")), reason="needs Triton")
def test_flex_training_refuses_heads_narrower_than_its_kernel() -> None:
    # Inductor's flex kernel refuses heads under 16 only when it compiles, mid-run: say so first.
    with pytest.raises(ConfigError) as info:
        check_flex_training(torch.device("cuda"), head_dim=8)
    message = str(info.value)
    assert "training.packed_attention" in message and "at least 16" in message
    assert "are 8" in message and "auto" in message
    check_flex_training(torch.device("cuda"), head_dim=16)


def test_a_misspelt_setting_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load({"training": {"packed_attention": "flash"}})
    message = str(info.value)
    assert "training.packed_attention" in message and "'flash'" in message
    for allowed in ("auto", "dense", "flex"):
        assert message.count(allowed) == 1  # listed once (pydantic's own message lists them too)
    with pytest.raises(ConfigError) as info:
        load({"training": {"precision": "bf32"}})
    assert "did you mean 'fp32'?" in str(info.value) and str(info.value).count("bf16") == 1


def test_flex_with_dropout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="training.packed_attention: 'flex'.*model.dropout"):
        load({"model": {"dropout": 0.1}, "training": {"packed_attention": "flex"}})
    load({"model": {"dropout": 0.1}, "training": {"packed_attention": "auto"}})  # auto: dense


def test_flex_refuses_transformers_models() -> None:
    import transformers

    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    )
    config = load({"training": {"packed_attention": "flex"}})
    with pytest.raises(ConfigError, match="training.packed_attention: 'flex' needs the native"):
        prepare_model_for_training(hf_model, config)
    auto = load({"training": {"packed_attention": "auto"}})
    assert prepare_model_for_training(hf_model, auto) is hf_model  # auto: transformers' own


@pytest.mark.skipif(CUDA, reason="the CPU refusal")
def test_flex_training_on_cpu_is_a_config_error(tmp_path: Path) -> None:
    from test_sft import arithmetic_rows, write_jsonl

    from truthgpt.training.run import train

    raw = packed_sft_config(tmp_path, write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(40)))
    raw["training"]["packed_attention"] = "flex"
    with pytest.raises(ConfigError, match="training.packed_attention: 'flex' trains on CUDA"):
        train(load(raw))


def packed_sft_config(tmp_path: Path, rows: Path, model: dict | None = None, **training) -> dict:
    return tiny_raw_config(
        tmp_path,
        task="sft",
        data={
            "source": "jsonl",
            "paths": [str(rows)],
            "max_documents": None,
            "max_seq_len": 200,  # no multiple of 128
            "val_fraction": 0.1,
            "batching": "pack",
            "tokenizer": {"vocab_size": 300},
        },
        model={"max_position_embeddings": 256, **(model or {})},
        training={"max_steps": 8, "batch_size": 4, "eval_every": 100, "log_every": 1, **training},
        checkpoint={"save_every": 100},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )


# ---------------------------------------------------------------------------------------------
# The benchmark


@pytest.mark.skipif(CUDA, reason="the CPU smoke run")
def test_benchmark_runs_tiny_on_cpu(tmp_path: Path) -> None:
    # Keeps benchmarks/packed_attention.py in step with the decoder (a smoke run, no timing; on
    # CPU without the flex runners, as FlexAttention has no CPU backward).
    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "packed_attention.py"
    args = ["--tiny", "--shape", "llama", "--steps", "2", "--warmup", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["runner"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["dense", "hf-sdpa"]
    # transformers turns the packed position_ids into the same document mask: the same loss.
    assert abs(rows["dense"]["loss"] - rows["hf-sdpa"]["loss"]) < 1e-4


# ---------------------------------------------------------------------------------------------
# GPU: gradients and training runs


def random_lengths(seq_len: int, mean: int, generator: torch.Generator) -> list[int]:
    """Document lengths of one packed row: uniform in 1..2*mean, the last one cut to fit."""
    lengths: list[int] = []
    while sum(lengths) < seq_len:
        length = int(torch.randint(1, 2 * mean, (1,), generator=generator))
        lengths.append(min(length, seq_len - sum(lengths)))
    return lengths


def grads_of(model: Decoder, input_ids: torch.Tensor, document_ids: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids, input_ids, document_ids=document_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_flex_gives_the_dense_loss_and_gradients(family: str) -> None:
    model = tiny(family, hidden_size=128).cuda().train()
    generator = torch.Generator().manual_seed(0)
    input_ids, document_ids = packed_rows([random_lengths(500, 60, generator) for _ in range(4)])
    input_ids, document_ids = input_ids.cuda(), document_ids.cuda()
    dense_loss, dense_grads = grads_of(model, input_ids, document_ids)
    model.packed_attention = "flex"
    flex_loss, flex_grads = grads_of(model, input_ids, document_ids)
    assert abs(flex_loss.item() - dense_loss.item()) < 1e-2 * dense_loss.item()
    for name, dense in dense_grads.items():
        rel = ((flex_grads[name] - dense).norm() / dense.norm()).item()
        assert rel < 3e-2, (name, rel)  # bf16 attention on both sides


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_packed_sft_trains_alike_on_flex_and_dense(tmp_path: Path) -> None:
    from test_resume import step_losses
    from test_sft import arithmetic_rows, write_jsonl

    from truthgpt.training.run import train

    rows = write_jsonl(tmp_path / "arithmetic.jsonl", arithmetic_rows(200))
    runs = {
        "dense": {"packed_attention": "dense"},
        "flex": {"packed_attention": "flex"},
        "flex-compiled": {"packed_attention": "flex", "compile": True},
    }
    losses = {}
    for name, training in runs.items():
        # Heads of 16 (64 / 4), the narrowest FlexAttention's CUDA kernel takes.
        wide = {"hidden_size": 64, "intermediate_size": 128}
        raw = packed_sft_config(tmp_path / name, rows, wide, precision="bf16", **training)
        raw["hardware"] = {"device": "cuda"}
        losses[name] = step_losses(train(load(raw)).run_dir)
    assert len(losses["dense"]) == 8
    for name in ("flex", "flex-compiled"):
        assert sorted(losses[name]) == sorted(losses["dense"])
        for step, dense in losses["dense"].items():
            assert abs(losses[name][step] - dense) < 2e-2 * dense, (name, step)

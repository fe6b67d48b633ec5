"""GPU checks (pytest -m gpu, on the GPU machine): parity in bf16, a compiled bf16 training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from truthgpt.config import load
from truthgpt.models.hf_io import load_hf
from truthgpt.training.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    "hf_config",
    [
        LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        GPT2Config(vocab_size=512, n_embd=256, n_layer=2, n_head=8, n_positions=256),
    ],
    ids=["llama", "gpt2"],
)
def test_cuda_logits_match_transformers(tmp_path: Path, hf_config) -> None:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 200), device="cuda")
    hf = hf.cuda().eval()
    ours = load_hf(tmp_path, device="cuda").eval()
    with torch.no_grad():
        fp32_diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = hf(ids).logits.float()
            got = ours(ids).logits.float()
    assert fp32_diff < 1e-3  # TF32 matmuls may be on
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


def test_compiled_bf16_training_lowers_the_loss(tmp_path: Path) -> None:
    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 40, "precision": "bf16", "compile": True, "eval_every": 40},
        hardware={"device": "cuda"},
    )
    result = train(load(raw))
    assert result.final_val_loss < result.initial_val_loss - 0.5


def test_compile_scopes_train_the_same_steps(tmp_path: Path) -> None:
    """Eager, whole-model and per-block compile, CUDA graphs: the same per-step losses (fp32,
    TF32 off, so only the compiler's reordering of float sums tells them apart)."""
    from test_resume import step_losses

    losses = {}
    for name, extra in {
        "eager": {"compile": False},
        "model": {"compile": True, "compile_scope": "model"},
        "blocks": {"compile": True, "compile_scope": "blocks"},
        "graphs": {"compile": True, "compile_mode": "reduce-overhead"},
    }.items():
        training = {"max_steps": 12, "log_every": 1, "eval_every": 6, "tf32": False, **extra}
        training["grad_accum_steps"] = 2  # a replay per micro-batch, gradients added between
        raw = tiny_raw_config(tmp_path, run_name=name, training=training)
        raw["hardware"] = {"device": "cuda"}
        losses[name] = step_losses(train(load(raw)).run_dir)
    for name in ("model", "blocks", "graphs"):
        assert losses[name].keys() == losses["eager"].keys()
        for step, loss in losses["eager"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-4), (name, step)


def test_cuda_lora_bf16_run_resumes_exactly(tmp_path: Path) -> None:
    from test_resume import CrashAt, resume_config, step_losses

    extra = {
        "model": {"lora": {"enabled": True, "r": 4}},
        "training": {"precision": "bf16", "ema": {"enabled": True}},
        "hardware": {"device": "cuda"},
    }
    full = train(load(resume_config(tmp_path, "gpufull", **extra)))
    broken = load(resume_config(tmp_path, "gpubroken", **extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    train(broken, resume=True)
    got, expected = step_losses(broken.run_dir), step_losses(full.run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-3), step

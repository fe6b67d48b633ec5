"""Fused decode-layer kernels against the eager PyTorch code they replace, and the whole engine
on them against `transformers`: Triton interpreter on CPU (in tests/triton_interpreter.py's
subprocess), and compiled on CUDA (`pytest -m gpu`)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from truthgpt.models import paged_kernels
from truthgpt.models.decoder import (
    DecoderConfig,
    RMSNorm,
    apply_rope,
    rope_cos_sin_half,
    rope_inv_freq,
)
from truthgpt.models.fused_kernels import add_rms_norm, rope_store_kv, silu_mul

HAS_TRITON = paged_kernels.triton is not None


def _randn(*shape, seed: int, dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _assert_equal_or_close(got, want, dtype, what: str) -> None:
    # Half precision: the kernels round where eager rounds, so values agree to one rounding of
    # the output dtype; fp32 leaves room for fused multiply-adds and reduction order.
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=what)


def check_add_rms_norm(device: str, dtype: torch.dtype) -> None:
    for rows, hidden in [(1, 64), (5, 48), (3, 2048)]:
        norm = RMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(_randn(hidden, seed=1, dtype=dtype, device=device))
        x = _randn(rows, hidden, seed=2, dtype=dtype, device=device)
        residual = _randn(rows, hidden, seed=3, dtype=dtype, device=device)
        with torch.no_grad():
            got, stream = add_rms_norm(x, None, norm.weight, norm.eps)
            assert stream is x
            _assert_equal_or_close(got, norm(x), dtype, f"norm alone {rows}x{hidden}")
            got, stream = add_rms_norm(x, residual, norm.weight, norm.eps)
            want_stream = x + residual
            torch.testing.assert_close(stream, want_stream, atol=0, rtol=0)
            _assert_equal_or_close(got, norm(want_stream), dtype, f"add+norm {rows}x{hidden}")


def check_silu_mul(device: str, dtype: torch.dtype) -> None:
    for rows, width in [(1, 40), (4, 1500)]:
        fused = _randn(rows, 2 * width, seed=4, dtype=dtype, device=device)
        gate, up = fused[:, :width], fused[:, width:]  # strided halves of one projection
        want = F.silu(gate) * up
        _assert_equal_or_close(silu_mul(gate, up), want, dtype, f"silu_mul {rows}x{width}")
        separate = silu_mul(gate.contiguous(), up.contiguous())
        _assert_equal_or_close(separate, want, dtype, "silu_mul, separate inputs")


def check_rope_store_kv(device: str, dtype: torch.dtype) -> None:
    cases = [(4, 2, 16, 8), (8, 8, 64, 16), (2, 1, 8, 4)]  # Hq, Hkv, head_dim, block size
    for seed, (hq, hkv, dim, block_size) in enumerate(cases):
        cfg = DecoderConfig(
            family="llama",
            vocab_size=16,
            hidden_size=hq * dim,
            num_layers=1,
            num_heads=hq,
            num_kv_heads=hkv,
            intermediate_size=8,
            max_position_embeddings=4096,
        )
        tokens = 7
        positions = torch.tensor([0, 1, 5, 17, 300, 2047, 4000], device=device)
        qkv = _randn(tokens, (hq + 2 * hkv) * dim, seed=seed, dtype=dtype, device=device)
        num_blocks = 9
        k_cache = torch.zeros(num_blocks, block_size, hkv, dim, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.tensor([3, 9, -1, 20, 33, 7, 1], device=device)  # -1: a padding token
        q = rope_store_kv(qkv, rope_cos_sin_half(cfg, positions), k_cache, v_cache, slots, hq, hkv)

        # Eager: split, rotate with the full-width cos/sin (HF layout), store by slot.
        q_ref, k_ref, v_ref = qkv.split((hq * dim, hkv * dim, hkv * dim), dim=-1)
        freqs = positions.float()[:, None] * rope_inv_freq(cfg, positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        q_ref = apply_rope(q_ref.reshape(tokens, hq, dim), cos, sin)
        k_ref = apply_rope(k_ref.reshape(tokens, hkv, dim), cos, sin)
        v_ref = v_ref.reshape(tokens, hkv, dim)
        _assert_equal_or_close(q, q_ref, dtype, f"rope q, case {seed}")
        flat_k = k_cache.view(-1, hkv, dim)
        flat_v = v_cache.view(-1, hkv, dim)
        kept = slots >= 0
        _assert_equal_or_close(flat_k[slots[kept]], k_ref[kept], dtype, f"rope k, case {seed}")
        torch.testing.assert_close(flat_v[slots[kept]], v_ref[kept], atol=0, rtol=0)
        untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
        untouched[slots[kept]] = False
        assert not flat_k[untouched].any() and not flat_v[untouched].any(), "wrote a stray slot"


def check_engine_matches_transformers(device: str, dtype: torch.dtype) -> None:
    """The engine on the fused path (gate/up laid out as one tensor, as LLM does) gives the
    greedy tokens of transformers' generate, with prefill and decode kernels in play."""
    import tempfile
    from pathlib import Path

    from test_engine import NEW_TOKENS, _hf_greedy, _models, _prompts, _run

    from truthgpt.config import InferenceConfig
    from truthgpt.data.tokenizer import train_bpe_tokenizer
    from truthgpt.inference.engine import Engine
    from truthgpt.inference.sampling_params import SamplingParams

    source = Path(os.__file__).read_text()[:60_000]
    tokenizer = train_bpe_tokenizer([source], vocab_size=320, max_chars=60_000)
    for kind in ("llama", "qwen2"):
        with tempfile.TemporaryDirectory() as folder:
            reference, ours = _models(kind, tokenizer, Path(folder))
        reference, ours = reference.to(device), ours.to(device)
        ours.fuse_for_inference()
        assert ours.layers[0].mlp._fused("weight") is not None
        options = InferenceConfig(
            device=device,
            kernels="triton",
            block_size=8,
            num_blocks=48,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            cuda_graphs=device == "cuda",
            dtype="fp32",
        )
        engine = Engine(ours, tokenizer, options)
        assert engine.runner.use_kernels
        prompts = _prompts([5, 17, 40, 1, 33])
        prompts.append(prompts[2][:24] + [7, 8, 9])  # a prefix-cache hit
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        done = _run(engine, prompts, params)
        for index, prompt in enumerate(prompts):
            want = _hf_greedy(reference.to(device), prompt)
            assert done[str(index)][0] == want, f"{kind} prompt {index}"
        assert engine.blocks.stats.hit_tokens > 0


CHECKS = {
    "add_rms_norm": check_add_rms_norm,
    "silu_mul": check_silu_mul,
    "rope_store_kv": check_rope_store_kv,
    "engine": check_engine_matches_transformers,
}


INTERPRETER_CHECKS = list(CHECKS)


def run_in_interpreter(name: str) -> None:
    with torch.no_grad():
        CHECKS[name]("cpu", torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_kernels_in_triton_interpreter(triton_interpreter) -> None:
    passed, output = triton_interpreter[__name__]
    assert passed, output


needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available() and paged_kernels.triton_available("cuda")),
    reason="needs triton and a CUDA GPU of sm80 or newer",
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("check", ["add_rms_norm", "silu_mul", "rope_store_kv"])
def test_fused_kernels_on_cuda(check: str, dtype: torch.dtype) -> None:
    with torch.no_grad():
        CHECKS[check]("cuda", dtype)


@pytest.mark.gpu
@needs_gpu
def test_fused_engine_on_cuda_matches_transformers() -> None:
    check_engine_matches_transformers("cuda", torch.float32)

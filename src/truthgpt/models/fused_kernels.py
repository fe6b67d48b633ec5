"""Triton kernels that fuse the small elementwise steps of a Llama-family decode layer.

In eager PyTorch a decode layer launches ~40 kernels: RMSNorm alone is eight (cast, square,
mean, add, rsqrt, multiply, cast, weight), RoPE seven per tensor, SwiGLU two more. At batch 1
each runs for a few microseconds on a few kilobytes, so launches, not bytes, set the step time
(2.7 ms against a 0.74 ms weight-read floor for TinyLlama on an H100). These kernels make a
layer nine launches: add+norm, qkv GEMM, rope+store, attention, out GEMM, add+norm, gate_up
GEMM, silu*mul, down GEMM -- the fusion gpt-fast gets from torch.compile, without the compile.

Each kernel rounds where the eager code rounds (the residual sum, the normalized activations,
every bf16 product of RoPE, the SiLU before its multiply), so its output equals the eager
path's bit for bit up to the order of the norm's reduction, and greedy tokens stay those of
`transformers`.

Like `paged_kernels.py`: ``TRITON_INTERPRET=1`` set before triton is imported runs them on CPU
tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from truthgpt.models.paged_kernels import _check_last_dim_contiguous, _jit, tl, triton

# --- residual add + RMSNorm -------------------------------------------------------------------


@_jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_out,
    stride_rout,
    num_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The eager `x + residual` rounds the sum to the activation dtype; so does this.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_rout + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / num_cols
    normed = (x32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``s = x + residual`` (or x alone when residual is None), then ``RMSNorm(s) * weight``.

    x, residual: ``[N, hidden]``. Returns ``(normed, s)``: the block's input and the new residual
    stream, as the pre-norm block ``s + f(norm(s))`` needs them.
    """
    _check_last_dim_contiguous(x=x)
    num_rows, num_cols = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(num_cols)
    _add_rms_norm_kernel[(num_rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        residual_out.stride(0),
        num_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, residual_out


# --- SwiGLU activation --------------------------------------------------------------------------


@_jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, width, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0)
    # F.silu rounds to the activation dtype before the multiply by `up`.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, act * up.to(tl.float32), mask=mask)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for gate, up ``[N, width]`` (rows may be strided: the two halves of
    one fused projection)."""
    _check_last_dim_contiguous(gate=gate, up=up)
    num_rows, width = gate.shape
    out = gate.new_empty(num_rows, width)
    if num_rows == 0:
        return out
    block = min(triton.next_power_of_2(width), 1024)
    _silu_mul_kernel[(num_rows, triton.cdiv(width, block))](
        gate,
        up,
        out,
        gate.stride(0),
        up.stride(0),
        out.stride(0),
        width,
        BLOCK=block,
        num_warps=4,
    )
    return out


# --- RoPE on q and k, k and v into the paged cache ----------------------------------------------


@_jit
def _rope_half(x1, x2, cos, sin, DTYPE: tl.constexpr):
    # HF's x * cos + rotate_half(x) * sin with cos/sin cast to the activation dtype, each product
    # and the sum rounded as the eager bf16 ops round them. rotate_half(x) = [-x2, x1].
    cos = cos.to(DTYPE).to(tl.float32)
    sin = sin.to(DTYPE).to(tl.float32)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    a1 = (x1 * cos).to(DTYPE).to(tl.float32)
    b1 = (-x2 * sin).to(DTYPE).to(tl.float32)
    a2 = (x2 * cos).to(DTYPE).to(tl.float32)
    b2 = (x1 * sin).to(DTYPE).to(tl.float32)
    return (a1 + b1).to(DTYPE), (a2 + b2).to(DTYPE)


@_jit
def _rope_store_kernel(
    qkv_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_qkv,
    stride_cs_kind,
    stride_cs_token,
    stride_qo_token,
    stride_qo_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    halves = tl.arange(0, BLOCK_HALF)
    half_mask = halves < HALF
    cos = tl.load(cos_sin_ptr + token * stride_cs_token + halves, mask=half_mask, other=0.0)
    sin = tl.load(
        cos_sin_ptr + stride_cs_kind + token * stride_cs_token + halves, mask=half_mask, other=0.0
    )
    row = qkv_ptr + token * stride_qkv  # [q heads | k heads | v heads], head_dim each

    q_heads = tl.arange(0, BLOCK_HQ)
    q_mask = (q_heads[:, None] < NUM_Q_HEADS) & half_mask[None, :]
    q_at = row + q_heads[:, None] * HEAD_DIM + halves[None, :]
    q1 = tl.load(q_at, mask=q_mask, other=0.0)
    q2 = tl.load(q_at + HALF, mask=q_mask, other=0.0)
    q1, q2 = _rope_half(q1, q2, cos[None, :], sin[None, :], dtype)
    q_dst = q_out_ptr + token * stride_qo_token + q_heads[:, None] * stride_qo_head
    tl.store(q_dst + halves[None, :], q1, mask=q_mask)
    tl.store(q_dst + HALF + halves[None, :], q2, mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:  # a padded token the scheduler gave no slot writes nothing
        block = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        kv_heads = tl.arange(0, BLOCK_HKV)
        kv_mask = (kv_heads[:, None] < NUM_KV_HEADS) & half_mask[None, :]
        k_at = row + (NUM_Q_HEADS + kv_heads[:, None]) * HEAD_DIM + halves[None, :]
        v_at = k_at + NUM_KV_HEADS * HEAD_DIM
        k1 = tl.load(k_at, mask=kv_mask, other=0.0)
        k2 = tl.load(k_at + HALF, mask=kv_mask, other=0.0)
        k1, k2 = _rope_half(k1, k2, cos[None, :], sin[None, :], dtype)
        cache_dtype = k_cache_ptr.dtype.element_ty
        k_dst = (
            k_cache_ptr
            + block * stride_kc_block
            + offset * stride_kc_slot
            + kv_heads[:, None] * stride_kc_head
            + halves[None, :]
        )
        tl.store(k_dst, k1.to(cache_dtype), mask=kv_mask)
        tl.store(k_dst + HALF, k2.to(cache_dtype), mask=kv_mask)
        v_dst = (
            v_cache_ptr
            + block * stride_vc_block
            + offset * stride_vc_slot
            + kv_heads[:, None] * stride_vc_head
            + halves[None, :]
        )
        tl.store(v_dst, tl.load(v_at, mask=kv_mask, other=0.0).to(cache_dtype), mask=kv_mask)
        tl.store(
            v_dst + HALF,
            tl.load(v_at + HALF, mask=kv_mask, other=0.0).to(cache_dtype),
            mask=kv_mask,
        )


def rope_store_kv(
    qkv: Tensor,
    cos_sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
) -> Tensor:
    """Split the fused projection ``qkv [N, (Hq + 2 Hkv) * D]``, rotate q and k by RoPE, write
    k and v to their cache slots (negative slot: skipped) and return the rotated q ``[N, Hq, D]``.

    cos_sin: ``[2, N, D // 2]`` fp32, the cos and sin of each token's angles (one half: HF's
    layout repeats them for the second half of head_dim).
    """
    _check_last_dim_contiguous(qkv=qkv, k_cache=k_cache, v_cache=v_cache)
    num_tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(
            f"qkv has {qkv.shape[1]} columns, expected (num_q_heads {num_q_heads} + 2 * "
            f"num_kv_heads {num_kv_heads}) * head_dim {head_dim} with an even head_dim"
        )
    q = qkv.new_empty(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    _rope_store_kernel[(num_tokens,)](
        qkv,
        cos_sin,
        q,
        k_cache,
        v_cache,
        slot_mapping,
        qkv.stride(0),
        cos_sin.stride(0),
        cos_sin.stride(1),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        PAGE_SIZE=k_cache.shape[1],
        num_warps=4,
    )
    return q

"""Triton kernels over the paged KV cache: store new K/V, decode attention, varlen prefill.

Cache layout (per layer): ``k_cache`` and ``v_cache`` are ``[num_blocks, block_size,
num_kv_heads, head_dim]``; token slot ``s`` lives in block ``s // block_size`` at offset
``s % block_size`` (PagedAttention, Kwon et al. 2023). Query head ``h`` reads kv head
``h // (num_q_heads // num_kv_heads)`` (GQA, Ainslie et al. 2023).

Triton is optional: callers ask ``triton_available(device)`` and fall back to PyTorch when it
says no. ``TRITON_INTERPRET=1`` (set before triton is imported) runs the same kernels on CPU
tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are then plain functions that nothing calls
    triton = None
    tl = None

# triton.jit decides between compiling and interpreting when a kernel is defined, so the
# interpreter is on for this module exactly when the variable was set before its import.
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)

_LOG2_E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2 e), as FlashAttention-2

# Keys per inner-loop tile. Gathering tokens through the block table one by one (rather than
# one page per step) lets the tile be larger than a 16-token page, so tl.dot gets a useful N.
_DECODE_BLOCK_N = 64
_PREFILL_BLOCK_M = 64
_PREFILL_BLOCK_N = 64
# Upper bound on decode splits: the reduce kernel holds [splits, head_dim] in one tile.
_MAX_SPLITS = 64
_H100_SMS = 132


def triton_available(device: torch.device | str) -> bool:
    """True when the kernels can run on ``device``: CUDA (sm80+), or CPU under the interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        # bf16 tl.dot needs sm80 (Ampere) tensor cores; older GPUs take the PyTorch path.
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and _INTERPRET


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    # The kernels address head_dim with unit stride; every other dimension goes by its stride.
    for name, tensor in tensors.items():
        if tensor.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last (head_dim) dimension, got strides "
                f"{tuple(tensor.stride())}; pass {name}.contiguous()"
            )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches get exact fp32 products; TF32 (Triton's default for fp32 dots) would cost
    # ~1e-3 relative error. bf16/fp16 dots ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


# --- store_kv -----------------------------------------------------------------------------


@_jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    # int64: block * block stride overflows int32 on caches past 2**31 elements.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padded token the scheduler gave no slot
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(
        k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask
    )
    v = tl.load(
        v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask
    )
    k_dst = block * stride_kc_block + offset * stride_kc_slot + heads[:, None] * stride_kc_head
    v_dst = block * stride_vc_block + offset * stride_vc_slot + heads[:, None] * stride_vc_head
    tl.store(k_cache_ptr + k_dst + dims[None, :], k, mask=mask)
    tl.store(v_cache_ptr + v_dst + dims[None, :], v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k[i]``, ``v[i]`` (``[N, num_kv_heads, head_dim]``) to slot ``slot_mapping[i]``.

    Rows whose slot is negative are skipped. One program per token, all heads at once.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=k_cache.shape[1],
    )


# --- decode: flash-decoding split-K ---------------------------------------------------------
#
# Flash-Decoding (Dao, Haziza, Massa, Sizov 2023): with one query token per sequence there is
# too little parallel work per (sequence, head) to fill a GPU, so each sequence's keys are cut
# into `num_splits` chunks, each chunk is attended separately (keeping its log-sum-exp), and a
# second kernel merges the chunks exactly: out = sum_s exp(lse_s - lse) * out_s.


@_jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale_log2,
    stride_q_batch,
    stride_q_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_batch,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    max_blocks_per_seq,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # The grid is fixed by shapes (CUDA graphs); the work each split does is decided here from
    # the live seq_len. Splits own whole tiles, so a short sequence keeps its tiles full and
    # leaves the trailing splits empty instead of cutting every split to a few keys.
    seq_len = tl.load(seq_lens_ptr + batch)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    # All query heads of one kv group share each K/V tile: it is loaded once, and the group is
    # the M side of tl.dot, padded to 16 rows. The padding wastes tensor-core rows, not memory
    # traffic, which is what bounds decode (as SGLang's grouped decode kernel does); a
    # broadcast-multiply-reduce would instead hold a [heads, keys, head_dim] product in registers.
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < GROUP
    dim_mask = dims < HEAD_DIM
    q_heads = kv_head * GROUP + heads
    q = tl.load(
        q_ptr + batch * stride_q_batch + q_heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)

    # Online softmax (Milakov & Gimelshein 2018), running max and sum in fp32.
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    block_table = block_tables_ptr + batch * stride_bt_batch
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + offs_n
        page_index = tokens // PAGE_SIZE
        # page_index < max_blocks_per_seq keeps a corrupt seq_len from reading past the row.
        valid = (tokens < end) & (page_index < max_blocks_per_seq)
        pages = tl.load(block_table + page_index, mask=valid, other=0).to(tl.int64)
        in_page = tokens % PAGE_SIZE
        kv_mask = valid[:, None] & dim_mask[None, :]
        k_rows = pages * stride_kc_block + in_page * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # Every tile holds a valid key, so m_new is finite and exp2 never sees -inf - (-inf).
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = pages * stride_vc_block + in_page * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (short or padding sequence) writes lse = -inf and zeros; every split
    # writes, so a reused scratch buffer never leaks an earlier call's values into the merge.
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    po = partial_out_ptr + batch * stride_po_batch + split * stride_po_split
    tl.store(
        po + q_heads[:, None] * stride_po_head + dims[None, :],
        out.to(partial_out_ptr.dtype.element_ty),  # fp32 partials; q's dtype when unsplit
        mask=head_mask[:, None] & dim_mask[None, :],
    )
    pl = partial_lse_ptr + batch * stride_pl_batch + split
    tl.store(pl + q_heads * stride_pl_head, lse, mask=head_mask)


@_jit
def _decode_reduce_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    stride_out_batch,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    batch = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    lse = tl.load(
        partial_lse_ptr + batch * stride_pl_batch + head * stride_pl_head + splits,
        mask=splits < NUM_SPLITS,
        other=float("-inf"),
    )
    # lse is in base 2 (the split kernel works in exp2). With no keys at all (a padding row,
    # seq_len == 0) every lse is -inf: shift by 0 instead, all weights become 0, output 0.
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    has_keys = lse != float("-inf")
    partial = tl.load(
        partial_out_ptr
        + batch * stride_po_batch
        + head * stride_po_head
        + splits[:, None] * stride_po_split
        + dims[None, :],
        mask=has_keys[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + batch * stride_out_batch + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def default_num_splits(
    batch_size: int,
    num_kv_heads: int,
    max_blocks_per_seq: int,
    block_size: int,
    num_sms: int = _H100_SMS,
) -> int:
    """Splits per sequence for decode, from shapes only (so a captured CUDA graph stays valid).

    Aim for about two programs per SM: batch-1 decode then spreads one sequence over the whole
    GPU, while a batch whose (sequence, kv head) pairs already fill the SMs gets one split, as in
    FlashAttention-2's ``num_splits_heuristic``. No split is shorter than one key tile of the
    longest sequence the block table can hold, and the merge tile caps them at 64.
    """
    programs = batch_size * num_kv_heads
    if programs >= 0.8 * num_sms:  # FlashAttention-2's threshold for "already one wave"
        return 1
    max_tiles = math.ceil(max_blocks_per_seq * block_size / _DECODE_BLOCK_N)
    return max(1, min(math.ceil(2 * num_sms / programs), max_tiles, _MAX_SPLITS))


@dataclass
class DecodeWorkspace:
    """Scratch for the split results, reusable across calls (and fixed in a CUDA graph).

    ``partial_out``: ``[max_batch, num_q_heads, num_splits, head_dim]`` fp32;
    ``partial_lse``: ``[max_batch, num_q_heads, num_splits]`` fp32. A workspace sized for the
    largest batch serves every smaller one.
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_batch: int,
        num_q_heads: int,
        head_dim: int,
        num_splits: int,
        device: torch.device | str,
    ) -> DecodeWorkspace:
        shape = (max_batch, num_q_heads, num_splits)
        return cls(
            partial_out=torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
            partial_lse=torch.empty(*shape, dtype=torch.float32, device=device),
        )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged keys ``0..seq_lens[b]-1``.

    q: ``[B, num_q_heads, head_dim]``; block_tables: ``[B, max_blocks_per_seq]`` int32;
    seq_lens: ``[B]`` int32, counting the new token (already stored); 0 marks a padding row,
    whose output is zeros. num_splits: default ``default_num_splits`` of the shapes.
    out / workspace: preallocated output and scratch, so repeated calls (and CUDA graph
    replays) allocate nothing. Returns ``[B, num_q_heads, head_dim]`` in q's dtype.
    """
    batch_size, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    _check_last_dim_contiguous(q=q, k_cache=k_cache, v_cache=v_cache)
    if out is None:
        out = torch.empty_like(q)
    if batch_size == 0:
        return out
    max_blocks_per_seq = block_tables.shape[1]
    if num_splits is None:
        num_sms = _sm_count(_cuda_index(q.device)) if q.device.type == "cuda" else _H100_SMS
        num_splits = default_num_splits(
            batch_size, num_kv_heads, max_blocks_per_seq, block_size, num_sms
        )
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}")
    if num_splits == 1:
        # One split holds the whole softmax: it writes the final output, no merge kernel.
        workspace = DecodeWorkspace(
            partial_out=out[:, :, None, :],
            partial_lse=torch.empty(batch_size, num_q_heads, 1, device=q.device),
        )
    elif workspace is None:
        workspace = DecodeWorkspace.allocate(
            batch_size, num_q_heads, head_dim, num_splits, q.device
        )
    expected = (num_q_heads, num_splits, head_dim)
    if (
        tuple(workspace.partial_out.shape[1:]) != expected
        or workspace.partial_out.shape[0] < batch_size
    ):
        raise ValueError(
            f"workspace.partial_out has shape {tuple(workspace.partial_out.shape)}, need "
            f"[>= {batch_size}, {num_q_heads}, {num_splits}, {head_dim}]; allocate it with "
            f"DecodeWorkspace.allocate(max_batch, {num_q_heads}, {head_dim}, {num_splits}, device)"
        )
    partial_out = workspace.partial_out
    partial_lse = workspace.partial_lse
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16

    _decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        partial_out,
        partial_lse,
        scale * _LOG2_E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        max_blocks_per_seq,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=block_size,
        BLOCK_N=_DECODE_BLOCK_N,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=4,
    )
    if num_splits == 1:
        return out
    _decode_reduce_kernel[(batch_size, num_q_heads)](
        partial_out,
        partial_lse,
        out,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out


# --- prefill: varlen causal attention over paged K/V ----------------------------------------


@_jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    cu_query_lens_ptr,
    seq_lens_ptr,
    scale_log2,
    stride_q_token,
    stride_q_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_batch,
    stride_out_token,
    stride_out_head,
    max_blocks_per_seq,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch = tl.program_id(1)
    head = tl.program_id(2)
    q_begin = tl.load(cu_query_lens_ptr + batch)
    q_len = tl.load(cu_query_lens_ptr + batch + 1) - q_begin
    if query_block * BLOCK_M >= q_len:  # the grid is sized for the longest prompt
        return
    seq_len = tl.load(seq_lens_ptr + batch)
    # The new queries are the last q_len of seq_len positions: a cached prefix comes first.
    prefix_len = seq_len - q_len
    kv_head = head // GROUP

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < q_len
    dim_mask = dims < HEAD_DIM
    tokens_q = (q_begin + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tokens_q[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)
    q_pos = prefix_len + rows

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    block_table = block_tables_ptr + batch * stride_bt_batch
    # Causal: the last query of this tile sees keys up to its own position, nothing later.
    kv_end = tl.minimum(seq_len, prefix_len + (query_block + 1) * BLOCK_M)
    for tile_start in range(0, kv_end, BLOCK_N):
        tokens = tile_start + offs_n
        page_index = tokens // PAGE_SIZE
        valid = (tokens < kv_end) & (page_index < max_blocks_per_seq)
        pages = tl.load(block_table + page_index, mask=valid, other=0).to(tl.int64)
        in_page = tokens % PAGE_SIZE
        kv_mask = valid[:, None] & dim_mask[None, :]
        k_rows = pages * stride_kc_block + in_page * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # Key 0 is in the first tile and visible to every row, so each row's max is finite.
        visible = valid[None, :] & (tokens[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = pages * stride_vc_block + in_page * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tokens_q[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for packed prompts over paged K/V (their new entries already stored).

    q: ``[total_query_tokens, num_q_heads, head_dim]``; sequence b's queries are
    ``q[cu_query_lens[b]:cu_query_lens[b+1]]`` (cu_query_lens: ``[B+1]`` int32) and sit at the
    last positions of its ``seq_lens[b]`` keys, after any cached prefix. max_query_len: the
    longest of them (sizes the grid). Returns ``[total_query_tokens, num_q_heads, head_dim]``.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    _check_last_dim_contiguous(q=q, k_cache=k_cache, v_cache=v_cache)
    if out is None:
        out = torch.empty_like(q)
    batch_size = seq_lens.shape[0]
    if num_tokens == 0 or batch_size == 0 or max_query_len <= 0:
        return out
    grid = (triton.cdiv(max_query_len, _PREFILL_BLOCK_M), batch_size, num_q_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_query_lens,
        seq_lens,
        scale * _LOG2_E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        block_tables.shape[1],
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        PAGE_SIZE=block_size,
        BLOCK_M=_PREFILL_BLOCK_M,
        BLOCK_N=_PREFILL_BLOCK_N,
        DOT_PRECISION=_dot_precision(k_cache.dtype),
        num_warps=4,
    )
    return out

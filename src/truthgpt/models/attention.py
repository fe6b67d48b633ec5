"""Attention over a paged KV cache, described per call by an explicit `AttentionBatch`.

The engine runs many sequences in one forward as a flat stream of N tokens: every sequence
contributes its new tokens (one for a decode step, a chunk of its prompt for a prefill), and
its keys/values live in fixed-size blocks of one preallocated pool per layer
(`[num_blocks, block_size, num_kv_heads, head_dim]`; token slot s is block s // block_size,
row s % block_size), found through the sequence's block table (Kwon et al. 2023, "Efficient
Memory Management for Large Language Model Serving with PagedAttention").

The batch description is a plain argument, never module state, so one decoder serves training
(SDPA over contiguous tensors, `decoder.py`) and the engine (this file), and a decode step is a
pure function of tensors that a CUDA graph can capture.

Two kinds of query rows:
- decode rows (the first `num_decode_tokens` tokens, one per sequence): on CUDA the Triton
  split-K kernel of `paged_kernels.py`; elsewhere the dense path below.
- dense rows (prefill chunks, and every row on the CPU): each sequence's context is gathered
  through its slots into a padded [P, max_k] batch and one SDPA call with a bottom-right causal
  mask covers all of them, so a chunk attends to its cached prefix blocks too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttentionBatch:
    """Where each of the step's N tokens sits and what it attends to (tensors on the device).

    positions [N] int64: the token's position in its sequence (RoPE / learned positions).
    slot_mapping [N] int64: the cache slot its key/value is written to.
    num_decode_tokens: the first tokens are single-token decodes (one per sequence), described by
        decode_block_tables [D, max_blocks] int32 and decode_seq_lens [D] int32 (context length
        including the new token; 0 marks a CUDA-graph padding row).
    dense_*: the remaining tokens, grouped per sequence into P padded rows:
        dense_query_index [P, max_q] int64 -> index into those tokens (padding: 0),
        dense_query_valid [P, max_q] bool, dense_key_slots [P, max_k] int64 (padding: 0),
        dense_mask [P, 1, max_q, max_k] bool (query i of a chunk of q tokens ending at context
        length L sees keys 0..L-q+i: causal, aligned bottom-right).
    logits_index [S] int64 | None: the rows whose logits are wanted (None: all of them).
    """

    positions: Tensor
    slot_mapping: Tensor
    num_decode_tokens: int = 0
    decode_block_tables: Tensor | None = None
    decode_seq_lens: Tensor | None = None
    dense_query_index: Tensor | None = None
    dense_query_valid: Tensor | None = None
    dense_key_slots: Tensor | None = None
    dense_mask: Tensor | None = None
    logits_index: Tensor | None = None
    use_kernels: bool = False  # Triton kernels (CUDA; CPU only under the Triton interpreter)
    # With kernels, the rows after the decodes go to the varlen prefill kernel instead of the
    # dense path: per sequence its block table [P, max_blocks] int32, context length [P] int32,
    # and query rows cu_query_lens[p]:cu_query_lens[p + 1] ([P + 1] int32).
    prefill_block_tables: Tensor | None = None
    prefill_seq_lens: Tensor | None = None
    prefill_cu_query_lens: Tensor | None = None
    prefill_max_query_len: int = 0


@dataclass
class PagedKVCache:
    """The pool: k and v, each [num_layers, num_blocks, block_size, num_kv_heads, head_dim]."""

    k: Tensor
    v: Tensor

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> None:
    """Write the step's keys/values [N, Hkv, D] into their slots of one layer's pool."""
    if batch.use_kernels:
        from truthgpt.models.paged_kernels import store_kv as triton_store_kv

        triton_store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return
    heads, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, heads, dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch
) -> Tensor:
    """Causal attention of the step's queries q [N, Hq, D] over each sequence's cached context.

    The new k, v [N, Hkv, D] are stored first, so every query (and every sequence that shares
    a prefix block filled in this same step) reads them from the pool. Returns [N, Hq, D].
    """
    store_kv(k, v, k_cache, v_cache, batch)
    return attend_paged(q, k_cache, v_cache, batch)


def attend_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> Tensor:
    """`paged_attention` after the step's keys and values are already in the pool."""
    scale = q.shape[-1] ** -0.5
    num_decode = batch.num_decode_tokens
    if num_decode == q.shape[0]:
        return _decode(q, k_cache, v_cache, batch, scale)
    out = torch.empty_like(q)
    if num_decode:
        out[:num_decode] = _decode(q[:num_decode], k_cache, v_cache, batch, scale)
    if batch.prefill_seq_lens is not None:
        from truthgpt.models.paged_kernels import paged_prefill_attention

        paged_prefill_attention(
            q[num_decode:],
            k_cache,
            v_cache,
            batch.prefill_block_tables,
            batch.prefill_cu_query_lens,
            batch.prefill_seq_lens,
            scale,
            batch.prefill_max_query_len,
            out=out[num_decode:],
        )
    else:
        out[num_decode:] = _dense(q[num_decode:], k_cache, v_cache, batch, scale)
    return out


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch, scale: float):
    from truthgpt.models.paged_kernels import paged_decode_attention

    return paged_decode_attention(
        q, k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale
    )


def _dense(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch, scale: float):
    """Gather each sequence's context and run one masked SDPA over the padded batch."""
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    slots = batch.dense_key_slots
    keys = k_cache.view(-1, num_kv_heads, head_dim)[slots]  # [P, max_k, Hkv, D]
    values = v_cache.view(-1, num_kv_heads, head_dim)[slots]
    queries = q[batch.dense_query_index]  # [P, max_q, Hq, D]
    queries, keys, values = (t.transpose(1, 2) for t in (queries, keys, values))
    if q.shape[1] != num_kv_heads:  # query head h reads kv head h // repeats, as HF's repeat_kv
        repeats = q.shape[1] // num_kv_heads
        keys = keys.repeat_interleave(repeats, dim=1)
        values = values.repeat_interleave(repeats, dim=1)
    y = F.scaled_dot_product_attention(
        queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=batch.dense_mask, scale=scale
    )
    y = y.transpose(1, 2)  # [P, max_q, Hq, D]
    out = q.new_zeros(q.shape)
    valid = batch.dense_query_valid
    out[batch.dense_query_index[valid]] = y[valid]
    return out

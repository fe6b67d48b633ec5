"""Paged KV kernels against plain PyTorch attention: Triton interpreter on CPU, and on CUDA.

The interpreter must be switched on before triton is imported, so the CPU checks run in a
subprocess with TRITON_INTERPRET=1 (tests/triton_interpreter.py); the pytest process never sets it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from truthgpt.models import paged_kernels
from truthgpt.models.paged_kernels import (
    DecodeWorkspace,
    default_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
)

HAS_TRITON = paged_kernels.triton is not None

# --- reference: gather through the block table, repeat kv heads, softmax attention in fp32 ----


def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence, ``[seq_len, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    blocks = block_table[: math.ceil(seq_len / block_size)].long()
    return cache[blocks].flatten(0, 1)[:seq_len]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """q ``[M, Hq, D]`` at q_positions over keys ``[S, Hkv, D]``, causal, fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,shd->hms", q.float(), k) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hms,shd->mhd", scores.softmax(-1), v)


def reference_decode(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:  # padding row
            continue
        k = gather_sequence(k_cache, block_tables[b], seq_len)
        v = gather_sequence(v_cache, block_tables[b], seq_len)
        positions = torch.tensor([seq_len - 1], device=q.device)
        out[b] = reference_attention(q[b : b + 1], k, v, positions, scale)[0]
    return out


def reference_prefill(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens, scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        begin, end = cu_query_lens[b].item(), cu_query_lens[b + 1].item()
        k = gather_sequence(k_cache, block_tables[b], seq_len)
        v = gather_sequence(v_cache, block_tables[b], seq_len)
        positions = torch.arange(seq_len - (end - begin), seq_len, device=q.device)
        out[begin:end] = reference_attention(q[begin:end], k, v, positions, scale)
    return out


# --- random paged batches ---------------------------------------------------------------------


def random_paged_batch(
    seed: int,
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    num_blocks: int | None = None,
    max_blocks: int | None = None,
):
    """Caches whose unused slots hold NaN (so any read of them shows), shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    # Trailing table entries point at random blocks: the kernel must not follow them.
    max_blocks = max_blocks or max(blocks_per_seq) + 2
    # Block 0 is the scratch block, never handed out.
    num_blocks = num_blocks or 1 + sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    shuffled = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    for b, (n, count) in enumerate(zip(seq_lens, blocks_per_seq)):
        blocks = torch.tensor([shuffled.pop() for _ in range(count)], dtype=torch.long)
        block_tables[b, :count] = blocks
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            n, num_kv_heads, head_dim, generator=gen
        )
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            n, num_kv_heads, head_dim, generator=gen
        )
    to = dict(device=device)
    return (
        k_cache.to(dtype=dtype, **to),
        v_cache.to(dtype=dtype, **to),
        block_tables.to(dtype=torch.int32, **to),
        torch.tensor(seq_lens, dtype=torch.int32, **to),
    )


def random_queries(seed, num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device):
    """Queries as a slice of a fused qkv projection, so the kernels see a non-contiguous q."""
    gen = torch.Generator().manual_seed(seed + 1)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(device=device, dtype=dtype)
    return qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)


# --- checks, shared by the interpreter run (CPU, fp32) and the GPU tests -------------------------

# (seq_lens, block_size, num_kv_heads, group, head_dim): lengths of 1, exact multiples of the
# block size, padding rows (0), sequences longer than one 64-key tile, a head_dim of 8.
DECODE_CASES = [
    ([5, 1, 8, 0, 150, 12, 64, 3, 33], 4, 2, 4, 64),
    ([150], 16, 1, 8, 80),
    ([16, 0, 70], 8, 4, 1, 80),
    ([1, 9, 200, 32], 16, 2, 8, 64),
    ([7, 0, 40], 4, 4, 4, 8),  # head_dim below tl.dot's minimum of 16 (tiny test models)
]


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_store_kv(device: str, dtype: torch.dtype, tol: float) -> None:
    for seed, (num_tokens, block_size, num_kv_heads, head_dim) in enumerate(
        [(13, 4, 2, 64), (7, 16, 8, 80), (20, 8, 1, 96)]
    ):
        gen = torch.Generator().manual_seed(seed)
        num_blocks = 8
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
        slots[::3] = -1  # padded tokens with no slot
        # k and v as slices of one fused qkv output: strided rows, contiguous head_dim.
        qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen)
        qkv = qkv.to(device=device, dtype=dtype)
        k, v = qkv.view(num_tokens, 3, num_kv_heads, head_dim).unbind(1)[1:]
        want_k, want_v = k_cache.clone(), v_cache.clone()
        keep = slots >= 0
        want_k.view(-1, num_kv_heads, head_dim)[slots[keep]] = k[keep.to(device)]
        want_v.view(-1, num_kv_heads, head_dim)[slots[keep]] = v[keep.to(device)]
        store_kv(k, v, k_cache, v_cache, slots.to(device=device, dtype=torch.int32))
        assert torch.equal(k_cache, want_k), f"store_kv k, case {seed}"
        assert torch.equal(v_cache, want_v), f"store_kv v, case {seed}"


# On the GPU only (slow in the interpreter): a 2k-token batch-1 decode that takes the maximum
# split count, and the head dims the interpreter run leaves out.
LONG_DECODE_CASES = [
    ([2000], 16, 4, 8, 64),
    ([1500, 3, 700, 0], 16, 8, 4, 128),
    ([513, 1, 96], 32, 2, 2, 96),
    ([64, 65, 640], 16, 4, 4, 32),
]


def check_decode(device: str, dtype: torch.dtype, tol: float, cases=DECODE_CASES) -> None:
    for seed, (seq_lens, block_size, num_kv_heads, group, head_dim) in enumerate(cases):
        k_cache, v_cache, block_tables, lens = random_paged_batch(
            seed, seq_lens, block_size, num_kv_heads, head_dim, dtype, device
        )
        q = random_queries(
            seed, len(seq_lens), num_kv_heads * group, num_kv_heads, head_dim, dtype, device
        )
        scale = head_dim**-0.5
        want = reference_decode(q, k_cache, v_cache, block_tables, lens, scale)
        # The default (2 to 4 here), one split, and more splits than tiles (some stay empty).
        for num_splits in (None, 1, 5):
            got = paged_decode_attention(
                q, k_cache, v_cache, block_tables, lens, scale, num_splits=num_splits
            )
            assert got.dtype == q.dtype and got.shape == q.shape
            assert_close(got, want, tol, f"decode case {seed}, num_splits={num_splits}")


def check_decode_reuses_buffers(device: str, dtype: torch.dtype, tol: float) -> None:
    """One workspace sized for a larger batch and one out tensor, reused across calls."""
    num_kv_heads, group, head_dim, block_size, num_splits = 2, 4, 64, 8, 4
    workspace = DecodeWorkspace.allocate(6, num_kv_heads * group, head_dim, num_splits, device)
    out = torch.empty(4, num_kv_heads * group, head_dim, dtype=dtype, device=device)
    # The second call's shorter sequences leave splits empty that the first call filled.
    for seed, seq_lens in enumerate([[90, 40, 7, 130], [0, 3, 16, 1]]):
        k_cache, v_cache, block_tables, lens = random_paged_batch(
            seed + 10, seq_lens, block_size, num_kv_heads, head_dim, dtype, device
        )
        q = random_queries(seed, 4, num_kv_heads * group, num_kv_heads, head_dim, dtype, device)
        got = paged_decode_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            lens,
            0.125,
            num_splits=num_splits,
            out=out,
            workspace=workspace,
        )
        assert got.data_ptr() == out.data_ptr()
        want = reference_decode(q, k_cache, v_cache, block_tables, lens, 0.125)
        assert_close(got, want, tol, f"decode with reused buffers, call {seed}")


# (seq_lens, query_lens, block_size, num_kv_heads, group, head_dim): whole prompts, prompts
# after a cached prefix (aligned to a block or not), single-token chunks, > 64 queries.
PREFILL_CASES = [
    ([70, 37, 9], [70, 5, 1], 4, 2, 4, 64),
    ([20, 100], [20, 68], 16, 1, 8, 80),
    ([33, 16, 1], [1, 16, 1], 8, 4, 1, 80),
    ([12, 30], [12, 3], 4, 2, 2, 8),
]


def check_prefill(device: str, dtype: torch.dtype, tol: float) -> None:
    for seed, (seq_lens, query_lens, block_size, num_kv_heads, group, head_dim) in enumerate(
        PREFILL_CASES
    ):
        k_cache, v_cache, block_tables, lens = random_paged_batch(
            seed, seq_lens, block_size, num_kv_heads, head_dim, dtype, device
        )
        q = random_queries(
            seed, sum(query_lens), num_kv_heads * group, num_kv_heads, head_dim, dtype, device
        )
        cu_query_lens = torch.tensor(
            [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device
        )
        scale = head_dim**-0.5
        got = paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_query_lens,
            lens,
            scale,
            max_query_len=max(query_lens),
        )
        want = reference_prefill(q, k_cache, v_cache, block_tables, cu_query_lens, lens, scale)
        assert got.dtype == q.dtype and got.shape == q.shape
        assert_close(got, want, tol, f"prefill case {seed}")


def check_long_decode(device: str, dtype: torch.dtype, tol: float) -> None:
    check_decode(device, dtype, tol, LONG_DECODE_CASES)


CHECKS = {
    "store_kv": check_store_kv,
    "decode": check_decode,
    "long_decode": check_long_decode,
    "decode_reuses_buffers": check_decode_reuses_buffers,
    "prefill": check_prefill,
}

# --- CPU: the Triton interpreter, in a subprocess so TRITON_INTERPRET stays out of this one -----


INTERPRETER_CHECKS = ["store_kv", "decode", "decode_reuses_buffers", "prefill"]


def run_in_interpreter(name: str) -> None:
    CHECKS[name]("cpu", torch.float32, 1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_in_triton_interpreter(triton_interpreter) -> None:
    passed, output = triton_interpreter[__name__]
    assert passed, output


def test_triton_needs_cuda_or_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not paged_kernels.triton_available(torch.device("cpu"))


def test_default_num_splits_fills_the_gpu_and_follows_shapes_only() -> None:
    # Batch-1 decode of a long context spreads over many programs ...
    assert default_num_splits(1, 4, max_blocks_per_seq=128, block_size=16) >= 32
    # ... a batch that fills the SMs with (sequence, kv head) pairs is not split ...
    assert default_num_splits(64, 4, max_blocks_per_seq=128, block_size=16) == 1
    # ... and no split is shorter than one key tile of the longest possible sequence.
    assert default_num_splits(1, 4, max_blocks_per_seq=4, block_size=16) == 1
    for batch in range(1, 300, 7):
        splits = default_num_splits(batch, 8, max_blocks_per_seq=256, block_size=16)
        assert 1 <= splits <= 64
        smaller_batch = default_num_splits(max(1, batch // 2), 8, 256, 16)
        assert smaller_batch >= splits


# --- GPU: the compiled kernels in half precision, and a CUDA graph replay -----------------------

GPU_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}

needs_gpu = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available() and paged_kernels.triton_available("cuda")),
    reason="needs triton and a CUDA GPU of sm80 or newer",
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("check", list(CHECKS))
def test_kernels_on_cuda(check: str, dtype: torch.dtype) -> None:
    CHECKS[check]("cuda", dtype, GPU_TOLERANCE[dtype])


@pytest.mark.gpu
@needs_gpu
def test_decode_replays_in_a_cuda_graph() -> None:
    """Capture once; new seq_lens, block tables and queries copied in place are honoured."""
    device, dtype = "cuda", torch.bfloat16
    num_kv_heads, group, head_dim, block_size, batch = 4, 8, 64, 16, 4
    max_len = 300
    max_blocks = math.ceil(max_len / block_size) + 2
    shapes = (batch, num_kv_heads * group, head_dim)
    static_q = torch.zeros(shapes, dtype=dtype, device=device)
    static_tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
    static_lens = torch.zeros(batch, dtype=torch.int32, device=device)  # captured as padding
    num_splits = default_num_splits(batch, num_kv_heads, max_blocks, block_size)
    workspace = DecodeWorkspace.allocate(batch, shapes[1], head_dim, num_splits, device)
    out = torch.empty(shapes, dtype=dtype, device=device)

    def run(k_cache, v_cache):
        paged_decode_attention(
            static_q,
            k_cache,
            v_cache,
            static_tables,
            static_lens,
            0.125,
            num_splits=num_splits,
            out=out,
            workspace=workspace,
        )

    # One cache for the graph's lifetime, refilled in place, as the engine's would be.
    layout = dict(
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        num_blocks=1 + batch * max_blocks,
        max_blocks=max_blocks,
    )
    k_cache, v_cache, _, _ = random_paged_batch(0, [max_len] * batch, **layout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        run(k_cache, v_cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(k_cache, v_cache)

    for seed, seq_lens in enumerate([[1, 300, 16, 77], [0, 5, 250, 32], [200, 0, 0, 1]]):
        new_k, new_v, tables, lens = random_paged_batch(seed + 1, seq_lens, **layout)
        k_cache.copy_(new_k)
        v_cache.copy_(new_v)
        static_tables.copy_(tables)
        static_lens.copy_(lens)
        static_q.copy_(
            random_queries(seed, batch, shapes[1], num_kv_heads, head_dim, dtype, device)
        )
        graph.replay()
        want = reference_decode(static_q, k_cache, v_cache, static_tables, static_lens, 0.125)
        assert_close(out, want, GPU_TOLERANCE[dtype], f"graph replay {seed}")

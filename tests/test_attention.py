"""The engine's paged forward against the training forward on the same weights.

`Decoder.forward_paged` (flat tokens, paged KV pool, explicit AttentionBatch) must give the
logits that `Decoder.forward` gives on each whole sequence, whether a sequence arrives whole,
in chunks over a cached prefix, or one token at a time, with shuffled non-contiguous blocks.
"""

from __future__ import annotations

import pytest
import torch

from truthgpt.inference.model_runner import ModelRunner
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.inference.scheduler import ScheduledBatch
from truthgpt.inference.sequence import Sequence
from truthgpt.models import Decoder, DecoderConfig

BLOCK = 4


def _decoder(family: str) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        family=family,
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if family == "llama" else 4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return Decoder(cfg).eval()


def _seq(tokens: list[int], table: list[int], computed: int) -> Sequence:
    return Sequence(
        seq_id=0,
        request_id="r",
        index=0,
        prompt_len=len(tokens),
        token_ids=list(tokens),
        params=SamplingParams(),
        seed=0,
        max_tokens=1,
        detokenizer=None,
        arrival_time=0.0,
        block_table=table,
        num_computed_tokens=computed,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paged_forward_matches_the_training_forward(family):
    model = _decoder(family)
    cache = model.new_paged_cache(num_blocks=40, block_size=BLOCK)
    runner = ModelRunner(model, cache, 64, 8, use_kernels=False, cuda_graphs=False)
    generator = torch.Generator().manual_seed(1)
    lengths = [13, 5, 22, 1]
    seqs_tokens = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in lengths]
    free = torch.randperm(39, generator=generator).add(1).tolist()  # shuffled, never block 0
    tables = []
    for n in lengths:
        count = -(-n // BLOCK)
        tables.append(free[:count])
        free = free[count:]
    with torch.no_grad():
        expected = [model(torch.tensor([t])).logits[0] for t in seqs_tokens]
        # Step 1: the first part of every sequence (different chunk sizes), all rows returned.
        firsts = [7, 5, 10, 1]
        seqs = [_seq(t, table, 0) for t, table in zip(seqs_tokens, tables)]
        batch = ScheduledBatch(seqs, firsts, [])
        input_ids, attn, _, _ = runner.prepare(batch)
        attn.logits_index = None
        logits = model.forward_paged(input_ids, cache, attn)
        row = 0
        for seq_index, count in enumerate(firsts):
            got = logits[row : row + count]
            torch.testing.assert_close(got, expected[seq_index][:count], atol=1e-5, rtol=1e-5)
            row += count
        # Step 2: the rest, over the cached prefix (a 1-token chunk counts as a decode row).
        rest = [(seq, n - f) for seq, n, f in zip(seqs, lengths, firsts) if n > f]
        for seq, first in zip(seqs, firsts):
            seq.num_computed_tokens = first
        batch = ScheduledBatch([s for s, _ in rest], [c for _, c in rest], [])
        input_ids, attn, _, _ = runner.prepare(batch)
        attn.logits_index = None
        logits = model.forward_paged(input_ids, cache, attn)
        row = 0
        for seq, count in rest:
            index = seqs.index(seq)
            start = seq.num_computed_tokens
            got = logits[row : row + count]
            want = expected[index][start : start + count]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            row += count

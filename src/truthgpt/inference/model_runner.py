"""The forward of one engine step: scheduled sequences -> device tensors -> logits -> tokens.

Host work is a few list comprehensions and one pinned host-to-device copy per tensor; the only
device-to-host copy is the step's sampled tokens (with their logprobs packed into the same copy).
Decode-only steps on CUDA replay a CUDA graph captured at a bucketed batch size (as vLLM and
gpt-fast do): one launch instead of hundreds of small kernels, which is what makes batch-1
decode of a 1B model run near the weight-read floor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from truthgpt.inference.kv_cache import SCRATCH_BLOCK
from truthgpt.inference.scheduler import ScheduledBatch
from truthgpt.models.attention import AttentionBatch, PagedKVCache
from truthgpt.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Per sampling sequence of the step (in `ScheduledBatch` order, prefill chunks that do not
    finish their prompt skipped): the new token and, when asked for, its logprobs."""

    seq_indices: list[int]  # positions in ScheduledBatch.seqs
    tokens: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    # ScheduledBatch position -> the prompt-logprob entries its chunk adds (in prompt order).
    prompt_logprobs: dict[int, list[dict]] = field(default_factory=dict)


@dataclass
class PromptRows:
    """Rows of one chunk whose logits score the prompt: positions `first`.. `first + count - 1`
    predict the prompt tokens after them."""

    seq_index: int  # position in ScheduledBatch.seqs
    first: int  # first position
    count: int


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 8 up to max_num_seqs
    (padding a batch to its bucket wastes at most 7 rows of a memory-bound step)."""
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        cache: PagedKVCache,
        max_model_len: int,
        max_num_seqs: int,
        use_kernels: bool,
        cuda_graphs: bool,
        sample_vocab: int | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.k.device
        self.block_size = cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.vocab_size = model.config.vocab_size
        self.sample_vocab = min(sample_vocab or self.vocab_size, self.vocab_size)
        self.use_kernels = use_kernels
        self.pin = self.device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs and use_kernels:
            self._capture_graphs(max_num_seqs)

    # -- inputs ---------------------------------------------------------------------------------

    def _tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=self.pin)
        return host.to(self.device, non_blocking=True)

    def _slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[Tensor, AttentionBatch, list[int], list[PromptRows]]:
        """input_ids [N], the attention description, the indices of the sampling seqs, and the
        prompt rows to score. The logits come back as the sampling rows, then the prompt rows."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        sampling: list[int] = []
        scored: list[PromptRows] = []
        score_rows: list[int] = []
        for index, (seq, count) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            row0 = len(input_ids)
            input_ids.extend(seq.token_ids[start : start + count])
            positions.extend(range(start, start + count))
            table = seq.block_table
            slots.extend(self._slot(table, p) for p in range(start, start + count))
            if start + count == seq.num_tokens:  # the prompt is done: this row samples
                sampling.append(index)
                last_rows.append(len(input_ids) - 1)
            if seq.needs_prompt_logprobs:
                # Position p predicts prompt token p + 1; entries already taken (before a
                # preemption) are not scored again.
                first = max(start, len(seq.prompt_logprobs))
                end = min(start + count, seq.prompt_len - 1)
                if end > first:
                    scored.append(PromptRows(index, first, end - first))
                    score_rows.extend(range(row0 + first - start, row0 + end - start))

        num_decode = 0
        if self.use_kernels:
            num_decode = sum(1 for count in batch.num_new_tokens if count == 1)
        attn = AttentionBatch(
            positions=self._tensor(positions, torch.int64),
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode_tokens=num_decode,
            use_kernels=self.use_kernels,
        )
        if num_decode:
            seqs = batch.seqs[:num_decode]
            width = max(len(seq.block_table) for seq in seqs)
            attn.decode_block_tables = self._tensor(
                [
                    seq.block_table + [SCRATCH_BLOCK] * (width - len(seq.block_table))
                    for seq in seqs
                ],
                torch.int32,
            )
            attn.decode_seq_lens = self._tensor(
                [seq.num_computed_tokens + 1 for seq in seqs], torch.int32
            )
        if num_decode < len(batch.seqs):
            if self.use_kernels:
                self._describe_prefill(batch, num_decode, attn)
            else:
                self._describe_dense(batch, num_decode, attn)
        if score_rows or len(last_rows) != len(positions):
            attn.logits_index = self._tensor(last_rows + score_rows, torch.int64)
        return self._tensor(input_ids, torch.int64), attn, sampling, scored

    def _describe_prefill(self, batch: ScheduledBatch, first: int, attn: AttentionBatch) -> None:
        """Block tables, context lengths and packed query offsets for the prefill kernel."""
        seqs, counts = batch.seqs[first:], batch.num_new_tokens[first:]
        width = max(len(seq.block_table) for seq in seqs)
        attn.prefill_block_tables = self._tensor(
            [seq.block_table + [SCRATCH_BLOCK] * (width - len(seq.block_table)) for seq in seqs],
            torch.int32,
        )
        attn.prefill_seq_lens = self._tensor(
            [seq.num_computed_tokens + count for seq, count in zip(seqs, counts)], torch.int32
        )
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        attn.prefill_cu_query_lens = self._tensor(offsets, torch.int32)
        attn.prefill_max_query_len = max(counts)

    def _describe_dense(self, batch: ScheduledBatch, first: int, attn: AttentionBatch) -> None:
        """Padded [P, max_q] / [P, max_k] index tensors for the rows after the decodes, built on
        the device from block tables and lengths (no per-key host loop)."""
        seqs, counts = batch.seqs[first:], batch.num_new_tokens[first:]
        width = max(len(seq.block_table) for seq in seqs)
        tables = self._tensor(
            [seq.block_table + [SCRATCH_BLOCK] * (width - len(seq.block_table)) for seq in seqs],
            torch.int64,
        )
        query_lens = self._tensor(counts, torch.int64)  # [P]
        context_lens = self._tensor(
            [seq.num_computed_tokens + count for seq, count in zip(seqs, counts)], torch.int64
        )
        starts = torch.cumsum(query_lens, 0) - query_lens  # first row of each seq
        max_q = max(counts)
        max_k = max(seq.num_computed_tokens + count for seq, count in zip(seqs, counts))
        q_offsets = torch.arange(max_q, device=self.device)
        k_positions = torch.arange(max_k, device=self.device)
        valid = q_offsets[None, :] < query_lens[:, None]  # [P, max_q]
        attn.dense_query_valid = valid
        attn.dense_query_index = torch.where(valid, starts[:, None] + q_offsets[None, :], 0)
        block_index = (k_positions // self.block_size).clamp(max=width - 1)
        attn.dense_key_slots = (
            tables[:, block_index] * self.block_size + (k_positions % self.block_size)[None, :]
        )
        # Query i of a chunk of q tokens ending at context length L is position L - q + i.
        query_pos = context_lens[:, None] - query_lens[:, None] + q_offsets[None, :]
        mask = k_positions[None, None, :] <= query_pos[:, :, None]  # [P, max_q, max_k]
        # Padding queries see key 0 only: an all-masked row would make SDPA produce NaN.
        mask = torch.where(valid[:, :, None], mask, k_positions[None, None, :] == 0)
        attn.dense_mask = mask[:, None]

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        num_seqs = len(batch.seqs)
        graph_size = self._graph_size(batch)
        scored: list[PromptRows] = []
        if graph_size is not None:
            logits, sampling = self._replay(batch, graph_size), list(range(num_seqs))
        else:
            input_ids, attn, sampling, scored = self.prepare(batch)
            logits = self.model.forward_paged(input_ids, self.cache, attn)
        prompt_logprobs = {}
        if scored:
            prompt_logprobs = self._score_prompts(batch, scored, logits[len(sampling) :])
            logits = logits[: len(sampling)]
        if not sampling:
            return StepResult([], [], None, None, prompt_logprobs)
        from truthgpt.inference.sampler import SamplingBatch, sample

        seqs = [batch.seqs[i] for i in sampling]
        params = [seq.params for seq in seqs]
        penalties = any(
            p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params
        )
        if self.sample_vocab < logits.shape[-1]:
            # Rows past the tokenizer's vocabulary (padding to a fast matmul shape) are never
            # valid tokens: an untrained model could otherwise pick one.
            logits = logits[:, : self.sample_vocab]
        if not penalties and all(p.temperature == 0 and p.logprobs is None for p in params):
            tokens = logits.argmax(dim=-1).tolist()
            return StepResult(sampling, tokens, None, None, prompt_logprobs)
        sampling_batch = SamplingBatch.build(
            params,
            seeds=[seq.seed for seq in seqs],
            steps=[seq.num_output_tokens for seq in seqs],
            prompt_ids=[seq.token_ids[: seq.prompt_len] for seq in seqs] if penalties else None,
            output_ids=[seq.output_ids for seq in seqs] if penalties else None,
            vocab_size=logits.shape[-1],
            device=self.device,
        )
        out = sample(logits, sampling_batch)
        result = self._to_host(sampling, out)
        result.prompt_logprobs = prompt_logprobs
        return result

    def _score_prompts(
        self, batch: ScheduledBatch, scored: list[PromptRows], logits: Tensor
    ) -> dict[int, list[dict]]:
        """Each scored row's logprob of the prompt token after it, plus the top k there."""
        from truthgpt.inference.sampler import token_logprobs

        targets: list[int] = []
        for rows in scored:
            ids = batch.seqs[rows.seq_index].token_ids
            targets.extend(ids[rows.first + 1 : rows.first + 1 + rows.count])
        k = max(batch.seqs[rows.seq_index].params.prompt_logprobs for rows in scored)
        entries = token_logprobs(logits[:, : self.sample_vocab], targets, k)
        out, at = {}, 0
        for rows in scored:
            want = batch.seqs[rows.seq_index].params.prompt_logprobs
            chunk = entries[at : at + rows.count]
            at += rows.count
            if want < k:
                chunk = [{**entry, "top": entry["top"][:want]} for entry in chunk]
            out[rows.seq_index] = chunk
        return out

    def _to_host(self, sampling: list[int], out) -> StepResult:
        if out.logprobs is None:
            return StepResult(sampling, out.tokens.tolist(), None, None)
        # One device-to-host copy: ids are exact in fp32 below 2**24.
        parts = [out.tokens.float()[:, None], out.logprobs.float()[:, None]]
        if out.top_logprobs is not None:
            parts += [out.top_ids.float(), out.top_logprobs.float()]
        rows = torch.cat(parts, dim=1).tolist()
        k = out.top_ids.shape[1] if out.top_logprobs is not None else 0
        tokens = [int(row[0]) for row in rows]
        logprobs = [row[1] for row in rows]
        top = [list(zip(map(int, row[2 : 2 + k]), row[2 + k :])) for row in rows]
        return StepResult(sampling, tokens, logprobs, top)

    # -- CUDA graphs ----------------------------------------------------------------------------

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        """The graph bucket of a step of decodes only, else None. A one-token chunk of a prompt
        that is not the prompt's last token is no decode: it samples nothing (and may need its
        row's logits scored), so it runs eagerly."""
        if not self.graphs or any(
            count != 1 or seq.num_computed_tokens + 1 != seq.num_tokens
            for seq, count in zip(batch.seqs, batch.num_new_tokens)
        ):
            return None
        size = len(batch.seqs)
        return next((bucket for bucket in self.graph_sizes if bucket >= size), None)

    def _capture_graphs(self, max_num_seqs: int) -> None:
        self.graph_sizes = graph_batch_sizes(max_num_seqs)
        largest = self.graph_sizes[-1]
        device = self.device
        # Inputs live in fixed device buffers the graphs read; each step fills pinned host
        # twins in place (numpy views, no per-step allocation) and copies them over.
        self.h_inputs = torch.zeros(3, largest, dtype=torch.int64).pin_memory()
        self.h_seq_lens = torch.zeros(largest, dtype=torch.int32).pin_memory()
        self.h_tables = torch.zeros(largest, self.max_blocks_per_seq, dtype=torch.int32)
        self.h_tables = self.h_tables.pin_memory()
        self.g_inputs = torch.zeros(3, largest, dtype=torch.int64, device=device)
        self.g_seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.g_tables = torch.zeros_like(self.h_tables, device=device)
        self.g_logits: dict[int, Tensor] = {}
        pool = None
        for size in reversed(self.graph_sizes):  # largest first: the others reuse its memory
            attn = AttentionBatch(
                positions=self.g_inputs[1, :size],
                slot_mapping=self.g_inputs[2, :size],
                num_decode_tokens=size,
                decode_block_tables=self.g_tables[:size],
                decode_seq_lens=self.g_seq_lens[:size],
                use_kernels=True,
            )
            ids = self.g_inputs[0, :size]
            self.model.forward_paged(ids, self.cache, attn)  # warm up (Triton compiles here)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.g_logits[size] = self.model.forward_paged(ids, self.cache, attn)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        log.info("captured CUDA graphs for decode batch sizes %s", self.graph_sizes)

    def _replay(self, batch: ScheduledBatch, size: int) -> Tensor:
        # The previous step's copies out of these pinned buffers are complete: that step ended
        # by reading its sampled tokens back, which waits for everything queued before.
        inputs, lens, tables = (
            self.h_inputs.numpy(),
            self.h_seq_lens.numpy(),
            self.h_tables.numpy(),
        )
        real = len(batch.seqs)
        block_size = self.block_size
        for row, seq in enumerate(batch.seqs):
            position = seq.num_computed_tokens
            table = seq.block_table
            inputs[0, row] = seq.token_ids[position]
            inputs[1, row] = position
            inputs[2, row] = table[position // block_size] * block_size + position % block_size
            lens[row] = position + 1
            # Entries past a sequence's blocks may be stale: the kernel reads only its seq_len.
            tables[row, : len(table)] = table
        # Padding rows: token 0 at position 0, written to the scratch block, length 0.
        inputs[:, real:size] = 0
        inputs[2, real:size] = SCRATCH_BLOCK * block_size
        lens[real:size] = 0
        self.g_inputs[:, :size].copy_(self.h_inputs[:, :size], non_blocking=True)
        self.g_seq_lens[:size].copy_(self.h_seq_lens[:size], non_blocking=True)
        self.g_tables[:size].copy_(self.h_tables[:size], non_blocking=True)
        self.graphs[size].replay()
        return self.g_logits[size][:real]

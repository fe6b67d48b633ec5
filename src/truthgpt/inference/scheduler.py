"""Who runs this step: continuous batching with chunked prefill, prefix hits and preemption.

Every step has a token budget (`max_num_batched_tokens`) and a sequence budget
(`max_num_seqs`). Running sequences go first, so a long prompt never stalls the decodes: each
decode takes one token, a prompt still being prefilled takes a chunk of what budget is left.
Then waiting sequences are admitted in arrival order while budget and blocks last, each
starting after its cached prefix. When the pool has no block for a running sequence, the
newest running sequence is preempted: its blocks are freed and it waits, at the front of the
queue, to be recomputed (recompute, not swap: as vLLM does by default, since recomputing a
prompt is cheap next to the PCIe traffic of swapping).

A request that asks for prompt logprobs needs the logits of every prompt row, not only the
last: its prompt skips the prefix cache, and such prompts take at most PROMPT_LOGPROB_ROWS tokens
per step between them, so a step's logits stay within what the memory profile measured.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from truthgpt.inference.kv_cache import BlockManager
from truthgpt.inference.sequence import Sequence, Status

# Prompt rows whose full logits one step computes at most (the engine's memory profile includes
# them): 512 x a 128k vocabulary is 128 MiB of bf16 logits.
PROMPT_LOGPROB_ROWS = 512


@dataclass
class ScheduledBatch:
    """The step's work: sequences in order (single-token rows first) and their new tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool = True,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []
        self._logit_rows = PROMPT_LOGPROB_ROWS

        # 1. Running sequences, oldest first; the newest give way when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            remaining = seq.num_tokens - seq.num_computed_tokens
            count = min(remaining, budget) if self.chunked_prefill else remaining
            count = self._cap_logit_rows(seq, count)
            if count > budget or count == 0:
                index += 1
                continue
            while not self._grow(seq, count):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it preempted itself: nothing newer is left to run
            scheduled.append(seq)
            counts.append(count)
            self._name_blocks(seq, count)
            budget -= count
            index += 1

        # 2. Waiting sequences, in arrival order (preempted ones were put back at the front).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if preempted:
                break  # memory is short: admitting more would only preempt again
            seq = self.waiting[0]
            if not seq.block_table:
                cached, seq.prefix_hash = (
                    ([], None)
                    if seq.needs_prompt_logprobs
                    else self.blocks.match_prefix(seq.token_ids)
                )
                seq.block_table = cached
                seq.num_computed_tokens = len(cached) * self.blocks.block_size
                seq.num_named_blocks = len(cached)
            remaining = seq.num_tokens - seq.num_computed_tokens
            count = min(remaining, budget) if self.chunked_prefill else remaining
            count = self._cap_logit_rows(seq, count)
            if count > budget or count == 0 or not self._grow(seq, count):
                # Not now: give the cached blocks back so they stay evictable meanwhile.
                self.blocks.release(seq.block_table)
                seq.block_table, seq.num_computed_tokens, seq.num_named_blocks = [], 0, 0
                break
            self.waiting.popleft()
            if not seq.num_preemptions:  # what the prompt found; a recompute finds its own blocks
                seq.num_cached_tokens = seq.num_computed_tokens
                if not seq.needs_prompt_logprobs:
                    self.blocks.record_lookup(seq.num_tokens, seq.num_cached_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            counts.append(count)
            self._name_blocks(seq, count)
            budget -= count

        # Single-token rows first: the attention treats them as decodes.
        order = sorted(range(len(scheduled)), key=lambda i: counts[i] != 1)
        return ScheduledBatch([scheduled[i] for i in order], [counts[i] for i in order], preempted)

    def _cap_logit_rows(self, seq: Sequence, count: int) -> int:
        """`count`, cut to the step's prompt-logprob rows left when seq needs them (taken)."""
        if not seq.needs_prompt_logprobs:
            return count
        count = min(count, self._logit_rows)
        self._logit_rows -= count
        return count

    def _name_blocks(self, seq: Sequence, count: int) -> None:
        """Name the blocks that will be full after this step, at once, so that a sequence
        admitted later in this same step (the other samples of an n > 1 request, equal
        prompts) reuses them: the forward writes every token's K/V before any attention reads,
        layer by layer, so a block filled in this step is readable within it."""
        seq.num_named_blocks, seq.prefix_hash = self.blocks.register_full_blocks(
            seq.block_table,
            seq.token_ids,
            seq.num_computed_tokens + count,
            seq.num_named_blocks,
            seq.prefix_hash,
        )

    def _grow(self, seq: Sequence, count: int) -> bool:
        """Give seq the blocks its next `count` tokens need; False when the pool is short."""
        needed = self.blocks.blocks_needed(seq.num_computed_tokens + count) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.blocks.num_free_blocks:
            return False
        seq.block_table.extend(self.blocks.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed_tokens, seq.num_named_blocks = [], 0, 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

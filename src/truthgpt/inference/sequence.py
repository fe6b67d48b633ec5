"""One sequence the engine is generating: its tokens, its blocks and how far the model has got.

A request with `n` samples owns n sequences; they share the prompt's blocks through the prefix
cache. Plain state, changed only by the scheduler (blocks, progress) and the engine (tokens).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from truthgpt.inference.detokenizer import IncrementalDetokenizer
    from truthgpt.inference.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_len: int
    token_ids: list[int]  # prompt then output, one list so blocks hash without copies
    params: SamplingParams
    seed: int  # every sequence has one (drawn for unseeded requests) so sampling is per row
    max_tokens: int  # params.max_tokens, capped by the context length
    detokenizer: IncrementalDetokenizer | None  # None: decode once at the end
    arrival_time: float
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool (or will be after the step)
    num_named_blocks: int = 0  # leading blocks already registered in the prefix cache
    prefix_hash: int | None = None  # chained hash of those blocks (kv_cache.block_hash)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    logprobs: list[dict] = field(default_factory=list)
    # Of prompt tokens 1.. (token 0 has nothing before it); filled by sample 0 only.
    prompt_logprobs: list[dict] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Sample 0 of a request that asked for prompt logprobs, until it has them all: its
        prompt is computed from the start (a prefix-cache hit would skip the logits)."""
        return (
            self.params.prompt_logprobs is not None
            and self.index == 0
            and len(self.prompt_logprobs) < self.prompt_len - 1
        )

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

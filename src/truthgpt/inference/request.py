"""What the engine hands back per request and step: plain dataclasses, safe to send anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of a request's n samples. `delta_*`: what this step added (what a stream sends);
    `token_ids`: every output token so far; `text`: the whole text, once finished."""

    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # per token: {"token_id", "logprob", "top": [(id, lp)]}, and "text_offset" (where its text
    # starts in `text`) when the request is detokenized
    logprobs: list[dict] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt: str | None = None
    # When asked for (SamplingParams.prompt_logprobs): one entry per prompt token, None first.
    prompt_logprobs: list[dict | None] | None = None

    @property
    def time_to_first_token_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

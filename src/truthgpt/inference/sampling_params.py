"""What one generation request asks of the sampler and the detokenizer, validated once.

The names and meanings follow the OpenAI API and vLLM, so a request body maps onto the fields
one to one; every bad value is a `RequestError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from truthgpt.errors import RequestError

# The OpenAI API caps top_logprobs at 20; more would also make every step copy a wide tensor.
MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    # bool is a subclass of int in Python; `max_tokens=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bad(field: str, value: Any, allowed: str) -> RequestError:
    return RequestError(f"{field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings of one request (OpenAI / vLLM semantics)."""

    max_tokens: int = 128  # new tokens at most
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    # HF semantics over prompt and output tokens: logit / p when positive, logit * p otherwise.
    repetition_penalty: float = 1.0
    # OpenAI semantics over output tokens: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1  # completions per prompt
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the top k
    # vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it, plus the
    # top k there (what `echo` with `logprobs` returns, and how eval harnesses score a text).
    prompt_logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise _bad("temperature", self.temperature, "a number >= 0 (0 is greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "an integer >= 1, or 0 or -1 for off")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 is off)")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not _is_number(value) or not -2 <= value <= 2:
                raise _bad(field, value, "in [-2, 2]")
        # The sampler keeps seeds in an int64 tensor.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise _bad("seed", self.seed, "an integer in [-2**63, 2**63) or empty")
        if not _is_int(self.n) or self.n < 1:
            raise _bad("n", self.n, "an integer >= 1")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _bad("logprobs", self.logprobs, f"an integer in [0, {MAX_LOGPROBS}] or empty")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            allowed = f"an integer in [0, {MAX_LOGPROBS}] or empty"
            raise _bad("prompt_logprobs", self.prompt_logprobs, allowed)
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))
        for field in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise _bad(field, value, "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _stop_strings(stop: Any) -> tuple[str, ...]:
    # The OpenAI API takes one string or a list of them.
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise _bad("stop", stop, "a string or a list of strings")
    for item in items:
        if not isinstance(item, str):
            raise RequestError(
                f"stop must hold only strings, got {item!r} of type {type(item).__name__}"
            )
        if not item:
            # An empty stop string would match before the first token and end every request.
            raise RequestError("stop must not hold an empty string, got ''")
    return tuple(items)


def _stop_token_ids(ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)):
        raise _bad("stop_token_ids", ids, "a list of token ids (integers >= 0)")
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise RequestError(
                f"stop_token_ids must hold token ids (integers >= 0), got {token_id!r}"
            )
    return tuple(ids)

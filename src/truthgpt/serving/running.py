"""Running one API request on the engine: admission against the queue bounds, the result
cache, the merged outputs of its prompts, and the answer as one JSON body or an SSE stream.

A stream is opened only once its first token exists, so an error that the engine finds (a
request too big for the KV pool) is still a plain HTTP error. A client that goes away (stream or
plain request) aborts its engine requests at once, freeing their KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from truthgpt.config import InferenceConfig, ServeConfig
from truthgpt.errors import RequestError
from truthgpt.inference.async_engine import EngineDeadError, EngineStartingError, FrontEnd
from truthgpt.inference.request import RequestOutput
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.serving.metrics import Metrics
from truthgpt.serving.protocol import APIError
from truthgpt.serving.responses import (
    Choice,
    Delta,
    Reply,
    TokenText,
    prompt_entries,
    prompt_offsets,
    sse,
    usage,
)

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the engine, the tokenizer, the limits, the counters."""

    engine: FrontEnd  # AsyncEngine (a thread) or EngineProcess
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    settings: ServeConfig
    # Sampling defaults for the fields a request leaves out: the run's own inference: section.
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    api_key: str | None = None
    cache: Any = None  # serving.result_cache.ResultCache when serve.result_cache is on
    model_fingerprint: str = ""  # changes when the weights do (keys the result cache)
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0  # admitted requests not yet answered
    runs: set = field(default_factory=set)  # their _Runs, for end_runs
    waiting_tokens: int = 0  # prompt tokens of admitted requests with no first token yet
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))  # /v1/models' "created"

    def __post_init__(self) -> None:
        self.max_model_len = self.engine.max_model_len
        self.max_running = self.engine.max_num_seqs
        self.token_text = TokenText(self.tokenizer)


def _admit(state: ServerState, prompt_tokens: int) -> None:
    settings = state.settings
    if state.draining:
        raise APIError(503, "the server is shutting down", kind="server_error")
    full = state.in_flight >= state.max_running + settings.max_queued_requests
    if full or state.waiting_tokens + prompt_tokens > settings.max_queued_tokens:
        raise APIError(
            429,
            "the server is at capacity; retry shortly",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


def end_runs(state: ServerState, error: APIError) -> None:
    """End every request in flight with `error` (an error event and [DONE] in a stream), as a
    request past its timeout ends: at shutdown, rather than having uvicorn cancel their tasks."""
    for run in list(state.runs):
        run.fail(error)


async def respond(
    request, state, body, ids, params, reply, endpoint, echo=None, score_only=False
) -> Response:
    """`echo`: each prompt's text, sent before its choices' output; `score_only`: max_tokens 0
    (the engine makes one token, which the answer leaves out)."""
    prompt_tokens = sum(len(prompt) for prompt in ids)
    options = body.stream_options if body.stream else None
    include_usage = bool(options and options.include_usage)
    # vLLM's extension: usage in every chunk too, the tokens of the chunk's choice so far.
    continuous_usage = include_usage and options.continuous_usage_stats
    # The echoed text itself, not only whether: one prompt as text and as ids has the same ids
    # but echoes differently when the tokenizer adds a BOS ("hi" and "<s>hi").
    fields = {"echo": echo, "score_only": score_only}
    # A replay from the cache has no counts as the tokens came: continuous usage is generated.
    cache_key = None if continuous_usage else _cache_key(state, endpoint, ids, params, fields)
    if cache_key is not None:
        cached = await asyncio.to_thread(state.cache.get, cache_key)
        if cached is not None:
            state.metrics.cache_hits.inc()
            return _from_cache(body, reply, cached)
        state.metrics.cache_misses.inc()
    _admit(state, prompt_tokens)
    run = _Run(state, ids, params, reply, echo, score_only)
    try:
        # A client that leaves while its request waits for a sequence ends it before it runs.
        present, first = await _unless_client_leaves(request, run.first())
    except BaseException:
        run.close()
        raise
    if not present:
        run.close()
        return Response(status_code=499)
    if body.stream:
        return StreamingResponse(
            _stream(run, first, include_usage, continuous_usage, cache_key),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        present, _ = await _unless_client_leaves(request, run.drain(first))
        if not present:
            return Response(status_code=499)  # nobody is listening; the sequences are freed
    finally:
        run.close()
    response = reply.final(run.choices, prompt_tokens)
    if cache_key is not None:
        await asyncio.to_thread(state.cache.put, cache_key, response)
    return JSONResponse(response)


async def _unless_client_leaves(request: Request, work: Awaitable) -> tuple[bool, Any]:
    """(True, what `work` returns, or its error raised), or (False, None) if the client
    disconnected first, which cancels it: the caller closes the run, which stops it at once
    rather than at max_tokens or the timeout."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return True, task.result()
            if await request.is_disconnected():
                return False, None
    finally:
        task.cancel()


def _cache_key(state, endpoint: str, ids, params: SamplingParams, shape: dict) -> str | None:
    """The result cache's key of a deterministic single-prompt request, else None. The model
    part is the served id plus a fingerprint of the weights, so a retrained model never answers
    from its predecessor's entries."""
    if state.cache is None or len(ids) != 1:
        return None
    from dataclasses import asdict

    from truthgpt.serving.result_cache import cache_key, is_deterministic

    fields = {"endpoint": endpoint, **shape, **asdict(params)}
    if not is_deterministic(fields):
        return None
    return cache_key(f"{state.model_id}@{state.model_fingerprint}", ids[0], fields)


def _from_cache(body, reply: Reply, cached: dict) -> Response:
    """A cached response under this request's own id and time (streamed if it asked)."""
    response = {**cached, "id": reply.id, "created": reply.created}
    if not body.stream:
        return JSONResponse(response)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for row in response["choices"]:
            choice = Choice(row["index"], finish_reason=row["finish_reason"])
            text = row["message"]["content"] if reply.chat else row["text"]
            chunk = reply.chunk(choice, Delta(text), first=True)
            if reply.want_logprobs:
                chunk["choices"][0]["logprobs"] = row["logprobs"]
            yield sse(chunk)
        if include_usage:
            yield sse({**reply.usage_chunk([], 0), "usage": response["usage"]})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


class _Run:
    """One HTTP request's engine requests (one per prompt), merged into one event queue."""

    def __init__(
        self,
        state: ServerState,
        ids,
        params: SamplingParams,
        reply: Reply,
        echo: list[str] | None = None,
        score_only: bool = False,
    ) -> None:
        self.state = state
        self.reply = reply
        self.params = params
        self.prompt_lengths = [len(prompt) for prompt in ids]
        self.prompt_tokens = sum(self.prompt_lengths)
        self.choices = [
            Choice(i, echo=echo[i // params.n] if echo else "", score_only=score_only)
            for i in range(len(ids) * params.n)
        ]
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        self.last_token: dict[int, float] = {}
        self.waiting = True
        state.in_flight += 1
        state.waiting_tokens += self.prompt_tokens
        state.metrics.prompt_tokens.inc(self.prompt_tokens)
        # The engine calls back on this loop (no task per prompt); a timer ends a request
        # that runs past its deadline.
        loop = asyncio.get_running_loop()
        self.request_ids = [f"{reply.id}-{index}" for index in range(len(ids))]
        self.done = [False] * len(ids)
        self.timer = loop.call_later(state.settings.request_timeout_s, self._expire)
        self.pending = len(ids)
        self.closed = False
        state.runs.add(self)
        try:
            for index, (request_id, prompt) in enumerate(zip(self.request_ids, ids)):
                deliver = functools.partial(self._deliver, index)
                state.engine.submit(request_id, prompt, params, deliver, loop)
        except BaseException:  # counted above: uncount it, and abort the prompts submitted
            self.close()
            raise

    def _deliver(self, index: int, item: RequestOutput | BaseException) -> None:
        self.events.put_nowait((index, item))
        if isinstance(item, BaseException) or item.finished:
            self.done[index] = True
            if not isinstance(item, BaseException):
                self.events.put_nowait((index, None))

    def _expire(self) -> None:
        limit = self.state.settings.request_timeout_s
        message = f"the request ran past serve.request_timeout_s ({limit} s)"
        self.fail(APIError(504, message, kind="timeout_error"))

    def fail(self, error: APIError) -> None:
        """End this request with `error`, raised by the next `next` or `poll`."""
        self.events.put_nowait((-1, error))

    async def next(self) -> tuple[int, RequestOutput | None]:
        """The next engine output (None: a prompt is done); raises the engine's errors."""
        return self._take(*await self.events.get())

    def poll(self) -> tuple[int, RequestOutput | None] | None:
        """`next` without waiting: None when nothing is queued."""
        try:
            return self._take(*self.events.get_nowait())
        except asyncio.QueueEmpty:
            return None

    def _take(self, index: int, item) -> tuple[int, RequestOutput | None]:
        if isinstance(item, APIError):
            raise item
        if isinstance(item, EngineStartingError):
            raise APIError(
                503, str(item), kind="server_error", code="engine_starting",
                headers={"Retry-After": "5"},
            )  # fmt: skip
        if isinstance(item, EngineDeadError):
            raise APIError(500, str(item), kind="server_error", code="engine_error")
        if isinstance(item, RequestError):
            raise APIError(400, str(item))
        if isinstance(item, BaseException):
            raise APIError(500, f"generation failed: {item}", kind="server_error")
        if item is not None:
            self._observe(index, item)
        return index, item

    def _observe(self, index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        if self.waiting:
            self.waiting = False
            self.state.waiting_tokens -= self.prompt_tokens
            metrics.ttft.observe(now - self.started)
        for out in output.outputs:
            choice = self.choices[index * self.params.n + out.index]
            new_tokens = len(out.token_ids) - choice.num_tokens
            if new_tokens > 0:
                key = choice.index
                if key in self.last_token:
                    metrics.itl.observe((now - self.last_token[key]) / new_tokens)
                self.last_token[key] = now
                metrics.generation_tokens.inc(new_tokens)
            choice.update(out)
            if output.prompt_logprobs is not None and choice.prompt_logprobs is None:
                choice.prompt_logprobs = prompt_entries(
                    output.prompt_token_ids, output.prompt_logprobs
                )
                choice.prompt_offsets = prompt_offsets(
                    self.state.tokenizer, output.prompt_token_ids, choice.echo
                )

    async def first(self) -> tuple[int, RequestOutput | None]:
        return await self.next()

    async def drain(self, first) -> None:
        item = first
        while True:
            if item[1] is None:
                self.pending -= 1
                if self.pending == 0:
                    return
            item = await self.next()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Synchronous on purpose: when a client disconnects this runs in a cancelled scope.
        if self.waiting:
            self.waiting = False
            self.state.waiting_tokens -= self.prompt_tokens
        self.state.in_flight -= 1
        self.state.runs.discard(self)
        self.timer.cancel()
        for request_id, done in zip(self.request_ids, self.done):
            if not done:  # the client left or an error ended the run: free its KV blocks now
                self.state.engine.abort(request_id)


async def _stream(
    run: _Run, first, include_usage: bool, continuous_usage: bool, cache_key
) -> AsyncIterator[str]:
    """SSE events: each wake-up takes every output already queued and sends one chunk per
    choice that changed. Under load a chunk then carries several tokens, so the event loop's
    work per second stays bounded instead of falling behind the engine one token at a time.
    `continuous_usage`: each chunk also carries the usage of its choice so far (vLLM's)."""
    reply, started, ended = run.reply, set(), set()
    item = first
    try:
        while True:
            touched: dict[int, Choice] = {}
            while True:  # this output and everything queued behind it
                index, output = item
                if output is None:
                    run.pending -= 1
                else:
                    for out in output.outputs:
                        choice = run.choices[index * run.params.n + out.index]
                        touched[choice.index] = choice
                item = run.poll()
                if item is None:
                    break
            for choice in touched.values():
                delta = choice.take_delta()
                ends = choice.finish_reason is not None and choice.index not in ended
                if delta.text or delta.logprobs or ends or choice.index not in started:
                    first = choice.index not in started
                    if continuous_usage:
                        chunk = reply.chunk(choice, delta, first)
                        prompt = run.prompt_lengths[choice.index // run.params.n]
                        chunk["usage"] = usage(prompt, [choice])
                        yield sse(chunk)
                    else:
                        yield reply.chunk_event(choice, delta, first)
                    started.add(choice.index)
                    if ends:
                        ended.add(choice.index)
            if run.pending == 0:
                break
            item = await run.next()
        if include_usage:
            yield sse(reply.usage_chunk(run.choices, run.prompt_tokens))
        yield sse("[DONE]")
        if cache_key is not None:
            response = reply.final(run.choices, run.prompt_tokens)
            await asyncio.to_thread(run.state.cache.put, cache_key, response)
    except APIError as exc:  # headers are sent: the error goes in the stream, then [DONE]
        yield sse(exc.body())
        yield sse("[DONE]")
    except Exception:  # a bug: logged, and the client still sees an error and the stream's end
        log.exception("a stream failed")
        yield sse(APIError(500, "internal server error", kind="server_error").body())
        yield sse("[DONE]")
    finally:
        run.close()

"""The OpenAI-compatible HTTP API (FastAPI) over the engine's asyncio front end.

Every request is checked before it reaches the engine (body size, JSON, field types and
ranges, model id, prompt length against the context, queue room), and every failure is a 4xx
or 5xx with an OpenAI error body; nothing a request carries reaches the filesystem. A stream
is opened only once its first token exists, so an error that the engine finds (a request too
big for the KV pool) is still a plain HTTP error, not a broken stream. A client that goes away
cancels its handler, which aborts its engine requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from truthgpt.config import ServeConfig
from truthgpt.errors import RequestError
from truthgpt.inference.async_engine import AsyncEngine, EngineDeadError
from truthgpt.inference.request import RequestOutput
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.serving.metrics import Metrics
from truthgpt.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from truthgpt.serving.responses import Choice, Reply, TokenText, sse

log = logging.getLogger(__name__)

# Used when the tokenizer has none (models trained with task: causal_lm): plain role headers.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ServerState:
    """What the routes share: the engine, the tokenizer, the limits, the counters."""

    engine: AsyncEngine
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    settings: ServeConfig
    api_key: str | None = None
    cache: Any = None  # serving.result_cache.ResultCache when serve.result_cache is on
    model_fingerprint: str = ""  # changes when the weights do (keys the result cache)
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0  # admitted requests not yet answered
    waiting_tokens: int = 0  # prompt tokens of admitted requests with no first token yet
    draining: bool = False

    def __post_init__(self) -> None:
        self.max_model_len = self.engine.engine.max_model_len
        self.max_running = self.engine.engine.options.max_num_seqs
        self.token_text = TokenText(self.tokenizer)


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        watchdog = asyncio.create_task(_watch_engine(state))
        try:
            yield
        finally:
            state.draining = True
            watchdog.cancel()

    app = FastAPI(
        title="truthgpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.serve = state
    app.add_middleware(_Guard, state=state)
    if state.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(404)
    async def not_found(request: Request, _exc) -> JSONResponse:
        return _error_response(APIError(404, f"no route {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, _exc) -> JSONResponse:
        message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(APIError(405, message, code="method_not_allowed"))

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = state.engine
        if not engine.is_alive:
            return JSONResponse({"status": "engine loop is down"}, status_code=503)
        if engine.stalled(state.settings.stall_after_s):
            return JSONResponse({"status": "engine loop is stalled"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(
            state.engine.engine.stats(), state.in_flight, state.engine.restarts
        )
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "truthgpt",
                    "max_model_len": state.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await _read_json(request, state))
        _check_model(body.model, state)
        prompts = body.prompts()
        ids = [await _tokens(state, prompt, "prompt") for prompt in prompts]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
        logprobs = body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        params = _sampling(body, ids, max_tokens, logprobs, state)
        reply = Reply(state.model_id, False, logprobs is not None, state.token_text)
        return await _respond(request, state, body, ids, params, reply, echo, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatCompletionRequest, await _read_json(request, state))
        _check_model(body.model, state)
        text = _chat_text(state.tokenizer, body)
        ids = [await _tokens(state, text, "messages")]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(body, ids, body.wanted_max_tokens(), logprobs, state)
        reply = Reply(state.model_id, True, logprobs is not None, state.token_text)
        return await _respond(request, state, body, ids, params, reply, None, "chat")

    return app


async def _watch_engine(state: ServerState, every_s: float = 0.5) -> None:
    """Restart the engine loop if it died: its requests get a 500, new ones are served again."""
    while True:
        await asyncio.sleep(every_s)
        if not state.engine.is_alive and state.engine.restart():
            log.error("the engine loop died; restarted it (restart %d)", state.engine.restarts)


# -- checks ---------------------------------------------------------------------------------------


_COUNTED_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})


class _Guard:
    """API key on every route but /health, and request counts by status (plain ASGI, so
    streams and client disconnects pass through untouched)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        # Known routes only: a label per path a client invents would grow /metrics forever.
        counted = path in _COUNTED_ROUTES
        if path != "/health" and self.state.api_key is not None:
            header = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"),
                "",
            )
            try:
                _check_key(header, self.state.api_key)
            except APIError as exc:
                if counted:
                    self.state.metrics.requests.labels(path, str(exc.status)).inc()
                await _error_response(exc)(scope, receive, send)
                return

        async def counting_send(message) -> None:
            if counted and message["type"] == "http.response.start":
                self.state.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _check_key(header: str, key: str) -> None:
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell an attacker how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(
            401,
            "a valid API key is required: send the header Authorization: Bearer <key>",
            kind="authentication_error",
            code="invalid_api_key",
        )


async def _read_json(request: Request, state: ServerState) -> Any:
    import json

    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    # RecursionError: a kB of nested brackets exhausts json's recursion (was a bare 500).
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None


def _check_model(model: str | None, state: ServerState) -> None:
    if model is not None and model != state.model_id:
        raise APIError(
            404,
            f"the model {model!r} does not exist here; this server serves {state.model_id!r}",
            param="model",
            code="model_not_found",
        )


async def _tokens(state: ServerState, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        # Long prompts take a while to tokenize: off the event loop, so others keep streaming.
        ids = await asyncio.to_thread(state.tokenizer.encode, prompt)
    else:
        ids = list(prompt)
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        vocab = len(state.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            message = f"{param}: token ids must be in [0, {vocab}), got {bad}"
            raise APIError(400, message, param=param)
    if len(ids) >= state.max_model_len:
        raise APIError(
            400,
            f"{param}: the prompt has {len(ids)} tokens; this model's context is "
            f"{state.max_model_len} tokens (prompt + output), so at most "
            f"{state.max_model_len - 1} fit",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def _sampling(body, ids: list[list[int]], max_tokens, logprobs, state) -> SamplingParams:
    room = state.max_model_len - max(len(prompt) for prompt in ids)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else None
        name = name or "max_tokens"
        raise APIError(
            400,
            f"{name} is {max_tokens}, but the prompt takes {state.max_model_len - room} of the "
            f"model's {state.max_model_len} tokens: at most {room} more fit",
            param=name,
            code="context_length_exceeded",
        )
    return body.sampling(max_tokens, logprobs)


def _chat_text(tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=False,
        )
    except Exception as exc:  # a template may reject a conversation (roles out of order...)
        message = f"messages: the chat template refused them: {exc}"
        raise APIError(400, message, param="messages") from None


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


# -- running a request ----------------------------------------------------------------------------


async def _respond(request, state, body, ids, params, reply, echo, endpoint) -> Response:
    prompt_tokens = sum(len(prompt) for prompt in ids)
    cache_key = _cache_key(state, endpoint, ids, params, echo is not None)
    if cache_key is not None:
        cached = await asyncio.to_thread(state.cache.get, cache_key)
        if cached is not None:
            state.metrics.cache_hits.inc()
            return _from_cache(body, reply, cached)
        state.metrics.cache_misses.inc()
    _admit(state, prompt_tokens)
    run = _Run(state, ids, params, reply)
    try:
        first = await run.first()
    except BaseException:
        run.close()
        raise
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return StreamingResponse(
            _stream(run, first, include_usage, cache_key),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        if not await _drain_unless_client_leaves(request, run, first):
            return Response(status_code=499)  # nobody is listening; the sequences are freed
    finally:
        run.close()
    response = reply.final(run.choices, prompt_tokens, echo)
    if cache_key is not None:
        await asyncio.to_thread(state.cache.put, cache_key, response)
    return JSONResponse(response)


async def _drain_unless_client_leaves(request: Request, run: _Run, first) -> bool:
    """Run a plain (non-streamed) request to its end; False if the client disconnected first,
    which stops it at once rather than at max_tokens or the timeout."""
    drain = asyncio.ensure_future(run.drain(first))
    try:
        while True:
            done, _ = await asyncio.wait({drain}, timeout=0.25)
            if done:
                drain.result()  # the request's own error, if it ended in one
                return True
            if await request.is_disconnected():
                return False
    finally:
        drain.cancel()


def _cache_key(state, endpoint: str, ids, params: SamplingParams, echo: bool) -> str | None:
    """The result cache's key of a deterministic single-prompt request, else None. The model
    part is the served id plus a fingerprint of the weights, so a retrained model never answers
    from its predecessor's entries."""
    if state.cache is None or len(ids) != 1:
        return None
    from dataclasses import asdict

    from truthgpt.serving.result_cache import cache_key, is_deterministic

    fields = {"endpoint": endpoint, "echo": echo, **asdict(params)}
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
            chunk = reply.chunk(choice, text, [], first=True)
            if reply.want_logprobs:
                chunk["choices"][0]["logprobs"] = row["logprobs"]
            yield sse(chunk)
        if include_usage:
            yield sse({**reply.usage_chunk([], 0), "usage": response["usage"]})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


class _Run:
    """One HTTP request's engine requests (one per prompt), merged into one event queue."""

    def __init__(self, state: ServerState, ids, params: SamplingParams, reply: Reply) -> None:
        self.state = state
        self.reply = reply
        self.params = params
        self.prompt_tokens = sum(len(prompt) for prompt in ids)
        self.choices = [Choice(i) for i in range(len(ids) * params.n)]
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
        for index, (request_id, prompt) in enumerate(zip(self.request_ids, ids)):
            deliver = functools.partial(self._deliver, index)
            state.engine.submit(request_id, prompt, params, deliver, loop)
        self.timer = loop.call_later(state.settings.request_timeout_s, self._expire)
        self.pending = len(ids)
        self.closed = False

    def _deliver(self, index: int, item: RequestOutput | BaseException) -> None:
        self.events.put_nowait((index, item))
        if isinstance(item, BaseException) or item.finished:
            self.done[index] = True
            if not isinstance(item, BaseException):
                self.events.put_nowait((index, None))

    def _expire(self) -> None:
        limit = self.state.settings.request_timeout_s
        message = f"the request ran past serve.request_timeout_s ({limit} s)"
        self.events.put_nowait((-1, APIError(504, message, kind="timeout_error")))

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
        self.timer.cancel()
        for request_id, done in zip(self.request_ids, self.done):
            if not done:  # the client left or an error ended the run: free its KV blocks now
                self.state.engine.abort(request_id)


async def _stream(run: _Run, first, include_usage: bool, cache_key) -> AsyncIterator[str]:
    """SSE events: each wake-up takes every output already queued and sends one chunk per
    choice that changed. Under load a chunk then carries several tokens, so the event loop's
    work per second stays bounded instead of falling behind the engine one token at a time."""
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
                text, logprobs = choice.take_delta()
                ends = choice.finish_reason is not None and choice.index not in ended
                if text or logprobs or ends or choice.index not in started:
                    yield sse(reply.chunk(choice, text, logprobs, choice.index not in started))
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
            response = reply.final(run.choices, run.prompt_tokens, None)
            await asyncio.to_thread(run.state.cache.put, cache_key, response)
    except APIError as exc:  # headers are sent: the error goes in the stream, then [DONE]
        yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        run.close()

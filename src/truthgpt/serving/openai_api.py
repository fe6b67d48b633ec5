"""The OpenAI-compatible HTTP API (FastAPI) over the engine's asyncio front end: routes, the
API key, and the checks every request passes before it reaches the engine (body size, JSON,
field types and ranges, model id, prompt length against the context). Every failure is a 4xx or
5xx with an OpenAI error body; nothing a request carries reaches the filesystem. Running an
admitted request is `running.py`'s."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from transformers import PreTrainedTokenizerBase

from truthgpt.errors import RequestError
from truthgpt.inference.chat_template import chat_text
from truthgpt.inference.engine import check_prompt_text
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from truthgpt.serving.responses import Reply
from truthgpt.serving.running import ServerState, respond

log = logging.getLogger(__name__)


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
        if not engine.ready:
            return JSONResponse({"status": "engine is loading"}, status_code=503)
        if engine.stalled(state.settings.stall_after_s):
            return JSONResponse({"status": "engine loop is stalled"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(state.engine.stats(), state.in_flight, state.engine.restarts)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {
            "id": state.model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "truthgpt",
            "max_model_len": state.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, state)  # compared with the served id only, never a path
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await _read_json(request, state))
        _check_model(body.model, state)
        prompts = body.prompts()
        # In a batch, an error names the prompt: "prompt.3".
        names = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
        ids = [await _tokens(state, prompt, name) for prompt, name in zip(prompts, names)]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
        logprobs = body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        # With echo, logprobs cover the prompt too: how eval harnesses score a text.
        scored = logprobs if echo is not None else None
        params = _sampling(body, ids, max(max_tokens, 1), logprobs, state, scored)
        reply = Reply(state.model_id, False, logprobs is not None, state.token_text)
        return await respond(
            request, state, body, ids, params, reply, "completions", echo, max_tokens == 0
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatCompletionRequest, await _read_json(request, state))
        _check_model(body.model, state)
        text = _chat_text(state.tokenizer, body)
        ids = [await _tokens(state, text, "messages", special=False)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(body, ids, body.wanted_max_tokens(), logprobs, state)
        reply = Reply(state.model_id, True, logprobs is not None, state.token_text)
        return await respond(request, state, body, ids, params, reply, "chat")

    # vLLM's tokenizer routes: with them an eval harness needs no local copy of the tokenizer
    # (lm-evaluation-harness's `local-completions` looks for /tokenizer_info and /tokenize).
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = parse(TokenizeRequest, await _read_json(request, state))
        _check_model(body.model, state)
        # The defaults are what the chat and completions routes do (vLLM's defaults too).
        if body.messages is not None:
            text, special = _chat_text(state.tokenizer, body), False
        else:
            text, special = body.prompt, True
            _check_text(text, "prompt")
        if body.add_special_tokens is not None:
            special = body.add_special_tokens
        ids = await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=special)
        reply: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": state.max_model_len,
            "tokens": ids,
        }
        if body.return_token_strs:
            reply["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
        return reply

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = parse(DetokenizeRequest, await _read_json(request, state))
        _check_model(body.model, state)
        _check_ids(body.tokens, state, "tokens")
        return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tokenizer = state.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": state.max_model_len,
            "vocab_size": len(tokenizer),
        }

    return app


async def _watch_engine(state: ServerState, every_s: float = 0.5) -> None:
    """Restart the engine loop if it died: its requests get a 500, new ones are served again."""
    while True:
        await asyncio.sleep(every_s)
        if not state.engine.is_alive and state.engine.restart():
            log.error("the engine loop died; restarted it (restart %d)", state.engine.restarts)


# -- checks ---------------------------------------------------------------------------------------


_COUNTED_ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
)


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

        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if counted:
                    self.state.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # A bug, not a bad request: the traceback goes to the log once, and the client gets
            # an OpenAI error body, counted, instead of Starlette's plain-text 500 (which is sent
            # outside this middleware, so /metrics never saw it).
            log.exception("%s %s failed", scope["method"], path)
            if not started:
                await _error_response(INTERNAL_ERROR)(scope, receive, counting_send)


INTERNAL_ERROR = APIError(
    500, "internal server error; the server's log has the details", kind="server_error"
)


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


async def _tokens(
    state: ServerState, prompt: str | list[int], param: str, special: bool = True
) -> list[int]:
    """A prompt's ids, checked against the vocabulary and the context. `special`: let the
    tokenizer add its special tokens (BOS) to a text; a chat text has the template's own."""
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        _check_text(prompt, param)
        # Long prompts take a while to tokenize: off the event loop, so others keep streaming.
        encode = state.tokenizer.encode
        ids = await asyncio.to_thread(encode, prompt, add_special_tokens=special)
    else:
        ids = list(prompt)
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        _check_ids(ids, state, param)
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


def _check_ids(ids: list[int], state: ServerState, param: str) -> None:
    vocab = len(state.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        message = f"{param}: token ids must be in [0, {vocab}), got {bad}"
        raise APIError(400, message, param=param)


def _sampling(
    body, ids: list[list[int]], max_tokens, logprobs, state, prompt_logprobs=None
) -> SamplingParams:
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
    return body.sampling(max_tokens, logprobs, state.inference, prompt_logprobs)


def _check_text(text: str, param: str) -> None:
    try:
        check_prompt_text(text, param)
    except RequestError as exc:
        raise APIError(400, str(exc), param=param) from None


def _chat_text(tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    for index, message in enumerate(messages):  # named here: the template joins them all
        _check_text(message["content"], f"messages.{index}.content")
    try:
        return chat_text(tokenizer, messages, body.add_generation_prompt)
    except Exception as exc:  # a template may reject a conversation (roles out of order...)
        message = f"messages: the chat template refused them: {exc}"
        raise APIError(400, message, param="messages") from None

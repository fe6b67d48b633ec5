"""The server under bad input and a failing engine, over raw HTTP: every bad request is a 4xx with
an OpenAI error body naming its field, every engine fault a 5xx (or an error event in a stream
that has started), and afterwards the server answers the next request as if nothing happened.

Faults are injected by wrapping the real engine's `step` (a SystemExit, an exception, a stall);
the rest is the real server on loopback, a tiny random Llama on the CPU."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from serving_fixtures import (
    CONTEXT,
    add_peft_adapter,
    free_port,
    make_model_folder,
    metric_values,
    start_server,
    wait_until_idle,
)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
LONG_TEXT = "def " * CONTEXT  # several tokens a word: far past the context
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(folder):
    running = start_server(folder)
    yield running
    running.stop()


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error body, checked for shape: exactly message, type, param and code."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def case(path, body, param, says=None, status=400, code=None, *, id):
    """One bad request: what it sends, the status and the field its error must name."""
    return pytest.param(path, body, status, param, code, says or param, id=id)


BAD_REQUESTS = [
    # The body itself.
    case(COMPLETIONS, b'{"prompt": "a",', None, "not valid JSON", id="bad-json"),
    case(COMPLETIONS, b"\xff\xfe{}", None, "not valid JSON", id="not-utf8"),
    case(COMPLETIONS, b'["prompt", "a"]', None, "JSON object", id="body-list"),
    case(CHAT, b'"hello"', None, "JSON object", id="body-string"),
    case(CHAT, b"null", None, "JSON object", id="body-null"),
    case(COMPLETIONS, b"[" * 100_000, None, "not valid JSON", id="deep-nesting"),
    case(CHAT, b'{"messages": ' + b"[" * 5000, None, "not valid JSON", id="deep-field"),
    # Wrong types: strict, a string is not a number and true is not 1.
    case(COMPLETIONS, {"prompt": "a", "max_tokens": "5"}, "max_tokens", id="max_tokens-str"),
    case(CHAT, {"messages": HI, "max_tokens": "5"}, "max_tokens", id="chat-max_tokens-str"),
    case(COMPLETIONS, {"prompt": "a", "temperature": "hot"}, "temperature", id="temperature-str"),
    case(COMPLETIONS, {"prompt": "a", "stream": 1}, "stream", id="stream-int"),
    case(CHAT, {"messages": HI, "stream": "yes"}, "stream", id="chat-stream-str"),
    case(COMPLETIONS, {"prompt": "a", "n": True}, "n", id="n-bool"),
    case(COMPLETIONS, {"prompt": 5}, "prompt", id="prompt-int"),
    # A union field says every shape it takes, not only its first ("should be a valid string").
    case(
        COMPLETIONS,
        {"prompt": ["def", 1]},
        "prompt",
        "prompt must be a string, a list of strings, a list of token ids (integers) or a list of "
        "lists of token ids (got ['def', 1])",
        id="prompt-mixed-list",
    ),
    case(CHAT, {"messages": "hi"}, "messages", id="messages-str"),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": 5}]},
        "messages.0.content",
        "messages.0.content must be a string or a list of parts",
        id="content-int",
    ),
    # Missing or empty.
    case(COMPLETIONS, {"max_tokens": 5}, "prompt", "prompt is required", id="no-prompt"),
    case(CHAT, {"max_tokens": 5}, "messages", "messages is required", id="no-messages"),
    case(CHAT, {"messages": []}, "messages", id="messages-empty"),
    case(CHAT, {"messages": [{"content": "hi"}]}, "messages.0.role", id="no-role"),
    case(CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", id="role"),
    case(COMPLETIONS, {"prompt": ""}, "prompt", id="prompt-empty-str"),
    case(COMPLETIONS, {"prompt": []}, "prompt", id="prompt-empty-list"),
    case(COMPLETIONS, {"prompt": [[]]}, "prompt", "prompt is empty", id="prompt-empty-ids"),
    # Longer than the context (256 tokens), or token ids out of the vocabulary.
    case(COMPLETIONS, {"prompt": LONG_TEXT}, "prompt", code="context_length_exceeded", id="long"),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": LONG_TEXT}]},
        "messages",
        code="context_length_exceeded",
        id="chat-long",
    ),
    case(
        COMPLETIONS,
        {"prompt": [1] * CONTEXT},
        "prompt",
        code="context_length_exceeded",
        id="long-ids",
    ),
    case(COMPLETIONS, {"prompt": [1, 2, 10**6]}, "prompt", "1000000", id="id-past-vocab"),
    case(COMPLETIONS, {"prompt": [-1]}, "prompt", "-1", id="id-negative"),
    case(COMPLETIONS, {"prompt": [[1, 2], [3, 10**6]]}, "prompt.1", "1000000", id="ids-batch"),
    # max_tokens: at least 1, and it must fit beside the prompt.
    case(COMPLETIONS, {"prompt": "a", "max_tokens": 0}, "max_tokens", id="max_tokens-0"),
    case(COMPLETIONS, {"prompt": "a", "max_tokens": -3}, "max_tokens", id="max_tokens-neg"),
    case(CHAT, {"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens", id="mct-0"),
    case(
        COMPLETIONS,
        {"prompt": [1] * 200, "max_tokens": 100},
        "max_tokens",
        code="context_length_exceeded",
        id="max_tokens-no-room",
    ),
    case(
        CHAT,
        {"messages": HI, "max_completion_tokens": CONTEXT},
        "max_completion_tokens",
        code="context_length_exceeded",
        id="chat-no-room",
    ),
    # The model and the field names.
    case(
        COMPLETIONS,
        {"prompt": "a", "model": "gpt-4"},
        "model",
        "gpt-4",
        404,
        "model_not_found",
        id="model",
    ),
    case(
        CHAT,
        {"messages": HI, "model": "x"},
        "model",
        "'x'",
        404,
        "model_not_found",
        id="chat-model",
    ),
    case(
        COMPLETIONS,
        {"prompt": "a", "max_token": 5},
        "max_token",
        "unknown field 'max_token'; did you mean 'max_tokens'?",
        id="typo",
    ),
    case(CHAT, {"messages": HI, "max_token": 5}, "max_token", id="chat-typo"),
    case(
        CHAT,
        {"messages": HI, "stream": True, "stream_options": {"include_usag": True}},
        "stream_options.include_usag",
        "did you mean 'include_usage'?",
        id="stream_options-typo",
    ),
    # Inside messages too: a typo there would otherwise send an empty turn.
    case(
        CHAT,
        {"messages": [{"role": "user", "contnet": "hi"}]},
        "messages.0.contnet",
        "unknown field 'messages.0.contnet'; did you mean 'content'?",
        id="message-typo",
    ),
    case(
        CHAT,
        {"messages": [*HI, {"role": "user", "content": "hi", "foo": 1}]},
        "messages.1.foo",
        "unknown field 'messages.1.foo'",
        id="message-unknown",
    ),
    # Inside a content part: named down to the part and its key, not at messages.0.content.
    case(
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]}]},
        "messages.0.content.0.txt",
        "unknown field 'messages.0.content.0.txt'; did you mean 'text'?",
        id="content-part-typo",
    ),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "extra": 1}]}]},
        "messages.0.content.0.extra",
        id="content-part-unknown",
    ),
    case(
        CHAT,
        {
            "messages": [
                *HI,
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                },
            ]
        },
        "messages.1.content.1.type",
        "content parts of type 'image_url' are not supported: this server runs a text model",
        id="content-part-image",
    ),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]},
        "messages.0.content.0.type",
        "'text'",
        id="content-part-type",
    ),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "messages.0.content.0.type",
        "messages.0.content.0.type is required",
        id="content-part-no-type",
    ),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": ["hi"]}]},
        "messages.0.content.0",
        "must be an object",
        id="content-part-str",
    ),
    # A typo of a required field is the typo, not the field missing.
    case(
        COMPLETIONS,
        {"promt": "a"},
        "promt",
        "unknown field 'promt'; did you mean 'prompt'?",
        id="required-typo",
    ),
    case(
        CHAT,
        {"messages": [{"role": "user", "content": None}]},
        "messages.0.content",
        "messages.0.content is required in a user message",
        id="user-content-null",
    ),
    case(
        CHAT,
        {"messages": [{"role": "system"}, *HI]},
        "messages.0.content",
        "is required in a system message",
        id="system-content-missing",
    ),
    case(
        CHAT,
        {"messages": HI, "max_tokens": 2, "max_completion_tokens": 5},
        "max_completion_tokens",
        "give one",
        id="max_tokens-and-mct",
    ),
    case(
        COMPLETIONS,
        b'{"prompt": "a", "temperature": NaN}',
        "temperature",
        "temperature must be a finite number",
        id="temperature-nan",
    ),
    # Ranges.
    case(COMPLETIONS, {"prompt": "a", "top_p": 0}, "top_p", id="top_p-0"),
    case(COMPLETIONS, {"prompt": "a", "top_p": 1.5}, "top_p", id="top_p-big"),
    case(COMPLETIONS, {"prompt": "a", "temperature": -0.5}, "temperature", id="temperature-neg"),
    case(COMPLETIONS, {"prompt": "a", "n": 0}, "n", id="n-0"),
    case(CHAT, {"messages": HI, "n": 0}, "n", id="chat-n-0"),
    case(COMPLETIONS, {"prompt": "a", "logprobs": 21}, "logprobs", id="logprobs-21"),
    case(CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top21"),
    case(CHAT, {"messages": HI, "top_logprobs": 2}, "top_logprobs", id="top-without-logprobs"),
    case(
        COMPLETIONS,
        {"prompt": "a", "stop": [1]},
        "stop",
        "stop must be a string or a list of strings (got [1])",
        id="stop-int",
    ),
    case(CHAT, {"messages": HI, "stop": ["x", None]}, "stop", id="stop-null"),
    case(COMPLETIONS, {"prompt": "a", "stop": ""}, "stop", id="stop-empty"),
    case(CHAT, {"messages": HI, "stop": ["x", ""]}, "stop", id="stop-list-empty"),
    case(COMPLETIONS, {"prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids", id="stop-id"),
    # Features this server does not have are refused by name, not ignored.
    case(CHAT, {"messages": HI, "tools": [TOOL]}, "tools", id="tools"),
    case(
        CHAT,
        {"messages": HI, "response_format": {"type": "json_object"}},
        "response_format",
        "json_object",
        id="json-mode",
    ),
    case(COMPLETIONS, {"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias", id="logit_bias"),
    case(COMPLETIONS, {"prompt": "a", "suffix": "x"}, "suffix", id="suffix"),
    case(
        COMPLETIONS,
        {"prompt": "a", "stream_options": {"include_usage": True}},
        "stream_options",
        id="stream_options-without-stream",
    ),
]


@pytest.mark.parametrize("path,body,status,param,code,says", BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_naming_its_field(server, path, body, status, param, code, says):
    if isinstance(body, bytes):
        response = httpx.post(
            server.url + path, content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = httpx.post(server.url + path, json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param
    assert error["code"] == code
    assert says in error["message"]
    if status == 400:
        assert error["type"] == "invalid_request_error"
    # Refused before admission: nothing is left counted as running or waiting.
    assert server.state.in_flight == 0 and server.state.waiting_tokens == 0


def test_an_unknown_field_is_never_hinted_toward_a_field_already_given(server):
    # 'extra' is close to 'text', and 'contnet' to 'content': both are already there.
    part = {"type": "text", "text": "hi", "extra": 1}
    message = {"role": "user", "content": "hi", "contnet": "hi"}
    for body, param in [
        ({"messages": [{"role": "user", "content": [part]}]}, "messages.0.content.0.extra"),
        ({"messages": [message]}, "messages.0.contnet"),
    ]:
        response = httpx.post(server.url + CHAT, json=body)
        assert response.status_code == 400, response.text
        assert error_of(response)["message"] == f"unknown field {param!r}"


@pytest.mark.parametrize(
    "method,path,status,code",
    [
        ("GET", COMPLETIONS, 405, "method_not_allowed"),
        ("PUT", CHAT, 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("GET", "/v1/nothing", 404, "not_found"),
        ("POST", "/v2/completions", 404, "not_found"),
    ],
)
def test_wrong_method_and_unknown_route_are_json(server, method, path, status, code):
    response = httpx.request(method, server.url + path)
    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code and path in error["message"]


def test_a_model_is_retrieved_by_its_id_only(server):
    listed = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert 0 < listed["created"] <= time.time()
    one = httpx.get(server.url + f"/v1/models/{server.model_id}")
    assert one.status_code == 200 and one.json() == listed
    for unknown in ("gpt-4", "../../etc/passwd", f"{server.model_id}/x"):
        response = httpx.get(server.url + f"/v1/models/{unknown}")
        assert response.status_code == 404
        # httpx drops the dot segments: that one asks for /etc/passwd, an unknown route.
        assert error_of(response)["code"] in ("model_not_found", "not_found")


def test_null_in_an_optional_field_means_its_default(server):
    # Clients that send every field send null for those left unset, as OpenAI's schema allows.
    unset = [
        "n",
        "stream",
        "echo",
        "presence_penalty",
        "frequency_penalty",
        "ignore_eos",
        "min_p",
        "skip_special_tokens",
        "stream_options",
        "suffix",
        "best_of",
    ]
    nulls = {field: None for field in unset}
    body = {"prompt": "def ", "max_tokens": 4, "temperature": 0, **nulls}
    response = httpx.post(server.url + COMPLETIONS, json=body, timeout=30)
    assert response.status_code == 200, response.text
    plain = httpx.post(
        server.url + COMPLETIONS, json={"prompt": "def ", "max_tokens": 4, "temperature": 0}
    )
    assert response.json()["choices"] == plain.json()["choices"]
    chat = {"messages": HI, "max_tokens": 2, "n": None, "stream": None, "logprobs": None}
    assert httpx.post(server.url + CHAT, json=chat, timeout=30).status_code == 200
    # A required field stays required.
    missing = httpx.post(server.url + COMPLETIONS, json={"prompt": None, "max_tokens": 2})
    assert missing.status_code == 400 and error_of(missing)["param"] == "prompt"


def test_the_server_still_serves_after_bad_requests(server):
    # Runs after the parametrized cases above (pytest keeps file order).
    response = httpx.post(
        server.url + COMPLETIONS, json={"prompt": "def ", "max_tokens": 5, "ignore_eos": True}
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
    chat = httpx.post(
        server.url + CHAT, json={"messages": HI, "max_tokens": 3, "ignore_eos": True}, timeout=30
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
    # History as OpenAI clients send it back: an assistant turn with null content and the
    # fields this server never sets.
    turn = {"role": "assistant", "content": None, "refusal": None, "tool_calls": None}
    history = httpx.post(
        server.url + CHAT, json={"messages": [*HI, turn, *HI], "max_tokens": 2}, timeout=30
    )
    assert history.status_code == 200, history.text
    assert httpx.get(server.url + "/health").status_code == 200


def requests_counted(url: str, path: str, status: int) -> float:
    """truthgpt_requests_total for one endpoint and status, from /metrics."""
    line = f'truthgpt_requests_total{{endpoint="{path}",status="{status}"}} '
    found = [row for row in httpx.get(url + "/metrics").text.splitlines() if row.startswith(line)]
    return float(found[0].rsplit(" ", 1)[1]) if found else 0.0


@pytest.mark.parametrize(
    "path,body,param,char,position",
    [
        (COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 3}', "prompt", "\\ud800", 0),
        (COMPLETIONS, b'{"prompt": ["ok", "a\\udfff"], "stream": true}', "prompt.1", "\\udfff", 1),
        (
            CHAT,
            b'{"messages": [{"role": "system", "content": "hi"}, '
            b'{"role": "user", "content": "a\\udfff"}], "stream": true}',
            "messages.1.content",
            "\\udfff",
            1,
        ),
        (
            CHAT,
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc80"}]}]}',
            "messages.0.content",
            "\\udc80",
            0,
        ),
    ],
    ids=["completion", "completion-stream", "chat-stream", "chat-parts"],
)
def test_a_lone_surrogate_is_a_counted_400_naming_its_field(
    server, path, body, param, char, position, caplog
):
    # Valid JSON, but no Unicode text: the tokenizer would fail on it with a TypeError (a 500).
    before = requests_counted(server.url, path, 400)
    response = httpx.post(
        server.url + path, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param
    assert f"invalid Unicode (lone surrogate {char} at position {position})" in error["message"]
    assert requests_counted(server.url, path, 400) == before + 1
    assert "Traceback" not in caplog.text


def test_an_unexpected_error_in_a_route_is_a_counted_json_500(server, caplog):
    # A bug anywhere in a route (here: the engine's front end raising on submit) must still give
    # an OpenAI error body and a count in /metrics, not Starlette's plain-text 500.
    engine = server.state.engine

    def broken_submit(*_args, **_kwargs):
        raise RuntimeError("a bug in submit")

    before = requests_counted(server.url, COMPLETIONS, 500)
    engine.submit = broken_submit
    try:
        response = httpx.post(server.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
    finally:
        del engine.submit  # the class's own method again
    assert response.status_code == 500
    assert error_of(response)["type"] == "server_error"
    assert requests_counted(server.url, COMPLETIONS, 500) == before + 1
    assert "a bug in submit" in caplog.text  # the traceback is in the log, not the reply
    assert "a bug in submit" not in response.text
    assert server.state.in_flight == 0
    ok = httpx.post(server.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_generate_cli_names_a_prompt_or_a_prompts_file_line_that_is_not_utf8(folder, tmp_path):
    from typer.testing import CliRunner

    from truthgpt.cli import app

    runner = CliRunner()
    # A byte that is not UTF-8 in argv reaches Python as a surrogate escape (U+DCFF for 0xff).
    prompt = os.fsdecode(b"def \xff")
    out = runner.invoke(app, ["generate", str(folder), "--prompt", prompt, "--device", "cpu"])
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == [
        "error: --prompt: invalid Unicode (lone surrogate \\udcff at position 4)"
    ], out.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"def \nimport \xffos\n")
    out = runner.invoke(app, ["generate", str(folder), "--prompts-file", str(prompts)])
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == [
        f"error: {prompts}:2: not UTF-8 text (byte 0xff at position 7)"
    ], out.output


# -- limits of a small server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(folder):
    # 2 KiB bodies; 8 KV blocks of 16 tokens, so 7 * 16 = 112 tokens per request at most.
    running = start_server(folder, serve={"max_body_bytes": 2048}, inference={"num_blocks": 8})
    yield running
    running.stop()


def test_an_oversized_body_gets_a_413(small_server):
    body = json.dumps({"prompt": "x" * 4000, "max_tokens": 1}).encode()
    declared = httpx.post(small_server.url + COMPLETIONS, content=body)
    assert declared.status_code == 413
    assert error_of(declared)["code"] == "too_large"

    # Chunked, with no Content-Length to check up front: counted as it arrives.
    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    chunked = httpx.post(small_server.url + COMPLETIONS, content=pieces())
    assert chunked.status_code == 413
    assert error_of(chunked)["code"] == "too_large"

    small = httpx.post(small_server.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
    assert small.status_code == 200, small.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_too_big_for_the_kv_pool_is_a_plain_400(small_server, stream):
    # Fits the 256-token context but not the 112 tokens of the pool: the engine refuses it, and
    # since a stream opens only at its first token, a streaming request still gets a plain 400.
    body = {"prompt": "a", "max_tokens": 200, "ignore_eos": True, "stream": stream}
    response = httpx.post(small_server.url + COMPLETIONS, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert "max_tokens" in error["message"]
    assert small_server.state.in_flight == 0


# -- the engine misbehaving -----------------------------------------------------------------------


@contextmanager
def wrapped_step(running, before: Callable[[int], None]) -> Iterator[None]:
    """Call `before(call_number)` ahead of every real engine step (to raise, or to sleep)."""
    engine = running.state.engine.engine
    real_step, calls = engine.step, itertools.count()

    def step():
        before(next(calls))
        return real_step()

    engine.step = step
    try:
        yield
    finally:
        del engine.step  # the class's own method again


def slow_steps(seconds: float) -> Callable[[int], None]:
    return lambda _call: time.sleep(seconds)


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


LONG_STREAM = {"prompt": "a", "max_tokens": 200, "ignore_eos": True, "stream": True}


def test_a_full_queue_answers_429_with_retry_after(folder):
    running = start_server(folder, serve={"max_queued_requests": 0}, inference={"max_num_seqs": 1})
    try:
        with wrapped_step(running, slow_steps(0.01)), httpx.Client(timeout=30) as client:
            with client.stream("POST", running.url + COMPLETIONS, json=LONG_STREAM) as first:
                assert first.status_code == 200
                events = sse_events(first)  # kept: dropping it would close the stream
                next(events)  # admitted and running
                for body in ({"prompt": "b", "max_tokens": 2}, {**LONG_STREAM, "prompt": "b"}):
                    refused = client.post(running.url + COMPLETIONS, json=body)
                    assert refused.status_code == 429
                    assert refused.headers["Retry-After"] == "1"
                    error = error_of(refused)
                    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            # The first one left early; its place is free again.
            wait_until_idle(running.url)
            again = client.post(running.url + COMPLETIONS, json={"prompt": "b", "max_tokens": 2})
            assert again.status_code == 200, again.text
    finally:
        running.stop()


def test_a_request_past_its_timeout_gets_504_or_an_error_event(folder):
    running = start_server(folder, serve={"request_timeout_s": 0.3})
    try:
        with wrapped_step(running, slow_steps(0.01)), httpx.Client(timeout=30) as client:
            started = time.monotonic()
            plain = client.post(running.url + COMPLETIONS, json={**LONG_STREAM, "stream": False})
            assert time.monotonic() - started < 1.5  # cut at 0.3 s, not after 200 steps
            assert plain.status_code == 504
            assert error_of(plain)["type"] == "timeout_error"
            assert "request_timeout_s" in error_of(plain)["message"]

            with client.stream("POST", running.url + COMPLETIONS, json=LONG_STREAM) as response:
                assert response.status_code == 200  # the first token came in time
                events = list(sse_events(response))
            assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
            assert set(events[-2]) == {"error"} and events[-2]["error"]["type"] == "timeout_error"
            assert all("choices" in event for event in events[:-2])
            # Both were aborted in the engine: their sequences and KV blocks are gone.
            wait_until_idle(running.url)
        ok = httpx.post(running.url + COMPLETIONS, json={"prompt": "a", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
    finally:
        running.stop()


@pytest.fixture
def faulty_server(folder):
    running = start_server(folder, serve={"stall_after_s": 0.5})
    yield running
    running.stop()


def health(url: str) -> int:
    return httpx.get(url + "/health").status_code


def wait_for_health(url: str, status: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(url) != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_loop_is_restarted_by_the_watchdog(faulty_server):
    running, url = faulty_server, faulty_server.url
    died, seen_down = threading.Event(), threading.Event()

    def exit_once(call: int) -> None:
        if call == 0:
            died.set()
            raise SystemExit  # not an Exception: past the loop's own handler, the thread ends

    # The watchdog looks every 0.5 s, so the dead window is anywhere in 0..0.5 s: hold its
    # restart until this test has seen /health fail.
    engine = running.state.engine
    real_restart = engine.restart
    engine.restart = lambda: seen_down.is_set() and real_restart()
    body = {"prompt": "a", "max_tokens": 20, "ignore_eos": True}
    try:
        with wrapped_step(running, exit_once), ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(httpx.post, url + COMPLETIONS, json=body, timeout=30)
            assert died.wait(10)
            wait_for_health(url, 503)
            assert httpx.get(url + "/health").json()["status"] == "engine loop is down"
            # Sent while the loop is down: it waits for the new loop instead of failing.
            waiting = pool.submit(httpx.post, url + COMPLETIONS, json=body, timeout=30)
            deadline = time.monotonic() + 5
            while running.state.in_flight < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            seen_down.set()
            failed = in_flight.result()
            assert failed.status_code == 500, failed.text
            error = error_of(failed)
            assert error["type"] == "server_error" and error["code"] == "engine_error"
            wait_for_health(url, 200)
            served = waiting.result()
            assert served.status_code == 200, served.text
            assert served.json()["usage"]["completion_tokens"] == 20
    finally:
        del engine.restart
    assert engine.restarts == 1 and metric_values(url)["truthgpt_engine_restarts"] == 1
    after = httpx.post(url + COMPLETIONS, json=body, timeout=30)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 20
    wait_until_idle(url)


def test_a_failing_step_fails_the_requests_in_flight_and_serving_goes_on(faulty_server):
    running, url = faulty_server, faulty_server.url
    engine = running.state.engine.engine
    failed_once = threading.Event()

    def fail_with_two_requests(_call: int) -> None:
        if len(engine.requests) >= 2 and not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("injected fault")
        time.sleep(0.005)  # keep the stream going until the second request arrives

    with wrapped_step(running, fail_with_two_requests), httpx.Client(timeout=30) as client:
        with client.stream("POST", url + COMPLETIONS, json=LONG_STREAM) as streaming:
            events = sse_events(streaming)
            assert "choices" in next(events)
            plain = client.post(url + COMPLETIONS, json={**LONG_STREAM, "stream": False})
            rest = list(events)
    assert failed_once.is_set()
    assert plain.status_code == 500, plain.text
    error = error_of(plain)
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    # The stream had started: the error comes as its last event, then [DONE].
    assert rest[-1] == "[DONE]" and rest.count("[DONE]") == 1
    assert "injected fault" in rest[-2]["error"]["message"]
    assert health(url) == 200 and running.state.engine.restarts == 0
    ok = httpx.post(url + COMPLETIONS, json={"prompt": "a", "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    wait_until_idle(url)


def test_a_stalled_loop_fails_health_until_it_moves_again(faulty_server):
    url = faulty_server.url
    stalling = threading.Event()

    def stall_once(call: int) -> None:
        if call == 0:
            stalling.set()
            time.sleep(2.0)

    with wrapped_step(faulty_server, stall_once), ThreadPoolExecutor(1) as pool:
        body = {"prompt": "a", "max_tokens": 5, "ignore_eos": True}
        pending = pool.submit(httpx.post, url + COMPLETIONS, json=body, timeout=30)
        assert stalling.wait(10)
        assert health(url) == 200  # silent for less than stall_after_s (0.5 s) so far
        time.sleep(0.8)
        stalled = httpx.get(url + "/health")
        assert stalled.status_code == 503 and stalled.json()["status"] == "engine loop is stalled"
        reply = pending.result()
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    assert health(url) == 200


def test_a_client_leaving_a_plain_request_frees_its_sequence(faulty_server):
    url = faulty_server.url
    body = {"prompt": "a", "max_tokens": 200, "ignore_eos": True}
    with wrapped_step(faulty_server, slow_steps(0.02)):  # 200 steps: 4 s if never aborted
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + COMPLETIONS, json=body, timeout=0.3)
        wait_until_idle(url, timeout_s=1.0)


def test_a_client_leaving_while_its_request_waits_ends_it_before_it_runs(folder):
    # One sequence at a time: the second request waits behind a 4 s stream. Its client gives up
    # at 0.3 s; it used to stay queued, then be prefilled and run for nobody (and count as in
    # flight meanwhile, towards the 429), since the server looked for the client only after
    # the first token.
    running = start_server(folder, inference={"max_num_seqs": 1})
    url = running.url
    try:
        with wrapped_step(running, slow_steps(0.02)), httpx.Client(timeout=30) as client:
            with client.stream("POST", url + COMPLETIONS, json=LONG_STREAM) as first:
                events = sse_events(first)  # kept: dropping it would close the stream
                next(events)
                for stream in (False, True):
                    with pytest.raises(httpx.TimeoutException):
                        body = {**LONG_STREAM, "prompt": "b", "stream": stream}
                        httpx.post(url + COMPLETIONS, json=body, timeout=0.3)
                deadline = time.monotonic() + 1.0
                while metric_values(url)["truthgpt_requests_in_flight"] != 1:
                    assert time.monotonic() < deadline, "the queued requests are still in flight"
                    time.sleep(0.02)
                assert metric_values(url)["truthgpt_queue_depth"] == 0
        wait_until_idle(url)
        assert metric_values(url)["truthgpt_generation_tokens_total"] < 2 * 200
    finally:
        running.stop()


# -- SIGTERM on the real command ------------------------------------------------------------------


def start_serve_command(
    folder, *settings: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`truthgpt serve` in a subprocess, once its /health answers 200; `env` adds variables."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "truthgpt.cli", "serve", str(folder), "--port", str(port)]
    command += ["--device", "cpu"] + [f"--set={setting}" for setting in settings]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            if health(url) == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not come up: {process.communicate()[1]}")
        time.sleep(0.1)


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(folder):
    process, url = start_serve_command(folder, "serve.shutdown_grace_s=10")
    try:
        max_tokens = CONTEXT - 6
        body = {**LONG_STREAM, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + COMPLETIONS, json=body, timeout=30) as response:
            events = sse_events(response)
            first = next(events)
            process.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            # While it drains: /health fails and new requests are refused (503 while the port is
            # still open, then no connection at all). Checked from a thread, the stream read here.
            with ThreadPoolExecutor(1) as pool:
                probe = pool.submit(_statuses_until_refused, url, 10.0)
                rest = list(events)
                statuses = probe.result()
        assert rest[-1] == "[DONE]" and rest.count("[DONE]") == 1
        assert not any("error" in event for event in rest[:-1])
        usage = rest[-2]["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert all(event["id"] == first["id"] for event in rest[:-1])
        assert all(status == 503 for status in statuses), statuses

        code = process.wait(timeout=15)
        stderr = process.stderr.read()
        assert time.monotonic() - sent_at < 10  # within serve.shutdown_grace_s
        assert code == 0, stderr
        assert "Traceback" not in stderr, stderr
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_an_idle_server_stops_at_once_not_after_the_grace(folder, tmp_path):
    # Nothing in flight: the grace is not waited for, and neither is Python's teardown of torch
    # in the server and in its engine process (about 1 s each on 2 cores, which made an idle
    # server take 2-4 s to exit). Here a sitecustomize that every Python process of the server
    # loads makes that teardown 60 s long wherever torch was imported (not in multiprocessing's
    # resource tracker, which holds the output pipes until it exits), so waiting for it fails
    # the test whatever the machine's speed. The bound is under the grace and under the 10 s
    # after which the server kills an engine process that has not exited.
    grace = 16
    slow_teardown = "lambda: 'torch' in sys.modules and time.sleep(60)"
    (tmp_path / "sitecustomize.py").write_text(
        f"import atexit, sys, time\natexit.register({slow_teardown})\n"
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    process, _url = start_serve_command(
        folder, f"serve.shutdown_grace_s={grace}", env={"PYTHONPATH": path}
    )
    try:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=grace / 2)
        assert process.returncode == 0, stderr
        assert "stopping: no requests in flight" in stdout, stdout
        assert "stopped serving" in stdout, stdout
        assert "Traceback" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("signals", [1, 2], ids=["grace-runs-out", "second-ctrl-c"])
def test_requests_still_running_at_shutdown_end_with_an_error_not_a_cut(folder, signals):
    # Grace 0.5 s (or a second Ctrl-C at once): a stream of 64 choices and a plain request of 32
    # to 250 tokens each are still running, and must end as a request past its timeout does.
    grace = 0.5 if signals == 1 else 60
    process, url = start_serve_command(folder, f"serve.shutdown_grace_s={grace}")
    try:
        body = {"prompt": "a", "max_tokens": CONTEXT - 6, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
            plain = pool.submit(client.post, url + COMPLETIONS, json={**body, "n": 32})
            with client.stream(
                "POST", url + COMPLETIONS, json={**body, "n": 64, "stream": True}
            ) as response:
                events = sse_events(response)
                first = next(events)
                for _ in range(signals):
                    process.send_signal(signal.SIGINT)
                    time.sleep(0.2)
                rest = list(events)
            plain = plain.result()
        assert "choices" in first
        assert rest[-1] == "[DONE]" and rest.count("[DONE]") == 1
        assert rest[-2]["error"]["message"] == "the server is shutting down", rest[-2]
        assert plain.status_code == 503, plain.text
        assert error_of(plain)["message"] == "the server is shutting down"
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode in (0, 130), stderr
        assert "stopping: waiting up to" in stdout and "Ctrl-C again to stop now" in stdout
        assert "Traceback" not in stderr and "Cancel" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("signals", [1, 2], ids=["grace-runs-out", "second-ctrl-c"])
def test_a_client_that_stopped_reading_does_not_hold_up_the_exit(folder, signals):
    # A stream whose client stopped reading can never take its end (an error event, [DONE]):
    # past the grace, or at a second Ctrl-C, its connection is closed, where uvicorn waited for
    # it until its own timeout (grace + 5 s) and then cancelled the task with a traceback.
    grace = 1 if signals == 1 else 60
    process, url = start_serve_command(folder, f"serve.shutdown_grace_s={grace}")
    client = socket.socket()
    try:
        # 64 choices of 250 tokens with 20 alternatives each: ~10 MB of events, far more than
        # the socket buffers hold, for a client that reads nothing past the first bytes.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        body = {"prompt": "a", "max_tokens": CONTEXT - 6, "ignore_eos": True, "n": 64}
        payload = json.dumps({**body, "stream": True, "logprobs": 20}).encode()
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        assert client.recv(64).startswith(b"HTTP/1.1 200")
        # Every token generated, so all that the buffers cannot hold waits in the server.
        _wait_until_generated(url, since=time.monotonic())
        for _ in range(signals):
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
        stdout, stderr = process.communicate(timeout=30)  # under the grace of 60 s
        assert process.returncode in (0, 130), stderr
        assert "stopped serving" in stdout, stdout
        assert "Traceback" not in stderr and "Cancel" not in stderr, stderr
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_until_generated(url: str, since: float, timeout_s: float = 60.0) -> None:
    """Until the engine runs no sequence, by its stats from after `since` (the engine process
    sends them at least every half second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = metric_values(url)
        if time.monotonic() - since > 0.6 and values["truthgpt_running_sequences"] == 0:
            assert values["truthgpt_requests_in_flight"] == 1, values
            return
        time.sleep(0.05)
    raise AssertionError(f"the request was still generating after {timeout_s} s: {values}")


def _statuses_until_refused(url: str, timeout_s: float) -> list[int]:
    """/health statuses seen until the server stops taking connections."""
    statuses, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            statuses.append(health(url))
        # Refused, or accepted just before the port closed and then closed unanswered (uvicorn
        # closes connections with no request under way when it shuts down).
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return statuses
        time.sleep(0.01)
    raise AssertionError(f"new connections still taken {timeout_s} s after SIGTERM: {statuses}")


def test_a_lora_server_stops_without_a_leaked_semaphore_warning(tmp_path):
    # Merging a LoRA adapter (peft) in the engine process made tqdm create a multiprocessing
    # lock there, which the process's quick exit never released: every stop of the server
    # printed multiprocessing's "There appear to be 1 leaked semaphore objects" warning.
    folder = make_model_folder(tmp_path / "model")
    add_peft_adapter(folder)
    process, _url = start_serve_command(folder)
    try:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)  # the resource tracker's end too
        assert process.returncode == 130, stderr
        assert "stopped serving" in stdout, stdout
        assert "leaked semaphore" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

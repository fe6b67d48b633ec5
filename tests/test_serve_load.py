"""The server under load: hundreds of concurrent streams, a quarter of them dropped by their
clients half way, then a burst of n=2 completions. Every stream that ran to its end holds
exactly its own tokens under its own id; every dropped one freed its sequence and KV blocks."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from serving_fixtures import make_model_folder, start_server, wait_until_idle

STREAMS = 200
DROPPED_EVERY = 4  # one stream in four is left after its first events
DROPPED_MAX_TOKENS = 200  # long, so that a dropped stream is surely still running when left
BURST = 50


@pytest.fixture(scope="module", params=["thread", "process"])
def server(tmp_path_factory, request):
    running = start_server(
        make_model_folder(tmp_path_factory.mktemp("model")),
        serve={"engine": request.param},
        inference={"max_num_seqs": 64},
    )
    yield running
    running.stop()


def stream_body(index: int, max_tokens: int) -> tuple[str, dict]:
    """Even streams are completions, odd ones chat; logprobs on, so every token is counted."""
    body = {
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": index,
    }
    if index % 2 == 0:
        return "/v1/completions", {**body, "prompt": f"def f{index}(x):", "logprobs": 0}
    messages = [{"role": "user", "content": f"write f{index}"}]
    return "/v1/chat/completions", {**body, "messages": messages, "logprobs": True}


async def run_stream(client: httpx.AsyncClient, index: int, max_tokens: int, drop: bool) -> list:
    """The stream's events ([DONE] as a string); a dropped stream leaves after two events."""
    path, body = stream_body(index, max_tokens)
    events: list = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
            if drop and len(events) == 2:
                break  # leaving the block closes the connection: the server must abort it
    return events


def tokens_in(chunk: dict) -> int:
    """Tokens a stream chunk carries, counted from its logprobs (one entry a token)."""
    logprobs = chunk["choices"][0]["logprobs"]
    if logprobs is None:
        return 0
    return len(logprobs["content"] if "content" in logprobs else logprobs["tokens"])


def check_complete_stream(events: list, index: int, max_tokens: int, tokenizer) -> str:
    """All of one stream's events belong to it, and they hold exactly max_tokens tokens."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    *chunks, usage_chunk = events[:-1]
    chat = index % 2 == 1
    stream_id = chunks[0]["id"]
    assert stream_id.startswith("chatcmpl-" if chat else "cmpl-")
    object_type = "chat.completion.chunk" if chat else "text_completion"
    for chunk in [*chunks, usage_chunk]:
        assert chunk["id"] == stream_id and chunk["object"] == object_type
    for chunk in chunks:
        assert [choice["index"] for choice in chunk["choices"]] == [0]
        assert "usage" not in chunk or chunk["usage"] is None
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(tokens_in(chunk) for chunk in chunks) == max_tokens
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + max_tokens
    if not chat:
        prompt = stream_body(index, max_tokens)[1]["prompt"]
        assert usage["prompt_tokens"] == len(tokenizer.encode(prompt))
    return stream_id


def test_concurrent_streams_with_early_disconnects(server):
    rng = random.Random(0)
    max_tokens = [rng.randint(4, 16) for _ in range(STREAMS)]
    dropped = {index for index in range(STREAMS) if index % DROPPED_EVERY == 1}
    for index in dropped:
        max_tokens[index] = DROPPED_MAX_TOKENS
    engine = server.state.engine  # a thread's or a process's front end: both report stats
    generated_before = engine.stats().generated_tokens

    async def run_all() -> list:
        limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(
                *(
                    run_stream(client, index, max_tokens[index], index in dropped)
                    for index in range(STREAMS)
                )
            )

    results = asyncio.run(run_all())

    ids = set()
    for index, events in enumerate(results):
        if index in dropped:
            assert len(events) == 2 and "[DONE]" not in events
            ids.add(events[0]["id"])
        else:
            ids.add(check_complete_stream(events, index, max_tokens[index], server.state.tokenizer))
    assert len(ids) == STREAMS  # no two streams share an id

    # The dropped streams were aborted, not run to their 200 tokens: their sequences and KV
    # blocks are free within moments, and the engine generated only a little past the kept ones.
    values = wait_until_idle(server.url, timeout_s=5.0)
    assert values["truthgpt_kv_blocks_free"] > 0
    kept = sum(tokens for index, tokens in enumerate(max_tokens) if index not in dropped)
    generated = engine.stats().generated_tokens - generated_before
    assert kept <= generated < kept + len(dropped) * DROPPED_MAX_TOKENS // 2


def test_a_burst_of_n2_completions(server):
    rng = random.Random(1)
    max_tokens = [rng.randint(4, 16) for _ in range(BURST)]
    prompts = [f"class C{index}:" for index in range(BURST)]

    async def run_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=BURST + 10)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/completions",
                        json={
                            "prompt": prompt,
                            "n": 2,
                            "max_tokens": tokens,
                            "ignore_eos": True,
                            "logprobs": 0,
                            "seed": index,
                        },
                    )
                    for index, (prompt, tokens) in enumerate(zip(prompts, max_tokens))
                )
            )

    responses = asyncio.run(run_all())
    ids = set()
    for prompt, tokens, response in zip(prompts, max_tokens, responses):
        assert response.status_code == 200, response.text
        reply = response.json()
        ids.add(reply["id"])
        assert [choice["index"] for choice in reply["choices"]] == [0, 1]
        for choice in reply["choices"]:
            assert choice["finish_reason"] == "length"
            assert len(choice["logprobs"]["tokens"]) == tokens
        prompt_tokens = len(server.state.tokenizer.encode(prompt))
        assert reply["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 2 * tokens,
            "total_tokens": prompt_tokens + 2 * tokens,
        }
    assert len(ids) == BURST
    wait_until_idle(server.url)

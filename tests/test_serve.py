"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on loopback (a tiny random Llama on the CPU); greedy text is checked against
`transformers` `generate` on the same weights."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest
import torch
import transformers
from serving_fixtures import add_peft_adapter, make_model_folder, start_server

import truthgpt
from truthgpt.inference.detokenizer import IncrementalDetokenizer
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.serving.responses import completion_logprobs, prompt_offsets

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", params=["thread", "process"])
def server(folder, request):
    """Every test runs against both engine front ends: a thread here, a process of its own."""
    running = start_server(folder, serve={"engine": request.param})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def hf_greedy_text(folder, prompt: str, new_tokens: int, model=None) -> str:
    """transformers' greedy continuation, of the folder's model or of `model` (peft's)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_completion_matches_transformers(client, server, folder):
    reply = client.completions.create(model=server.model_id, prompt="def ", max_tokens=10, **GREEDY)
    assert reply.object == "text_completion" and reply.model == server.model_id
    choice = reply.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == hf_greedy_text(folder, "def ", 10)
    prompt_tokens = len(server.state.tokenizer.encode("def "))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == prompt_tokens + 10


def test_chat_completion_and_models(client, server):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [server.model_id]
    reply = client.chat.completions.create(
        model=server.model_id,
        messages=[
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Say hello"},
        ],
        max_tokens=6,
        **GREEDY,
    )
    assert reply.object == "chat.completion"
    message = reply.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    # max_completion_tokens is the newer name of the same limit.
    again = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Say hello"}],
        max_completion_tokens=3,
        **GREEDY,
    )
    assert again.usage.completion_tokens == 3


def test_stream_equals_the_whole_reply_and_usage_comes_once_at_the_end(client, server):
    whole = client.completions.create(
        model=server.model_id, prompt="import ", max_tokens=12, **GREEDY
    )
    chunks = list(
        client.completions.create(
            model=server.model_id,
            prompt="import ",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(with_usage) == 1 and chunks[-1] is with_usage[0] and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 12
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]

    chat_chunks = list(
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            **GREEDY,
        )
    )
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chat_chunks)  # not asked for


def test_continuous_usage_stats_put_each_choices_usage_so_far_in_every_chunk(client, server):
    # stream_options.continuous_usage_stats (vLLM's) was accepted and silently ignored.
    prompts = ["import ", "class Parser:"]
    lengths = [len(server.state.tokenizer.encode(p)) for p in prompts]
    chunks = list(
        client.completions.create(
            model=server.model_id,
            prompt=prompts,
            n=2,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            **GREEDY,
        )
    )
    *with_choices, last = chunks
    assert not last.choices and last.usage.completion_tokens == 4 * 6
    counts: dict[int, list[int]] = {}
    for chunk in with_choices:
        (choice,) = chunk.choices
        assert chunk.usage.prompt_tokens == lengths[choice.index // 2]
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        counts.setdefault(choice.index, []).append(chunk.usage.completion_tokens)
    for index, seen in counts.items():
        assert seen == sorted(seen) and seen[-1] == 6, (index, seen)
        assert len(seen) > 1  # counted as the tokens came, not once at the end
    # As in vLLM, they come with include_usage only.
    chat = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"continuous_usage_stats": True},
        **GREEDY,
    )
    assert all(chunk.usage is None for chunk in chat)


def test_n_samples_have_their_indices_and_seeds_reproduce(client, server):
    params = dict(model=server.model_id, prompt="class ", max_tokens=8, temperature=1.0, seed=7)
    first = client.completions.create(n=3, **params)
    assert sorted(choice.index for choice in first.choices) == [0, 1, 2]
    again = client.completions.create(n=3, **params)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert (
        first.usage.completion_tokens
        == sum(len(server.state.tokenizer.encode(c.text)) for c in first.choices)
        or first.usage.completion_tokens <= 24
    )
    other = client.completions.create(n=3, **{**params, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]

    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(n=3, stream=True, **params):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]


def test_stop_string_ends_the_text_and_is_never_streamed(client, server):
    base = (
        client.completions.create(model=server.model_id, prompt="def ", max_tokens=30, **GREEDY)
        .choices[0]
        .text
    )
    stop = base[8:11]
    assert len(stop) == 3 and stop in base
    expected = base[: base.index(stop)]
    reply = client.completions.create(
        model=server.model_id, prompt="def ", max_tokens=30, stop=[stop], **GREEDY
    )
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    pieces = [
        choice.text
        for chunk in client.completions.create(
            model=server.model_id, prompt="def ", max_tokens=30, stop=stop, stream=True, **GREEDY
        )
        for choice in chunk.choices
    ]
    assert "".join(pieces) == expected
    assert not any(stop in "".join(pieces[: i + 1])[-len(stop) - 8 :] for i in range(len(pieces)))


def shown_bytes(token: str) -> bytes:
    """The bytes of a legacy logprobs token: `bytes:\\xe6\\x97` spelled out, else its text's."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token.removeprefix("bytes:").replace("\\x", ""))
    return token.encode()


def test_logprobs(client, server):
    reply = client.completions.create(
        model=server.model_id, prompt="def ", max_tokens=5, logprobs=3, **GREEDY
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    # A token inside a character shows its bytes (bytes:\xe6): together they make the text.
    raw = b"".join(shown_bytes(token) for token in logprobs.tokens)
    assert raw.decode("utf-8", errors="replace") == reply.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        # Keys are token texts, so two tokens of one text share a key (the legacy format's
        # limit); every value is still at most the chosen one, which greedy made the likeliest.
        assert 1 <= len(top) <= 4 and chosen <= 0
        assert max(top.values()) <= chosen + 1e-5
    chat = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(item.top_logprobs) == 2 for item in content)


def _hf_loglikelihood(folder, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The continuation's summed logprob after the context, and whether greedy decoding would
    have produced it: what an eval harness scores a multiple-choice answer by."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1, :vocab], -1)
    rows = logprobs[len(context) - 1 :]
    total = sum(rows[i, token].item() for i, token in enumerate(continuation))
    greedy = all(rows[i].argmax().item() == token for i, token in enumerate(continuation))
    return total, greedy


def test_echo_with_logprobs_scores_the_prompt_as_eval_harnesses_ask(server, folder):
    """lm-evaluation-harness's `local-completions` loglikelihood request: token-id prompts,
    echo, logprobs 1, max_tokens 1; it sums token_logprobs[len(context):-1]."""
    tokenizer = server.state.tokenizer
    context = tokenizer.encode("def parse(text):\n    return")
    answers = [tokenizer.encode(" json.loads(text)"), tokenizer.encode(" None")]
    body = {
        "model": server.model_id,
        "prompt": [context + answer for answer in answers],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    choices = sorted(reply["choices"], key=lambda choice: choice["index"])
    for choice, answer in zip(choices, answers):
        logprobs = choice["logprobs"]
        tokens = context + answer
        assert len(logprobs["token_logprobs"]) == len(tokens) + 1  # the prompt, then 1 new
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert choice["text"].startswith(tokenizer.decode(tokens))
        scores = logprobs["token_logprobs"][len(context) : -1]
        tops = logprobs["top_logprobs"][len(context) : -1]
        greedy = all(score == max(top.values()) for score, top in zip(scores, tops))
        expected, expected_greedy = _hf_loglikelihood(folder, context, answer)
        assert sum(scores) == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy
        offsets = logprobs["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets)
    assert reply["usage"]["prompt_tokens"] == sum(len(context + a) for a in answers)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client, server):
    prompt = "import os\nimport sys"
    reply = client.completions.create(
        model=server.model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=2
    )
    choice = reply.choices[0]
    count = len(server.state.tokenizer.encode(prompt))
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == count and reply.usage.completion_tokens == 0
    tokens, scores, tops = (choice.logprobs.tokens, choice.logprobs.token_logprobs,
                            choice.logprobs.top_logprobs)  # fmt: skip
    assert tops[0] is None  # the first token has nothing before it
    # The top 2 there, plus the prompt's own token when it is not among them.
    assert all(
        1 <= len(top) <= 3 and top[t] == lp for t, lp, top in zip(tokens[1:], scores[1:], tops[1:])
    )
    stream = client.completions.create(
        model=server.model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=2, stream=True
    )
    chunks = [c for chunk in stream for c in chunk.choices]
    assert "".join(c.text for c in chunks) == prompt
    assert [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs] == (
        choice.logprobs.token_logprobs
    )
    with pytest.raises(openai.BadRequestError, match="max_tokens") as caught:
        client.completions.create(model=server.model_id, prompt=prompt, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"


def test_a_streamed_echo_sends_the_prompt_first_and_equals_the_whole_reply(client, server):
    ask = dict(model=server.model_id, prompt="class A:", max_tokens=6, echo=True, n=2, **GREEDY)
    whole = client.completions.create(logprobs=1, **ask)
    texts, logprobs = {}, {}
    for chunk in client.completions.create(stream=True, logprobs=1, **ask):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
    for choice in whole.choices:
        assert choice.text.startswith("class A:")
        assert texts[choice.index] == choice.text
        assert logprobs[choice.index] == choice.logprobs.token_logprobs
    plain = "".join(
        c.text
        for chunk in client.completions.create(stream=True, **ask)
        for c in chunk.choices
        if c.index == 0
    )
    assert plain == whole.choices[0].text  # without logprobs: the preformatted events


def test_tokenizer_routes_give_what_the_engine_is_given(client, server):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (eval harnesses tokenize through
    them): the ids are those the completions and chat routes feed the engine."""
    url, tokenizer = server.url, server.state.tokenizer
    prompt = "def main():\n    pass"
    got = httpx.post(f"{url}/tokenize", json={"prompt": prompt, "model": server.model_id}).json()
    assert got["tokens"] == tokenizer.encode(prompt) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == server.state.max_model_len
    reply = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=1)
    assert reply.usage.prompt_tokens == got["count"]
    messages = [{"role": "user", "content": "hi there"}]
    chat = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    answer = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens
    strs = httpx.post(f"{url}/tokenize", json={"prompt": prompt, "return_token_strs": True})
    assert strs.json()["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    back = httpx.post(f"{url}/detokenize", json={"tokens": got["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(got["tokens"])}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["vocab_size"] == len(tokenizer)
    for route, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {"promt": "a"}, "promt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [len(tokenizer)]}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ]:
        response = httpx.post(f"{url}{route}", json=body)
        assert 400 <= response.status_code < 500, (route, body)
        assert response.json()["error"]["param"] == param, (route, body)


def test_a_chat_template_that_writes_bos_gets_one_bos(folder, tmp_path):
    """Llama- and Mistral-style: the tokenizer adds BOS to a text and the template writes one
    too. A chat prompt is the template's tokens alone (as SFT trained on), a plain prompt gets
    the tokenizer's BOS, and /tokenize says the same unless told otherwise."""
    import shutil

    from tokenizers.processors import TemplateProcessing

    shutil.copytree(folder, tmp_path / "bos", dirs_exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "bos")
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    tokenizer.save_pretrained(tmp_path / "bos")
    running = start_server(tmp_path / "bos")
    try:
        url, messages = running.url, [{"role": "user", "content": "hi"}]
        ids = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
        assert ids[0] == bos and ids[1] != bos
        both = {"messages": messages, "add_special_tokens": True}
        assert httpx.post(f"{url}/tokenize", json=both).json()["tokens"][:2] == [bos, bos]
        chat = {"messages": messages, "max_tokens": 1}
        usage = httpx.post(f"{url}/v1/chat/completions", json=chat).json()["usage"]
        assert usage["prompt_tokens"] == len(ids)
        plain = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).json()["tokens"]
        assert plain[0] == bos and plain[1:] == tokenizer.encode("hi", add_special_tokens=False)
    finally:
        running.stop()


def test_top_logprobs_hold_the_chosen_token_and_the_likelier_of_equal_texts(client, server):
    sampled = (
        client.completions.create(
            model=server.model_id, prompt="def", max_tokens=8, temperature=2.0, seed=1, logprobs=1
        )
        .choices[0]
        .logprobs
    )
    zero = (
        client.completions.create(
            model=server.model_id, prompt="def", max_tokens=8, temperature=2.0, seed=1, logprobs=0
        )
        .choices[0]
        .logprobs
    )
    for token, chosen, top, only in zip(
        sampled.tokens, sampled.token_logprobs, sampled.top_logprobs, zero.top_logprobs
    ):
        assert top[token] == chosen and 1 <= len(top) <= 2  # top 1, plus the chosen one
        assert only == {token: chosen}

    texts = {5: "\ufffd", 6: "\ufffd", 7: "in"}  # two byte tokens both print as U+FFFD
    entry = {"token_id": 7, "logprob": -2.5, "top": [(5, -1.0), (6, -1.5), (7, -2.5)]}
    body = completion_logprobs([entry], texts.__getitem__, [0])
    assert body["top_logprobs"] == [{"\ufffd": -1.0, "in": -2.5}]


def test_an_error_in_a_batch_of_prompts_names_the_prompt(client, server):
    long = list(range(3, 3 + server.state.max_model_len))
    for prompts, param in [
        ([[5, 6], long], "prompt.1"),
        (["a", ""], "prompt.1"),
        ([[5], [10**6]], "prompt.1"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=server.model_id, prompt=prompts, max_tokens=1)
        assert caught.value.body["param"] == param, prompts


def test_metrics_and_health(server):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    body = {"model": server.model_id, "prompt": "def ", "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "truthgpt_requests_total",
        "truthgpt_time_to_first_token_seconds_bucket",
        "truthgpt_inter_token_latency_seconds_bucket",
        "truthgpt_kv_blocks_used",
        "truthgpt_kv_blocks_free",
        "truthgpt_prefix_cache_hit_rate",
        "truthgpt_queue_depth",
        "truthgpt_running_sequences",
        "truthgpt_prompt_tokens_total",
        "truthgpt_generation_tokens_total",
    ):
        assert name in text, name
    assert 'truthgpt_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_metrics_export_the_engine_s_preemptions() -> None:
    from dataclasses import fields

    from truthgpt.inference.engine import EngineStats
    from truthgpt.serving.metrics import Metrics

    stats = EngineStats(**{field.name: 0 for field in fields(EngineStats)} | {"preemptions": 7})
    text = Metrics().render(stats, in_flight=0, restarts=0).decode()
    assert "\ntruthgpt_preemptions 7.0\n" in text


def test_api_key_guards_every_endpoint_but_health(folder):
    running = start_server(folder, serve={"api_key": "s3cret"})
    try:
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{running.url}{path}").status_code == 401
            wrong = httpx.get(f"{running.url}{path}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{running.url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == running.model_id
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{running.url}/v1", api_key="wrong", max_retries=0
            ).models.list()
    finally:
        running.stop()


def test_result_cache_answers_repeated_deterministic_requests(folder):
    running = start_server(folder, serve={"result_cache": True})
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        ask = dict(model=running.model_id, prompt="def ", max_tokens=8, **GREEDY)
        first, second = client.completions.create(**ask), client.completions.create(**ask)
        assert first.choices[0].text == second.choices[0].text and first.id != second.id
        streamed = "".join(
            c.text for chunk in client.completions.create(stream=True, **ask) for c in chunk.choices
        )
        assert streamed == first.choices[0].text
        echoed = client.completions.create(echo=True, **ask)  # a different reply: not a hit
        assert echoed.choices[0].text == "def " + first.choices[0].text
        sampled = dict(ask, temperature=1.0)  # unseeded sampling is never cached
        client.completions.create(**sampled)
        client.completions.create(**sampled)
        metrics = httpx.get(f"{running.url}/metrics").text
        assert "truthgpt_result_cache_hits_total 2.0" in metrics
        assert "truthgpt_result_cache_misses_total 2.0" in metrics
    finally:
        running.stop()


def test_stream_events_survive_clients_that_split_on_unicode_line_breaks(server):
    """Each SSE event is one line for any client: JSON that carried U+2028 or U+0085 raw
    would be cut in two by clients that split lines like str.splitlines (httpx's aiter_lines)."""
    from truthgpt.serving.responses import sse

    event = sse({"text": "a\u2028b\x85c\u2029d"})
    assert event.endswith("\n\n") and len(event.rstrip("\n").splitlines()) == 1
    body = {"model": server.model_id, "prompt": "def ", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_taken_port_or_unknown_host_is_a_one_line_error_before_loading():
    import socket

    from truthgpt.errors import ConfigError
    from truthgpt.serving.server import check_can_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="serve.port: cannot listen"):
            check_can_listen("127.0.0.1", port)
    with pytest.raises(ConfigError, match="serve.host: cannot resolve"):
        check_can_listen("nonexistent.invalid", 8000)


def test_metrics_count_known_routes_only(server):
    for path in ("/v1/nope-1", "/v1/nope-2", "/nowhere"):
        assert httpx.get(f"{server.url}{path}").status_code == 404
    text = httpx.get(f"{server.url}/metrics").text
    assert "nope" not in text and "nowhere" not in text


def test_preformatted_stream_events_equal_the_full_encoding():
    """The streaming fast path (an envelope formatted once per reply) sends the same JSON as
    the dict + json.dumps path, in ASCII, one event per line pair, for both APIs."""
    import json

    from truthgpt.serving.responses import Choice, Delta, Reply, sse

    for chat in (False, True):
        reply = Reply('model "x"', chat, False, token_text=None)
        for finish in (None, "stop", "length"):
            choice = Choice(2, finish_reason=finish)
            for first in (True, False):
                for text in ('h\u00e9llo\u2028\n"x\\', ""):
                    fast = reply.chunk_event(choice, Delta(text), first)
                    full = sse(reply.chunk(choice, Delta(text), first))
                    assert json.loads(fast[len("data: ") :]) == json.loads(full[len("data: ") :])
                    assert fast.isascii() and fast.endswith("\n\n") and fast.count("\n") == 2


def test_top_k_0_and_minus_1_are_off_in_the_api_as_in_the_config_and_the_cli():
    from pydantic import ValidationError

    from truthgpt.config import load
    from truthgpt.errors import ConfigError
    from truthgpt.serving.protocol import CompletionRequest

    for off in (0, -1):
        defaults = load({}).inference
        assert CompletionRequest(prompt="a", top_k=off).sampling(5, None, defaults).top_k == off
        assert load({"inference": {"top_k": off}}).inference.top_k == off
    with pytest.raises(ValidationError, match="top_k"):
        CompletionRequest(prompt="a", top_k=-2)
    with pytest.raises(ConfigError, match="top_k"):
        load({"inference": {"top_k": -2}})


def test_a_request_leaving_sampling_out_takes_the_runs_inference_defaults(folder):
    # The run's inference: section is what `truthgpt generate` samples with; the server must
    # use it for the fields a request omits, so one seed gives one text on both.
    from truthgpt.inference.generate import open_llm

    defaults = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    overrides = [f"inference.{key}={value}" for key, value in defaults.items()]
    llm, params = open_llm(str(folder), None, {"device": "cpu"}, overrides, 1, 7, [])
    params = dataclasses.replace(params, max_tokens=20, ignore_eos=True)
    expected = llm.generate(["def "], params, use_tqdm=False)[0].outputs[0].text
    greedy = llm.generate(["def "], dataclasses.replace(params, temperature=0), use_tqdm=False)

    running = start_server(folder, inference=defaults)
    try:
        body = {"prompt": "def ", "max_tokens": 20, "seed": 7, "ignore_eos": True}
        reply = httpx.post(running.url + "/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        # A field given explicitly wins over the run's default.
        given = httpx.post(running.url + "/v1/completions", json={**body, "temperature": 0})
        assert given.json()["choices"][0]["text"] == greedy[0].outputs[0].text
    finally:
        running.stop()


# Text in which characters span several byte-level tokens: every token's own text counts them
# once per token (U+FFFD each), the decoded text once.
SPLIT_TEXT = "naïve café: 日本語の文 ✓ Ωmega — end"


def test_text_offsets_follow_the_decoded_text_not_each_tokens_own(server):
    tokenizer = server.state.tokenizer
    prompt = tokenizer.encode("def f(x):\n    return x", add_special_tokens=False)
    output = tokenizer.encode(SPLIT_TEXT, add_special_tokens=False)
    assert sum(len(tokenizer.decode([t])) for t in output) != len(SPLIT_TEXT)  # the old drift
    # The decoding layer's count, read before each token: a stop string that never matches but
    # whose first character is held back now and then must not move it.
    for stop in ((), ("Ωx", "日x")):
        decoder = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=stop))
        offsets = []
        for token_id in output:
            offsets.append(decoder.decoded_length)
            decoder.add(token_id)
        decoder.flush()
        head = len(tokenizer.decode(prompt))
        clean = 0
        for i, offset in enumerate(offsets):
            before = tokenizer.decode(prompt + output[:i])
            if not before.endswith("\ufffd"):  # not inside a character
                assert offset == len(before) - head, i
                clean += 1
        assert clean > len(output) // 2
        assert offsets == sorted(offsets) and decoder.decoded_length == len(SPLIT_TEXT)
    # The echoed prompt: sent as text, it is echoed as sent.
    ids = tokenizer.encode(SPLIT_TEXT)
    starts = prompt_offsets(tokenizer, ids, SPLIT_TEXT)
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < len(SPLIT_TEXT)


def test_output_text_offsets_come_from_the_engines_decode(client, server, folder):
    # The server decoded every output a second time to find them; the engine's own decode now
    # gives them. The reference: the same seeded request on the offline engine, its token ids
    # decoded whole, at every token that does not start inside a character (the random model
    # writes many lone bytes).
    ask = dict(
        prompt="def parse(text):", max_tokens=40, temperature=1.0, seed=5, logprobs=1,
        extra_body={"top_k": 0, "ignore_eos": True},
    )  # fmt: skip
    reply = client.completions.create(model=server.model_id, **ask)
    stream = client.completions.create(model=server.model_id, stream=True, **ask)
    streamed = [at for chunk in stream for c in chunk.choices for at in c.logprobs.text_offset]
    offsets = reply.choices[0].logprobs.text_offset
    assert streamed == offsets and offsets == sorted(offsets)

    llm = truthgpt.LLM(str(folder), device="cpu")
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, top_k=0, ignore_eos=True)
    (out,) = llm.generate(["def parse(text):"], params, use_tqdm=False)[0].outputs
    assert out.text == reply.choices[0].text
    tokenizer, prompt = server.state.tokenizer, server.state.tokenizer.encode("def parse(text):")
    head, checked = len(tokenizer.decode(prompt)), 0
    for i, offset in enumerate(offsets):
        before = tokenizer.decode(prompt + out.token_ids[:i])
        if not before.endswith("\ufffd"):  # not inside a character
            assert offset == len(before) - head, i
            checked += 1
    assert checked > len(offsets) // 2


def test_echoed_logprobs_offsets_index_the_returned_text(client, server):
    reply = client.completions.create(
        model=server.model_id, prompt=SPLIT_TEXT, max_tokens=12, echo=True, logprobs=1, seed=3
    )
    choice = reply.choices[0]
    offsets, tokens = choice.logprobs.text_offset, choice.logprobs.tokens
    assert choice.text.startswith(SPLIT_TEXT)
    assert offsets == sorted(offsets) and offsets[-1] <= len(choice.text)
    # Where a prompt token's text is whole characters, the returned text has it at its offset.
    # (The random model's output holds invalid UTF-8: a token after a lone byte starts at that
    # byte's U+FFFD, which is shown only once the next token proves it final.)
    prompt = [(at, t) for at, t in zip(offsets, tokens) if at < len(SPLIT_TEXT)]
    whole = [(at, t) for at, t in prompt if t and not t.startswith("bytes:")]
    assert len(whole) >= 15
    assert all(choice.text[at : at + len(t)] == t for at, t in whole)


def test_tokens_inside_a_character_show_their_bytes(client, server):
    # Each byte-level piece of a CJK character decodes to U+FFFD alone: shown as OpenAI shows
    # them (bytes:\xe6...), with their real bytes, so that top_logprobs keys stay apart and
    # the bytes of the tokens add up to the text.
    tokenizer, token_text = server.state.tokenizer, server.state.token_text
    ids = tokenizer.encode(SPLIT_TEXT, add_special_tokens=False)
    shown = [token_text(t) for t in ids]
    assert any(text.startswith("bytes:\\x") for text in shown)
    assert not any("\ufffd" in text for text in shown)
    assert b"".join(bytes(token_text.bytes(t)) for t in ids) == SPLIT_TEXT.encode()
    reply = client.completions.create(
        model=server.model_id, prompt=SPLIT_TEXT, max_tokens=0, echo=True, logprobs=20
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens[: len(shown)] == shown
    tops = [top for top in logprobs.top_logprobs[1:] if top]
    assert all(len(top) >= 20 for top in tops)  # no two alternatives printed alike
    chat = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": SPLIT_TEXT}],
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
        seed=1,
    )
    content = chat.choices[0].logprobs.content
    raw = b"".join(bytes(item.bytes) for item in content)
    assert raw.decode("utf-8", errors="replace") == chat.choices[0].message.content


def test_a_peft_adapter_in_transformers_names_is_served_natively(tmp_path):
    """`export --no-merge-lora` writes the adapter in transformers' module names, as peft does
    for any HF Llama: serve refused the folder as "a LlamaForCausalLM, which only transformers'
    generate runs". Merged, the weights fit our decoder; the text is transformers + peft's."""
    folder = make_model_folder(tmp_path / "model")
    expected = hf_greedy_text(folder, "def ", 10, model=add_peft_adapter(folder))
    assert expected != hf_greedy_text(folder, "def ", 10)  # the adapter is not a no-op

    running = start_server(folder)
    try:
        body = {"prompt": "def ", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()
    finally:
        running.stop()
    assert reply["choices"][0]["text"] == expected


def test_the_result_cache_keeps_apart_echoes_of_one_prompt_sent_as_text_and_as_ids(tmp_path):
    # A tokenizer that adds BOS: "hi" and [BOS, hi] are the same token ids, but the first is
    # echoed as sent ("hi") and the second as its ids decode ("<bos>hi"). The cache keyed both
    # alike, so the second got the first's echo (and its text offsets).
    import shutil

    from tokenizers.processors import TemplateProcessing

    folder = make_model_folder(tmp_path / "plain")
    shutil.copytree(folder, tmp_path / "bos")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "bos")
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    tokenizer.save_pretrained(tmp_path / "bos")
    ids = tokenizer.encode("def ")
    assert ids[0] == bos
    running = start_server(tmp_path / "bos", serve={"result_cache": True})
    try:
        ask = {"max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
        url = running.url + "/v1/completions"
        as_text = httpx.post(url, json={**ask, "prompt": "def "}).json()["choices"][0]
        as_ids = httpx.post(url, json={**ask, "prompt": ids}).json()["choices"][0]
    finally:
        running.stop()
    output = as_text["text"].removeprefix("def ")
    assert as_ids["text"] == tokenizer.decode(ids) + output != as_text["text"]
    assert as_ids["logprobs"]["text_offset"] != as_text["logprobs"]["text_offset"]

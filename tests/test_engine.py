"""The generation engine against `transformers` `generate` on the same weights.

Tiny random Llama, Qwen2 and GPT-2 models in fp32 on the CPU; block sizes small enough that
sequences span several blocks; pools small enough to force preemption; prompts that share
prefixes so the prefix cache hits. The reference is always `generate` (greedy) or the engine
itself run alone (seeded sampling).
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
import torch
import transformers

from truthgpt.config import InferenceConfig
from truthgpt.data.tokenizer import train_bpe_tokenizer
from truthgpt.errors import ConfigError, RequestError
from truthgpt.inference.async_engine import AsyncEngine
from truthgpt.inference.engine import Engine
from truthgpt.inference.llm import LLM
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.models.hf_io import load_hf

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    import json

    source = Path(json.__file__).read_text() + Path(inspect.__file__).read_text()[:50_000]
    return train_bpe_tokenizer([source], vocab_size=320, max_chars=200_000)


def _hf_config(kind: str, vocab: int) -> transformers.PretrainedConfig:
    shape = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **shape)
    if kind == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **shape)
    return transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128
    )


def _models(kind: str, tokenizer, folder: Path):
    """(HF reference, our decoder loaded from the reference's saved folder), fp32 eval."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(_hf_config(kind, len(tokenizer)))
    reference.eval()
    reference.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return reference, load_hf(folder).eval()


def _opt_model(tokenizer, folder: Path):
    """A tiny OPT (an architecture the engine does not run: the transformers fallback's)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
    ).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _prompts(lengths: list[int], seed: int = 0, vocab: int = 300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _hf_greedy(reference, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def _engine(model, tokenizer, **options) -> Engine:
    settings = {"device": "cpu", "block_size": 4, "cuda_graphs": False, **options}
    return Engine(model, tokenizer, InferenceConfig(**settings))


def _run(engine: Engine, prompts, params) -> dict[str, list]:
    """All prompts at once; returns request id -> list of output token-id lists (per sample)."""
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params, detokenize=False)
    done = {}
    for _ in range(10_000):
        for output in engine.step():
            if output.finished:
                done[output.request_id] = [o.token_ids for o in output.outputs]
        if not engine.has_unfinished_requests():
            break
    return done


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_transformers_for_a_batch_of_prompts(kind, tokenizer, tmp_path):
    reference, ours = _models(kind, tokenizer, tmp_path)
    prompts = _prompts([5, 17, 9, 33, 1])
    engine = _engine(ours, tokenizer)
    done = _run(engine, prompts, GREEDY)
    for index, prompt in enumerate(prompts):
        assert done[str(index)][0] == _hf_greedy(reference, prompt), f"prompt {index}"
    assert engine.blocks.num_used_blocks == 0  # everything freed


def test_preemption_under_a_tiny_pool_keeps_greedy_exact(tokenizer, tmp_path):
    reference, ours = _models("llama", tokenizer, tmp_path)
    prompts = _prompts([20, 22, 18, 25], seed=1)
    # Each sequence needs 8-10 blocks of 4 tokens at its end; 14 cannot hold four of them.
    engine = _engine(ours, tokenizer, num_blocks=14, prefix_caching=False)
    done = _run(engine, prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    for index, prompt in enumerate(prompts):
        assert done[str(index)][0] == _hf_greedy(reference, prompt)


def test_prefix_cache_hits_give_the_same_tokens(tokenizer, tmp_path):
    reference, ours = _models("qwen2", tokenizer, tmp_path)
    shared = _prompts([26], seed=2)[0]
    tails = _prompts([3, 7, 1], seed=3)
    prompts = [shared + tail for tail in tails]
    engine = _engine(ours, tokenizer)
    first = _run(engine, prompts[:1], GREEDY)  # fills the cache
    hits_before = engine.blocks.stats.hit_tokens
    rest = _run(engine, prompts[1:], GREEDY)
    assert engine.blocks.stats.hit_tokens - hits_before >= 2 * 24  # 6 shared blocks each
    assert first["0"][0] == _hf_greedy(reference, prompts[0])
    for index, prompt in enumerate(prompts[1:]):
        assert rest[str(index)][0] == _hf_greedy(reference, prompt)


def test_a_block_computed_twice_keeps_the_prefix_chain(tokenizer, tmp_path):
    # Two greedy samples write the same output blocks: the second's stay unnamed (the first's
    # hold that content). The block after one was named as if it began a prompt, so a prompt
    # starting with that block's tokens reused keys computed at positions 8-11 after other
    # tokens: logprobs off by 1e-2 and, on a real model, other tokens.
    reference, ours = _models("llama", tokenizer, tmp_path)
    prompt = _prompts([7], seed=13)[0]
    engine = _engine(ours, tokenizer)
    done = _run(
        engine, [prompt], SamplingParams(temperature=0, n=2, max_tokens=20, ignore_eos=True)
    )
    assert done["0"][0] == done["0"][1]
    text = prompt + done["0"][0]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=3, ignore_eos=True)
    for start in range(8, 24, 4):  # each output block after the first
        probe = text[start : start + 4] + [17, 18]
        engine.add_request("probe", probe, params, detokenize=False)
        final = None
        while engine.has_unfinished_requests():
            final = engine.step()[-1]
        assert final.num_cached_tokens == 0, f"block at {start} was found as a first block"
        expected = _hf_prompt_logprobs(reference, probe + [0], len(tokenizer))[-1]
        (entry,) = final.outputs[0].logprobs
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in entry["top"]]), expected.topk(3).values, atol=2e-4, rtol=0
        )


def test_prefix_cache_stats_count_each_prompt_once(tokenizer, tmp_path):
    # A prompt that waits for blocks is looked up again every step, and a preempted one again
    # on its way back; each lookup used to count, so /metrics' hit rate leaned towards whoever
    # waited longest, and a preempted request reported its own recomputed blocks as cached
    # prompt tokens (32 of a 30-token prompt here).
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = _engine(ours, tokenizer, num_blocks=20)
    first = _prompts([72], seed=14)[0]  # with 4 new tokens, 19 of the pool's 19 blocks
    prompts = [first, first[:36] + [7, 7, 7, 7], _prompts([30], seed=15)[0]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("0", prompts[0], params, detokenize=False)
    engine.step()
    for index in (1, 2):
        engine.add_request(str(index), prompts[index], params, detokenize=False)
    cached = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            cached[output.request_id] = output.num_cached_tokens
    assert cached == {"0": 0, "1": 36, "2": 0}
    stats = engine.stats()
    assert (stats.prefix_hit_tokens, stats.prefix_queried_tokens) == (36, 72 + 40 + 30)


def test_chunked_prefill_matches_a_whole_prefill(tokenizer, tmp_path):
    reference, ours = _models("gpt2", tokenizer, tmp_path)
    prompts = _prompts([60, 3, 41], seed=4)
    engine = _engine(ours, tokenizer, max_num_batched_tokens=16)
    done = _run(engine, prompts, GREEDY)
    for index, prompt in enumerate(prompts):
        assert done[str(index)][0] == _hf_greedy(reference, prompt)


def test_staggered_load_with_aborts_and_preemption_equals_each_request_alone(tokenizer, tmp_path):
    """A trimmed random stress run: arrivals while others decode, prompts that share prefixes,
    equal and prefix-of-another prompts, a follow-up turn over an answer, greedy n=2, seeded
    samples, penalties, aborts; a pool small enough to preempt. Each finished request equals
    itself alone, each aborted one is a prefix of that, and every block is free at the end."""
    import dataclasses
    import random

    reference, ours = _models("llama", tokenizer, tmp_path)
    rng = random.Random(0)
    base = _prompts([40], seed=16)[0]
    prompts = [base[:30], base, base[:30], base[:9], *_prompts([1, 3, 57, 22, 13], seed=17)]
    requests = []  # (id, prompt, params, arrival step, tokens after which it is aborted)
    for index, prompt in enumerate(prompts):
        if index % 3 == 0:
            params = SamplingParams(temperature=0, max_tokens=rng.choice([1, 9, 24]), n=2)
        else:
            params = SamplingParams(
                temperature=0.9,
                top_k=rng.choice([0, 20]),
                seed=index,
                max_tokens=rng.choice([5, 16]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                ignore_eos=True,
            )
        arrival = rng.randrange(0, 30)
        abort = rng.randrange(1, 12) if index % 4 == 3 else None
        if abort is not None:
            params = dataclasses.replace(params, max_tokens=40, ignore_eos=True)
        requests.append((str(index), prompt, params, arrival, abort))
    engine = _engine(ours, tokenizer, num_blocks=28, max_num_batched_tokens=16, max_num_seqs=6)
    done, step, aborts = {}, 0, {r[0]: r[4] for r in requests if r[4] is not None}
    while engine.has_unfinished_requests() or any(r[3] >= step for r in requests):
        for request_id, prompt, params, arrival, _ in requests:
            if arrival == step:
                engine.add_request(request_id, prompt, params, detokenize=False)
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
            elif len(output.outputs[0].token_ids) >= aborts.get(output.request_id, 10**9):
                done[output.request_id] = engine.abort(output.request_id)
            if output.finished and output.request_id == "0":  # a follow-up turn over its answer
                turn = prompts[0] + output.outputs[0].token_ids + [5, 6]
                greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
                requests.append(("turn", turn, greedy, step + 1, None))
        step += 1
        assert step < 2_000, "requests never finished"
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.stats.hit_tokens > 0
    assert engine.blocks.num_used_blocks == 0 and not any(engine.blocks.ref_counts)
    aborted = [o for o in done.values() if o.outputs[0].finish_reason == "abort"]
    assert len(aborted) == len(aborts) == 2
    alone = _engine(ours, tokenizer, prefix_caching=False)
    for request_id, prompt, params, _, _ in requests:
        expected = _run(alone, [prompt], params)["0"]
        got = [sample.token_ids for sample in done[request_id].outputs]
        if done[request_id].outputs[0].finish_reason == "abort":
            assert all(ids == full[: len(ids)] for ids, full in zip(got, expected)), request_id
        else:
            assert got == expected, request_id
    assert done["turn"].outputs[0].token_ids == _hf_greedy(reference, requests[-1][1], 8)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=7, max_tokens=10)
    prompt = _prompts([9], seed=5)[0]
    alone = _run(_engine(ours, tokenizer), [prompt], params)["0"][0]
    others = _prompts([4, 12, 7, 20, 3, 15, 8], seed=6)
    mixed = [SamplingParams(temperature=0.7, seed=i, max_tokens=6) for i in range(len(others))]
    engine = _engine(ours, tokenizer)
    for index, other in enumerate(others):
        engine.add_request(f"other-{index}", other, mixed[index])
    engine.add_request("target", prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
    assert outputs["target"] == alone
    again = _run(_engine(ours, tokenizer), [prompt], params)["0"][0]
    assert again == alone


def test_n_samples_share_the_prompt_blocks(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = _engine(ours, tokenizer)
    prompt = _prompts([21], seed=8)[0]
    params = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=8)
    done = _run(engine, [prompt], params)["0"]
    assert len(done) == 3 and len({tuple(ids) for ids in done}) > 1
    # The 2nd and 3rd samples found the first's 5 full prompt blocks in the cache.
    assert engine.blocks.stats.hit_tokens >= 2 * 20


def test_bad_requests_are_refused_and_the_engine_keeps_serving(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = _engine(ours, tokenizer)
    engine.add_request("good", _prompts([6])[0], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", "", GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty-ids", [], GREEDY)
    with pytest.raises(RequestError, match="context"):
        engine.add_request("long", _prompts([128])[0], GREEDY)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("bad-id", [1, 10_000], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("good", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(RequestError, match="stop"):
        SamplingParams(stop=[3])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["good"]
    assert len(outputs[-1].outputs[0].token_ids) == NEW_TOKENS


def test_abort_frees_blocks_at_once(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = _engine(ours, tokenizer, prefix_caching=False)
    engine.add_request("a", _prompts([30])[0], GREEDY)
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    output = engine.abort("a")
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert engine.blocks.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_stop_strings_and_max_context(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = _engine(ours, tokenizer)
    prompt = _prompts([10], seed=9)[0]
    free = _run(engine, [prompt], GREEDY)["0"][0]
    text = tokenizer.decode(free)
    stop = text[3:6] if len(text) > 6 else text[-2:]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=stop))
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
    completion = final.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == text[: text.find(stop)]
    # max_tokens past the context is capped at the context, and says "length".
    long_params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    out = _run(engine, [_prompts([120])[0]], long_params)["0"][0]
    assert len(out) == 8


def test_async_engine_streams_deltas_that_add_up(tokenizer, tmp_path):
    _, ours = _models("llama", tokenizer, tmp_path)
    engine = AsyncEngine(_engine(ours, tokenizer))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(prompt):
        pieces, last = [], None
        async for output in engine.generate(prompt, params):
            pieces.append(output.outputs[0].delta_text)
            last = output
        return "".join(pieces), last

    async def main():
        good = asyncio.gather(*(one(p) for p in ["def f(x):", "import os\n", "class A:"]))
        with pytest.raises(RequestError):
            await one("")
        return await good

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for streamed, last in results:
        assert last.finished and streamed == last.outputs[0].text
        assert len(last.outputs[0].token_ids) == NEW_TOKENS


def test_llm_api_on_a_folder_and_the_transformers_fallback(tokenizer, tmp_path):
    reference, _ = _models("llama", tokenizer, tmp_path / "llama")
    prompts = _prompts([7, 3], seed=10)
    llm = LLM(tmp_path / "llama", device="cpu", block_size=8)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [_hf_greedy(reference, p) for p in prompts]
    with pytest.raises(ConfigError, match="block_size"):
        LLM(tmp_path / "llama", device="cpu", block_sise=8)

    other = _opt_model(tokenizer, tmp_path / "opt")
    fallback = LLM(tmp_path / "opt", device="cpu")
    assert fallback.engine is None
    outputs = fallback.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [_hf_greedy(other, p) for p in prompts]


@pytest.mark.parametrize("kind", ["qwen2", "opt"])
def test_every_end_token_the_folder_lists_ends_an_answer_as_in_transformers(
    kind, tokenizer, tmp_path
):
    # Qwen's and Llama 3's instruct models list the end of a chat turn beside eos in
    # generation_config.json; transformers stops at any of them, so must the engine (qwen2)
    # and the fallback (opt).
    folder = tmp_path / kind
    if kind == "opt":
        _opt_model(tokenizer, folder)
    else:
        _models(kind, tokenizer, folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = _prompts([9], seed=9)[0]
    free_run = _hf_greedy(reference, prompt)
    # A token the greedy answer reaches after a few others (tiny random models repeat one
    # token, the opt of this seed changes token at step 4; the qwen2 stops at its first).
    position = next((i for i in range(1, NEW_TOKENS) if free_run[i] not in free_run[:i]), 0)
    turn_end = free_run[position]
    assert turn_end != tokenizer.eos_token_id
    generation = transformers.GenerationConfig(eos_token_id=[tokenizer.eos_token_id, turn_end])
    generation.save_pretrained(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompt])
    expected = reference.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
    )[0, len(prompt) :].tolist()
    assert expected == free_run[: position + 1]  # transformers stopped at the listed token

    llm = LLM(folder, device="cpu", block_size=4)
    assert llm.end_token_ids == (tokenizer.eos_token_id, turn_end)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    (output,) = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert output.token_ids == expected
    assert (output.finish_reason, output.stop_reason) == ("stop", turn_end)
    unbounded = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (output,) = llm.generate([prompt], unbounded, use_tqdm=False)[0].outputs
    assert output.token_ids == free_run and output.finish_reason == "length"


def test_generate_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    """Keeps benchmarks/generate_throughput.py in step with the engine (a smoke run: the numbers
    exist and the engine made every token; no timing is asserted)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "benchmarks" / "generate_throughput.py"
    args = ["--tiny", "--workloads", "b1,nano,prefix", "--repeats", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["b1"]["truthgpt engine"]["tok_s"][0] > 0
    assert report["nano"]["tokens"] > 0
    assert {"prefix_cache_True", "prefix_cache_False"} <= set(report)


# -- prompt logprobs (what `echo` + `logprobs` returns, and how eval harnesses score text) -------


def _hf_prompt_logprobs(reference, prompt: list[int], vocab: int) -> torch.Tensor:
    """[P - 1, vocab]: the log-softmax at each position that predicts the next prompt token."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0, :-1, :vocab]
    return torch.log_softmax(logits.float(), dim=-1)


def _scores(engine: Engine, prompts, params) -> dict[str, list]:
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params, detokenize=False)
    scores, firsts = {}, {}
    for _ in range(10_000):
        for output in engine.step():
            firsts.setdefault(output.request_id, output.prompt_logprobs)
            if output.finished:
                scores[output.request_id] = output.prompt_logprobs
        if not engine.has_unfinished_requests():
            break
    assert firsts == scores  # complete in the first output already (what a stream sends)
    return scores


def _check_scores(scores: list, reference, prompt: list[int], k: int, vocab: int) -> None:
    expected = _hf_prompt_logprobs(reference, prompt, vocab)
    assert scores[0] is None and len(scores) == len(prompt)
    for position, entry in enumerate(scores[1:]):
        token = prompt[position + 1]
        assert entry["token_id"] == token
        torch.testing.assert_close(
            entry["logprob"], expected[position, token].item(), atol=2e-4, rtol=0
        )
        top = expected[position].topk(k)
        assert [tid for tid, _ in entry["top"]] == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in entry["top"]]), top.values, atol=2e-4, rtol=0
        )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_logprobs_match_transformers_in_chunks_and_batches(kind, tokenizer, tmp_path):
    reference, ours = _models(kind, tokenizer, tmp_path)
    vocab = len(tokenizer)
    prompts = _prompts([37, 5, 2, 23], seed=8)
    # 16-token steps: the long prompts are scored over several chunks, beside decodes.
    engine = _engine(ours, tokenizer, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    scores = _scores(engine, prompts, params)
    for index, prompt in enumerate(prompts):
        _check_scores(scores[str(index)], reference, prompt, 2, vocab)
    assert engine.blocks.num_used_blocks == 0


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(tokenizer, tmp_path):
    reference, ours = _models("qwen2", tokenizer, tmp_path)
    vocab = len(tokenizer)
    prompt = _prompts([30], seed=9)[0]
    engine = _engine(ours, tokenizer)
    _run(engine, [prompt], GREEDY)  # the whole prompt's blocks are now cached
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0, n=2)
    scores = _scores(engine, [prompt], params)["0"]
    _check_scores(scores, reference, prompt, 0, vocab)
    assert all(entry["top"] == [] for entry in scores[1:])

    # A pool too small for three of these: sequences are preempted and recomputed, and each
    # prompt's scores are still whole and taken once.
    prompts = _prompts([21, 24, 19], seed=10)
    small = _engine(ours, tokenizer, num_blocks=14, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, prompt_logprobs=1)
    scores = _scores(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    for index, prompt in enumerate(prompts):
        _check_scores(scores[str(index)], reference, prompt, 1, vocab)


def test_prompt_logprob_rows_per_step_are_capped(tokenizer, tmp_path, monkeypatch):
    import truthgpt.inference.scheduler as scheduler

    reference, ours = _models("llama", tokenizer, tmp_path)
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROB_ROWS", 6)
    engine = _engine(ours, tokenizer, max_num_batched_tokens=64)
    prompts = _prompts([25, 17], seed=11)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params, detokenize=False)
    batch = engine.scheduler.schedule()
    assert sum(batch.num_new_tokens) == 6  # both prompts want scoring: 6 rows between them
    engine._apply(batch, engine.runner.run(batch))
    scores = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                scores[output.request_id] = output.prompt_logprobs
    for index, prompt in enumerate(prompts):
        _check_scores(scores[str(index)], reference, prompt, 1, len(tokenizer))


def test_prompt_logprobs_through_the_llm_api_and_the_transformers_fallback(tokenizer, tmp_path):
    """Prompt and output logprobs, natively and through `generate` (an OPT): one run of
    scores over prompt + output that must equal transformers' log-softmax."""
    reference, _ = _models("llama", tokenizer, tmp_path / "llama")
    other = _opt_model(tokenizer, tmp_path / "opt")
    prompt = _prompts([12], seed=12)[0]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, logprobs=2)
    for folder, model in [("llama", reference), ("opt", other)]:
        llm = LLM(tmp_path / folder, device="cpu")
        assert (llm.engine is None) == (folder == "opt")
        output = llm.generate([prompt], params, use_tqdm=False)[0]
        sample = output.outputs[0]
        scores = output.prompt_logprobs + sample.logprobs
        _check_scores(scores, model, prompt + sample.token_ids, 2, len(tokenizer))

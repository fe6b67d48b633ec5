"""The batched sampler against references: argmax, transformers' logits processors, the OpenAI
penalty formula, log_softmax, a plain-Python hash, and a row sampled alone."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from truthgpt.errors import RequestError
from truthgpt.inference.sampler import (
    SamplingBatch,
    apply_filters,
    apply_penalties,
    noise_bits,
    sample,
)
from truthgpt.inference.sampling_params import SamplingParams


def build(params, logits, seeds=None, steps=None, prompt_ids=None, output_ids=None):
    rows = len(params)
    return SamplingBatch.build(
        params,
        seeds=list(range(rows)) if seeds is None else seeds,
        steps=[0] * rows if steps is None else steps,
        prompt_ids=prompt_ids,
        output_ids=output_ids,
        vocab_size=logits.shape[-1],
        device=logits.device,
    )


def hf_warped(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' own warpers, in generate()'s order, on one row [1, V]."""
    warpers = LogitsProcessorList()
    if params.temperature != 1:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    return warpers(torch.zeros(1, 1, dtype=torch.long), logits_row.clone())


def random_params(rng: random.Random, **fixed) -> SamplingParams:
    values = dict(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, -1, 1, 5, 40]),
        top_p=rng.choice([1.0, 0.3, 0.8]),
        min_p=rng.choice([0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.7, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.4, -1.0]),
        logprobs=rng.choice([None, 0, 3]),
    )
    values.update(fixed)
    return SamplingParams(**values)


# --- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", True, ">= 1"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_k", -2, "0 or -1"),
        ("top_p", 0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("min_p", -0.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("seed", 2**64, "integer"),
        ("seed", 1.5, "integer"),
        ("n", 0, ">= 1"),
        ("logprobs", 21, "[0, 20]"),
        ("logprobs", -1, "[0, 20]"),
        ("stop", 7, "string"),
        ("stop_token_ids", 5, "a list of token ids"),
        ("ignore_eos", "yes", "true or false"),
    ],
)
def test_bad_parameters_name_the_field_value_and_range(field, value, allowed) -> None:
    with pytest.raises(RequestError) as caught:
        SamplingParams(**{field: value})
    message = str(caught.value)
    assert message.startswith(field) and repr(value) in message and allowed in message


def test_top_p_message_reads_like_the_docs() -> None:
    with pytest.raises(RequestError, match=r"^top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)


def test_stop_is_normalised_and_checked() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    with pytest.raises(RequestError, match="stop must hold only strings, got 3 of type int"):
        SamplingParams(stop=["a", 3])
    with pytest.raises(RequestError, match=r"stop_token_ids must hold .*>= 0.*, got -1"):
        SamplingParams(stop_token_ids=[2, -1])
    with pytest.raises(RequestError, match="empty string"):
        SamplingParams(stop=["a", ""])
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


# --- filters and draws ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype) -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch = build([SamplingParams(temperature=0)] * 8, logits)
    assert batch.all_greedy
    assert torch.equal(sample(logits, batch).tokens, logits.float().argmax(-1))


def test_filters_keep_what_transformers_warpers_keep() -> None:
    rng = random.Random(0)
    logits = torch.randn(48, 120, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        random_params(
            rng,
            temperature=rng.choice([0.5, 1.0, 1.7]),
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
        for _ in range(48)
    ]
    ours = apply_filters(logits, build(params, logits))
    for row, p in enumerate(params):
        reference = hf_warped(logits[row : row + 1], p)[0]
        kept = reference.isfinite()
        assert torch.equal(ours[row].isfinite(), kept), p
        torch.testing.assert_close(ours[row][kept], reference[kept])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.8, top_k=4),
        SamplingParams(top_p=0.7),
        SamplingParams(temperature=1.3, min_p=0.15),
        SamplingParams(temperature=1.5, top_k=6, top_p=0.9, min_p=0.05),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "min_p", "all"],
)
def test_draws_follow_the_reference_distribution(params) -> None:
    # 20,000 draws from one fixed seed range (seeds and steps both vary): deterministic, so it
    # cannot flake. The expected total variation for this size is ~0.005.
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(2)) * 1.5
    reference = hf_warped(logits, params).softmax(-1)[0]
    draws = 20_000
    batch = build(
        [params] * draws,
        logits,
        seeds=[i // 40 for i in range(draws)],
        steps=[i % 40 for i in range(draws)],
    )
    tokens = sample(logits.expand(draws, -1), batch).tokens
    frequencies = torch.bincount(tokens, minlength=12).float() / draws
    assert (frequencies[reference == 0] == 0).all()
    total_variation = 0.5 * (frequencies - reference).abs().sum().item()
    assert total_variation < 0.02, (frequencies, reference)


def test_noise_bits_match_a_plain_python_hash() -> None:
    # The tensor code emulates uint32 arithmetic inside int64; Python ints are exact.
    def mix(x: int) -> int:  # lowbias32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    def reference(seed: int, step: int, index: int) -> int:
        low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        key_a = mix(mix(mix(low ^ 0x243F6A88) ^ high) ^ step)
        key_b = mix(mix(mix(low ^ 0x85A308D3) ^ high) ^ step)
        return mix(mix(index ^ key_a) ^ key_b)

    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345]
    steps = [0, 7, 2**31, 5, 4095, 1]
    bits = noise_bits(torch.tensor(seeds), torch.tensor(steps), 300)
    for row, (seed, step) in enumerate(zip(seeds, steps)):
        assert bits[row].tolist() == [reference(seed, step, i) for i in range(300)]


# --- penalties --------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers() -> None:
    rng = random.Random(3)
    vocab = 64
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * 4
    penalties = [1.0, 1.2, 2.0, 0.7, 1.5, 1.2]
    prompt_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))] for _ in range(6)]
    output_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))] for _ in range(6)]
    params = [SamplingParams(temperature=0, repetition_penalty=p) for p in penalties]
    batch = build(params, logits, prompt_ids=prompt_ids, output_ids=output_ids)
    ours = apply_penalties(logits, batch)
    for row, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompt_ids[row] + output_ids[row]], dtype=torch.long)
        reference = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row : row + 1])
        torch.testing.assert_close(ours[row], reference[0], rtol=0, atol=0)
    # Greedy rows take the argmax of the penalised logits.
    assert torch.equal(sample(logits, batch).tokens, ours.argmax(-1))


def test_presence_and_frequency_follow_the_openai_formula_on_output_tokens_only() -> None:
    rng = random.Random(4)
    vocab = 40
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2))
        for _ in range(5)
    ]
    prompt_ids = [[rng.randrange(vocab) for _ in range(10)] for _ in range(5)]
    output_ids = [[rng.randrange(vocab) for _ in range(15)] for _ in range(5)]
    ours = apply_penalties(logits, build(params, logits, None, None, prompt_ids, output_ids))
    for row, p in enumerate(params):
        counts = Counter(output_ids[row])
        reference = [
            value - p.presence_penalty * (counts[token] > 0) - p.frequency_penalty * counts[token]
            for token, value in enumerate(logits[row].tolist())
        ]
        torch.testing.assert_close(ours[row], torch.tensor(reference))


# --- rows, seeds and logprobs -----------------------------------------------------------------


def random_batch_inputs(rows: int, vocab: int, seed: int):
    rng = random.Random(seed)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    params = [random_params(rng) for _ in range(rows)]
    seeds = [rng.randrange(-(2**63), 2**63) for _ in range(rows)]
    steps = [rng.randrange(0, 500) for _ in range(rows)]
    prompt_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 20))] for _ in range(rows)]
    output_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 20))] for _ in range(rows)]
    return logits, params, seeds, steps, prompt_ids, output_ids


def test_a_row_draws_the_same_token_alone_and_in_a_batch_of_64() -> None:
    logits, params, seeds, steps, prompt_ids, output_ids = random_batch_inputs(64, 500, seed=5)
    together = sample(logits, build(params, logits, seeds, steps, prompt_ids, output_ids))
    reversed_rows = list(reversed(range(64)))
    backwards = sample(
        logits[reversed_rows],
        build(
            [params[i] for i in reversed_rows],
            logits,
            [seeds[i] for i in reversed_rows],
            [steps[i] for i in reversed_rows],
            [prompt_ids[i] for i in reversed_rows],
            [output_ids[i] for i in reversed_rows],
        ),
    )
    assert torch.equal(backwards.tokens.flip(0), together.tokens)
    for row in range(64):
        one = slice(row, row + 1)
        alone = sample(
            logits[one],
            build(params[one], logits, seeds[one], steps[one], prompt_ids[one], output_ids[one]),
        )
        assert alone.tokens.item() == together.tokens[row].item(), (row, params[row])
        if alone.logprobs is not None:
            assert alone.logprobs.item() == together.logprobs[row].item()
            k = params[row].logprobs
            assert torch.equal(alone.top_ids[0, :k], together.top_ids[row, :k])


def test_seeds_and_steps_change_the_draw_and_repeat_exactly() -> None:
    vocab = 1000
    logits = torch.zeros(64, vocab)  # uniform: every draw is pure noise
    params = [SamplingParams()] * 64
    by_seed = sample(logits, build(params, logits, seeds=list(range(64)))).tokens
    by_step = sample(logits, build(params, logits, seeds=[7] * 64, steps=list(range(64)))).tokens
    # 64 uniform draws from 1000 tokens repeat a token a couple of times at most.
    assert len(set(by_seed.tolist())) > 56 and len(set(by_step.tolist())) > 56
    again = sample(logits, build(params, logits, seeds=list(range(64)))).tokens
    assert torch.equal(by_seed, again)
    # Seeds past int64 (an engine's seed + index) wrap instead of failing.
    wrapped = sample(logits[:2], build(params[:2], logits, seeds=[2**63, 2**64 + 1])).tokens
    unwrapped = sample(logits[:2], build(params[:2], logits, seeds=[-(2**63), 1])).tokens
    assert torch.equal(wrapped, unwrapped)


def test_logprobs_are_the_raw_log_softmax() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 200, generator=generator) * 3).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(top_k=3, logprobs=2, presence_penalty=1.0),
        SamplingParams(top_p=0.5),
    ]
    output_ids = [[1, 2, 3], [], [4, 4], [5]]
    out = sample(logits, build(params, logits, None, None, [[9]] * 4, output_ids))
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert torch.equal(out.logprobs, raw.gather(-1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == (4, 5)
    reference = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, reference.values, rtol=0, atol=0)
    assert torch.equal(out.top_logprobs, raw.gather(-1, out.top_ids))
    no_logprobs = sample(logits, build([SamplingParams()] * 4, logits))
    assert no_logprobs.logprobs is None and no_logprobs.top_ids is None


def test_a_mixed_batch_follows_each_rows_own_params() -> None:
    # Row 0 greedy, row 1 top-p (nucleus = tokens 0 and 1), row 2 greedy with a repetition
    # penalty strong enough to move the argmax off the repeated token 3.
    probs = torch.tensor([0.45, 0.35, 0.1, 0.06, 0.04])
    logits = torch.stack([probs.log(), probs.log(), torch.tensor([0.0, 0.0, 1.0, 3.0, 2.5])])
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.7),
        SamplingParams(temperature=0, repetition_penalty=2.0),
    ]
    reference_penalised = RepetitionPenaltyLogitsProcessor(2.0)(
        torch.tensor([[3]]), logits[2:3].clone()
    )
    # 300 steps of the three rows, interleaved in one batch (rows are independent).
    steps = 300
    batch = build(
        params * steps,
        logits,
        seeds=[11, 12, 13] * steps,
        steps=[step for step in range(steps) for _ in range(3)],
        prompt_ids=[[], [], [3]] * steps,
        output_ids=[[], [], []] * steps,
    )
    tokens = sample(logits.repeat(steps, 1), batch).tokens.view(steps, 3)
    assert (tokens[:, 0] == 0).all()
    assert reference_penalised.argmax().item() == 4
    assert (tokens[:, 2] == 4).all()
    seen = Counter(tokens[:, 1].tolist())
    assert set(seen) == {0, 1}
    assert abs(seen[0] / steps - 0.45 / 0.8) < 0.1


def test_out_of_range_token_ids_are_refused() -> None:
    logits = torch.zeros(1, 10)
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 10\), got 12"):
        build([SamplingParams(repetition_penalty=1.2)], logits, None, None, [[1, 12]], [[]])


# --- GPU: no host sync, same tokens as the CPU --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_never_syncs_and_matches_the_cpu() -> None:
    logits, params, seeds, steps, prompt_ids, output_ids = random_batch_inputs(64, 32000, seed=8)
    cpu = sample(logits, build(params, logits, seeds, steps, prompt_ids, output_ids))
    cuda_logits = logits.cuda()
    sample(cuda_logits, build(params, cuda_logits, seeds, steps, prompt_ids, output_ids))  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = build(params, cuda_logits, seeds, steps, prompt_ids, output_ids)
        out = sample(cuda_logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Integer noise is bit-identical; float log/softmax may differ in the last ulp, which can
    # flip a draw only at a near-exact tie, so allow one row in 64 to differ.
    assert (out.tokens.cpu() != cpu.tokens).sum().item() <= 1
    assert math.isfinite(out.logprobs.sum().item())

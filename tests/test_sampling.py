"""Sampling: greedy, top-k, top-p against hand-computed expectations; bad parameters."""

from __future__ import annotations

import pytest
import torch

from truthgpt.errors import RequestError
from truthgpt.inference.sampling import SamplingParams, sample_next_token


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50)
    out = sample_next_token(logits, SamplingParams(temperature=0))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_is_greedy_and_top_k_limits_support() -> None:
    logits = torch.randn(2, 50)
    gen = torch.Generator().manual_seed(0)
    out = sample_next_token(logits, SamplingParams(temperature=1.0, top_k=1), gen)
    assert torch.equal(out, logits.argmax(-1))
    allowed = torch.topk(logits, 5, dim=-1).indices
    for _ in range(200):
        out = sample_next_token(logits, SamplingParams(temperature=1.5, top_k=5), gen)
        assert all(out[b] in allowed[b] for b in range(2))


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two tokens only.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next_token(logits, SamplingParams(1.0, None, 0.7), gen)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample_next_token(logits, SamplingParams(1.0, None, 0.1), gen)) for _ in range(50)}
    assert seen == {0}


def test_sampling_frequencies_follow_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    gen = torch.Generator().manual_seed(1)
    out = sample_next_token(logits, SamplingParams(1.0, None, 1.0), gen)
    freq = torch.bincount(out, minlength=3).float() / out.numel()
    assert torch.allclose(freq, probs, atol=0.02)


def test_seeded_sampling_reproduces() -> None:
    logits = torch.randn(4, 100)
    a = sample_next_token(logits, SamplingParams(), torch.Generator().manual_seed(7))
    b = sample_next_token(logits, SamplingParams(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_parameters_are_request_errors(kwargs: dict, word: str) -> None:
    with pytest.raises(RequestError, match=word):
        SamplingParams(**kwargs)

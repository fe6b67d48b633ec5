"""Generation for models the engine does not run natively: `transformers` `generate`, one request
at a time, behind the same `RequestOutput` shape so callers need not care."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from truthgpt.inference.detokenizer import end_token_ids_of
from truthgpt.inference.request import CompletionOutput, RequestOutput
from truthgpt.inference.sampling_params import SamplingParams


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.inference_mode()
def hf_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    prompt: str | None = None,
    end_token_ids: Sequence[int] | None = None,
) -> RequestOutput:
    """All n samples of one request through `model.generate` (stop strings cut afterwards).
    `end_token_ids`: the tokens that end an answer (default: the tokenizer's eos)."""
    from truthgpt.errors import RequestError

    device = next(model.parameters()).device
    limit = max_positions(model)
    max_new = params.max_tokens
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model takes {limit}")
        max_new = min(max_new, limit - len(prompt_ids))
    arrival = time.monotonic()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    eos = list(end_token_ids_of(tokenizer) if end_token_ids is None else end_token_ids)
    settings = {
        "max_new_tokens": max_new,
        "do_sample": not params.greedy,
        "num_return_sequences": params.n,
        "eos_token_id": None if params.ignore_eos else (eos + list(params.stop_token_ids)) or None,
        "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id or 0,
        "repetition_penalty": params.repetition_penalty,
    }
    if not params.greedy:
        # top_k 0 or -1 is off here; transformers' off is 0 (it refuses -1, and None would
        # leave the model's generation_config top_k in place).
        top_k = max(params.top_k, 0)
        settings.update(temperature=params.temperature, top_k=top_k, top_p=params.top_p)
        if params.min_p:
            settings["min_p"] = params.min_p
    ids = torch.tensor([prompt_ids], device=device)
    step_logits = None
    if params.logprobs is not None:  # the raw logits of every step, as the engine reports them
        settings.update(output_logits=True, return_dict_in_generate=True)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    if params.logprobs is not None:
        step_logits = torch.stack(generated.logits, dim=1)[..., : len(tokenizer)]  # [n, T, V]
        generated = generated.sequences
    outputs = []
    stops = set(settings["eos_token_id"] or [])
    for index, row in enumerate(generated[:, len(prompt_ids) :].tolist()):
        finish, stop_reason = "length", None
        for position, token in enumerate(row):
            if token in stops:
                row, finish, stop_reason = row[: position + 1], "stop", token
                break
        text_ids = row[:-1] if finish == "stop" else row
        text = tokenizer.decode(text_ids, skip_special_tokens=params.skip_special_tokens)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                keep = cut + len(stop) if params.include_stop_str_in_output else cut
                text, finish, stop_reason = text[:keep], "stop", stop
        output = CompletionOutput(index, text, row, text, row, finish, stop_reason)
        if step_logits is not None:
            from truthgpt.inference.sampler import token_logprobs

            output.logprobs = token_logprobs(step_logits[index, : len(row)], row, params.logprobs)
        outputs.append(output)
    now = time.monotonic()
    output = RequestOutput(
        request_id, list(prompt_ids), outputs, True, 0, arrival, now, now, prompt
    )
    if params.prompt_logprobs is not None:
        output.prompt_logprobs = _prompt_logprobs(
            model, ids, len(tokenizer), params.prompt_logprobs
        )
    return output


def _prompt_logprobs(model: nn.Module, ids: torch.Tensor, vocab: int, k: int) -> list:
    """Each prompt token's logprob given the ones before it (None for the first), as the
    engine gives them."""
    from truthgpt.inference.sampler import token_logprobs

    logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, :-1, :vocab]
    return [None, *token_logprobs(logits, ids[0, 1:].tolist(), k)]

"""Batched next-token sampling on the device, every row with its own parameters and seed.

One call turns the logits of a step ([B, V], one row per running sequence) into B tokens without
a host sync: no `.item()`, no Python branching on tensor values. Python branches only on which
features the batch uses, so an all-greedy batch costs one argmax.

Order of processing, as in transformers and vLLM: penalties -> (greedy rows: argmax) ->
temperature -> top-k -> top-p -> min-p -> draw.

Randomness is a counter-based hash of (seed, step, vocab index), not a torch.Generator: a
generator's stream is shared by the whole batch, so a request's tokens would depend on which
other requests ran beside it and in which row. With the hash, row b's noise is a pure function
of its own seed and step, the same alone or in a batch of 64, on CPU or GPU (integer ops are
exact everywhere). The draw is the exponential race (Gumbel-max): argmax(p / E) with
E ~ Exp(1) i.i.d. per token picks token i with probability p_i, and needs no multinomial.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from truthgpt.errors import RequestError
from truthgpt.inference.sampling_params import SamplingParams

# Temperatures below this are raised to it: logits / 1e-30 overflow fp32 to inf and the softmax
# of the top-p step turns into NaN. At 1e-5 a logit 2e-4 below the top one is already e**-20
# times less likely, so the row is argmax in all but near-ties (vLLM calls < 1e-5 greedy).
_MIN_TEMPERATURE = 1e-5

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """The per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: Tensor  # [B] fp32, 0 = greedy row
    top_k: Tensor  # [B] int64, vocab size when off
    top_p: Tensor  # [B] fp32
    min_p: Tensor  # [B] fp32
    seeds: Tensor  # [B] int64
    steps: Tensor  # [B] int64, index of the token being drawn (0 for the first new token)
    repetition_penalty: Tensor | None = None  # [B] fp32; None when no row uses it
    presence_penalty: Tensor | None = None
    frequency_penalty: Tensor | None = None
    prompt_token_mask: Tensor | None = None  # [B, V] bool: token is in the prompt
    output_token_counts: Tensor | None = None  # [B, V] int32: times the token was generated
    num_logprobs: int = -1  # most top logprobs any row wants; -1: no row wants logprobs
    all_greedy: bool = False
    any_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_penalty: bool = False

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        prompt_ids: Sequence[Sequence[int]] | None,
        output_ids: Sequence[Sequence[int]] | None,
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Gather the rows on the host, then copy each kind of tensor to `device` once.

        prompt_ids / output_ids are needed only when a row uses a penalty (else pass None).
        """
        device = torch.device(device)
        rows = len(params)
        if len(seeds) != rows or len(steps) != rows:
            raise ValueError(f"{rows} params but {len(seeds)} seeds and {len(steps)} steps")
        temperature = [
            0.0 if p.temperature == 0 else max(p.temperature, _MIN_TEMPERATURE) for p in params
        ]
        # Off is k = V: the rank mask `rank >= k` then drops nothing, with no per-row branch.
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        float_rows = {
            "temperature": temperature,
            "top_p": [p.top_p for p in params],
            "min_p": [p.min_p for p in params],
        }
        repetition = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        if any(value != 1.0 for value in repetition):
            float_rows["repetition_penalty"] = repetition
        if any(value != 0.0 for value in presence):
            float_rows["presence_penalty"] = presence
        if any(value != 0.0 for value in frequency):
            float_rows["frequency_penalty"] = frequency
        # Seeds wrap into int64 as they would in C: the engine may derive them (seed + index
        # for n > 1) past 2**63, and only their 64 bits matter to the hash.
        wrapped_seeds = [(seed + 2**63) % 2**64 - 2**63 for seed in seeds]
        int_rows = {"top_k": top_k, "seeds": wrapped_seeds, "steps": list(steps)}
        penalised_ids: dict[str, Sequence[Sequence[int]]] = {}
        if len(float_rows) > 3:
            if output_ids is None or len(output_ids) != rows:
                raise ValueError("penalties need output_ids, one list per row")
            penalised_ids["output"] = output_ids
            if "repetition_penalty" in float_rows:
                if prompt_ids is None or len(prompt_ids) != rows:
                    raise ValueError("repetition_penalty needs prompt_ids, one list per row")
                penalised_ids["prompt"] = prompt_ids
            for name, id_lists in penalised_ids.items():
                int_rows[f"{name}_lengths"] = [len(ids) for ids in id_lists]

        # One host->device copy for all float rows and one for all int rows; fields are views.
        floats = dict(zip(float_rows, _to_device(list(float_rows.values()), torch.float32, device)))
        ints = dict(zip(int_rows, _to_device(list(int_rows.values()), torch.int64, device)))
        batch = cls(
            temperature=floats["temperature"],
            top_k=ints["top_k"],
            top_p=floats["top_p"],
            min_p=floats["min_p"],
            seeds=ints["seeds"],
            steps=ints["steps"],
            repetition_penalty=floats.get("repetition_penalty"),
            presence_penalty=floats.get("presence_penalty"),
            frequency_penalty=floats.get("frequency_penalty"),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            all_greedy=all(t == 0 for t in temperature),
            any_greedy=any(t == 0 for t in temperature),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p.top_p < 1 for p in params),
            any_min_p=any(p.min_p > 0 for p in params),
            any_penalty=bool(penalised_ids),
        )
        if "output" in penalised_ids:
            flat = _flat_positions(penalised_ids["output"], ints["output_lengths"], vocab_size)
            counts = torch.zeros(rows * vocab_size, dtype=torch.int32, device=device)
            ones = torch.ones_like(flat, dtype=torch.int32)
            batch.output_token_counts = counts.scatter_add_(0, flat, ones).view(rows, vocab_size)
        if "prompt" in penalised_ids:
            flat = _flat_positions(penalised_ids["prompt"], ints["prompt_lengths"], vocab_size)
            mask = torch.zeros(rows * vocab_size, dtype=torch.bool, device=device)
            batch.prompt_token_mask = mask.index_fill_(0, flat, True).view(rows, vocab_size)
        return batch


@dataclass
class SamplerOutput:
    tokens: Tensor  # [B] int64
    # Raw model distribution (log_softmax of the logits before penalties and temperature), as the
    # OpenAI API reports it; present when a row asked for logprobs.
    logprobs: Tensor | None = None  # [B] fp32, of the chosen token
    top_logprobs: Tensor | None = None  # [B, k] fp32, k = num_logprobs
    top_ids: Tensor | None = None  # [B, k] int64


def sample(logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Draw one token per row of `logits` [B, V] (any float dtype; the work is in fp32)."""
    logits = logits.float()  # may alias the caller's tensor: every op below is out of place
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
    logits = apply_penalties(logits, batch)
    if batch.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = draw(apply_filters(logits, batch), batch.seeds, batch.steps)
        if batch.any_greedy:
            tokens = torch.where(batch.temperature == 0, logits.argmax(dim=-1), tokens)
    if raw_logprobs is None:
        return SamplerOutput(tokens=tokens)
    top_logprobs, top_ids = raw_logprobs.topk(min(batch.num_logprobs, logits.shape[-1]), dim=-1)
    chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    return SamplerOutput(tokens, chosen, top_logprobs, top_ids)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF: prompt and output tokens), then presence and frequency (OpenAI: output)."""
    if not batch.any_penalty:
        return logits
    counts = batch.output_token_counts
    if counts is None:
        raise ValueError("a batch with penalties needs output_token_counts (SamplingBatch.build)")
    if batch.repetition_penalty is not None:
        if batch.prompt_token_mask is None:
            raise ValueError("repetition_penalty needs prompt_token_mask (SamplingBatch.build)")
        seen = batch.prompt_token_mask | (counts > 0)
        penalty = batch.repetition_penalty[:, None]
        # CTRL (Keskar et al. 2019) as transformers applies it: dividing a negative logit would
        # raise it, so negative logits are multiplied instead.
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if batch.frequency_penalty is not None:
        logits = logits - batch.frequency_penalty[:, None] * counts
    if batch.presence_penalty is not None:
        logits = logits - batch.presence_penalty[:, None] * (counts > 0)
    return logits


def apply_filters(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature, then top-k, top-p and min-p: the scores to draw from, -inf where dropped."""
    # Greedy rows divide by 1 here; their token is the argmax taken before, whatever is drawn.
    temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
    scores = logits / temperature[:, None]
    if batch.any_top_k or batch.any_top_p:
        scores = _top_k_top_p(scores, batch)
    if batch.any_min_p:
        # Keep p >= min_p * p_max, i.e. score - max_score >= log(min_p); min_p 0 gives -inf,
        # which drops nothing, so unaffected rows need no branch.
        max_score = scores.amax(dim=-1, keepdim=True)
        drop = scores - max_score < torch.log(batch.min_p)[:, None]
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _top_k_top_p(scores: Tensor, batch: SamplingBatch) -> Tensor:
    # One descending sort serves both filters. Stable, so tied tokens keep one order whatever
    # the batch size; top-k then keeps exactly k tokens.
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)
    drop = ranks[None, :] >= batch.top_k[:, None]
    if batch.any_top_p:
        # Top-p (Holtzman et al. 2020) over what top-k kept: drop a token once the tokens before
        # it already hold more than top_p of the mass. The first token has 0 before it and stays.
        probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
        # top_p = 1 must drop nothing, not the tail whose cumsum rounds to just above 1.
        drop_p = (mass_before > batch.top_p[:, None]) & (batch.top_p < 1)[:, None]
        drop = drop | drop_p
    drop = torch.empty_like(drop).scatter_(-1, order, drop)
    return scores.masked_fill(drop, float("-inf"))


def draw(scores: Tensor, seeds: Tensor, steps: Tensor) -> Tensor:
    """One token per row from softmax(scores), by the exponential race with hashed noise.

    argmax(p / E) = argmax(scores - log E): the softmax normaliser is shared by the row, and the
    log form never lets a tiny probability underflow to 0.
    """
    noise = exponential_noise(seeds, steps, scores.shape[-1])
    return (scores - noise.log()).argmax(dim=-1)


def exponential_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """E ~ Exp(1) [B, V] fp32, a pure function of (seed, step, vocab index) per entry."""
    bits = noise_bits(seeds, steps, vocab_size)
    # The top 23 bits, centred: u in [2**-24, 1 - 2**-24], both exact in fp32. A u of 1.0 would
    # give E = 0 and an infinite score (NaN on a dropped token), a u of 0 an infinite E.
    uniform = ((bits >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(uniform)


def noise_bits(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """The 32 random bits [B, V] int64 behind `exponential_noise`: a hash of (seed, step, index)."""
    seed_low = seeds & _MASK32
    seed_high = (seeds >> 32) & _MASK32
    step = steps & _MASK32
    # Two independent 32-bit keys per row, so two (seed, step) pairs share noise with chance
    # 2**-64, not 2**-32.
    key_a = _mix32(_mix32(_mix32(seed_low ^ 0x243F6A88) ^ seed_high) ^ step)[:, None]
    key_b = _mix32(_mix32(_mix32(seed_low ^ 0x85A308D3) ^ seed_high) ^ step)[:, None]
    index = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    return _mix32(_mix32(index ^ key_a) ^ key_b)


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons, hash-prospector): a 32-bit integer hash with full avalanche.

    Values stay in [0, 2**32) inside int64, and `_mul32` keeps every product below 2**48, so
    nothing overflows and CPU and GPU give the same bits.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: Tensor, constant: int) -> Tensor:
    # (x * c) mod 2**32 from 16-bit halves: x = hi * 2**16 + lo, and hi * c only matters mod 2**16.
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _to_device(rows: list[list], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        # Pinned memory lets the copy run asynchronously instead of syncing the stream.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _flat_positions(id_lists: Sequence[Sequence[int]], lengths: Tensor, vocab_size: int) -> Tensor:
    """row * V + token id of every listed token, on the lengths' device: where to scatter into
    a flattened [B, V] table."""
    flat = list(itertools.chain.from_iterable(id_lists))
    if flat and not 0 <= min(flat) <= max(flat) < vocab_size:
        bad = next(token for token in flat if not 0 <= token < vocab_size)
        raise RequestError(f"token ids must be in [0, {vocab_size}), got {bad}")
    ids = _to_device([flat], torch.int64, lengths.device)[0]
    rows = torch.arange(len(id_lists), device=lengths.device)
    # output_size is known on the host; without it repeat_interleave syncs to size its output.
    return rows.repeat_interleave(lengths, output_size=len(flat)) * vocab_size + ids


def token_logprobs(logits: Tensor, targets: Sequence[int], k: int, rows: int = 256) -> list[dict]:
    """Row i's logprob of `targets[i]` and its top k, as the engine's logprob entries
    ({"token_id", "logprob", "top": [(id, logprob)]}). The fp32 log-softmax runs `rows` rows at a
    time, and each slice comes to the host in one copy (ids are exact in fp32 below 2**24)."""
    entries: list[dict] = []
    k = min(k, logits.shape[-1])
    targets = list(targets)
    wanted = torch.tensor(targets, dtype=torch.int64).to(logits.device, non_blocking=True)
    for start in range(0, logits.shape[0], rows):
        logprobs = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        parts = [logprobs.gather(-1, wanted[start : start + rows, None])]
        if k:
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
            parts += [top_ids.float(), top_logprobs]
        host = torch.cat(parts, dim=1).tolist()
        for token, row in zip(targets[start : start + rows], host):
            top = list(zip(map(int, row[1 : 1 + k]), row[1 + k :]))
            entries.append({"token_id": token, "logprob": row[0], "top": top})
    return entries

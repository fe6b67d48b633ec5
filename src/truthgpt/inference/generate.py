"""A plain KV-cached generation loop for one prompt, over our decoder or any HF causal LM.

The batched serving engine (paged KV cache, continuous batching) is its own room; this is the
simple path `truthgpt generate` and `truthgpt.generate()` use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from truthgpt.errors import CheckpointError, RequestError
from truthgpt.inference.sampling import SamplingParams, sample_next_token
from truthgpt.models import Decoder, load_model, resolve_model_folder


def load_for_generation(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    folder = resolve_model_folder(path)
    model = load_model(folder, device=device, dtype=dtype)
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters in, generate at full speed
        model = model.merge_and_unload()
    model = model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} has no usable tokenizer: {exc}") from None
    return model, tokenizer


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> str:
    """The text a chat model expects for one user turn, ending where the answer begins."""
    if not tokenizer.chat_template:
        raise RequestError(
            "this model's tokenizer has no chat template; drop --chat or fine-tune with task: sft"
        )
    messages = [{"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _max_positions(model: nn.Module) -> int | None:
    if isinstance(model, Decoder):
        return model.config.max_position_embeddings
    return getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )


@torch.inference_mode()
def generate_token_ids(
    model: nn.Module,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_token_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until EOS or max_new_tokens."""
    if not prompt_ids:
        raise RequestError("the prompt is empty after tokenization")
    device = next(model.parameters()).device
    limit = _max_positions(model)
    max_new = params.max_new_tokens
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model takes {limit}")
        max_new = min(max_new, limit - len(prompt_ids))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    if isinstance(model, Decoder):
        cache = model.new_cache(1, len(prompt_ids) + max_new, device=device)
        logits = model(ids, cache=cache, start_pos=0).logits[:, -1]
        position = len(prompt_ids)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal position
            out = model(token.view(1, 1), cache=cache, start_pos=position).logits[:, -1]
            position += 1
            return out
    else:
        out = model(input_ids=ids, use_cache=True)
        logits, past = out.logits[:, -1], out.past_key_values

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal past
            result = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
            past = result.past_key_values
            return result.logits[:, -1]

    for index in range(max_new):
        token = sample_next_token(logits, params, generator)
        token_id = int(token)
        if eos_token_id is not None and token_id == eos_token_id:
            return
        yield token_id
        if index + 1 < max_new:
            logits = step(token)


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Sample a continuation of `prompt`; `on_text` receives the text as it grows (streaming)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    new_ids: list[int] = []
    shown = ""
    for token_id in generate_token_ids(model, prompt_ids, params, tokenizer.eos_token_id):
        new_ids.append(token_id)
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        # A byte-level token can end inside a UTF-8 character: wait for the rest of it.
        if on_text is not None and not text.endswith("\ufffd") and len(text) > len(shown):
            on_text(text[len(shown) :])
            shown = text
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    return text

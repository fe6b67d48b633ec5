"""The chat template of a tokenizer, or a plain one when it has none (models trained with task:
causal_lm): what the server's chat API and `generate --chat` both format messages with.

The rendered text is tokenized without the tokenizer's own special tokens, as the SFT data was
(and as vLLM does): templates write their BOS themselves, and a second one changes the answer."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Plain role headers: "<|user|>\nhi\n<|assistant|>\n".
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def uses_plain_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer has no chat template of its own (PLAIN_CHAT_TEMPLATE stands in)."""
    return not tokenizer.chat_template


def chat_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
) -> str:
    """`messages` ({"role", "content"} dicts) as the model's prompt text; with
    `add_generation_prompt`, it ends where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=PLAIN_CHAT_TEMPLATE if uses_plain_template(tokenizer) else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """`chat_text`'s token ids, with no special tokens beyond those the template writes."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)

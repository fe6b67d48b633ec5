"""The chat template of a tokenizer, or a plain one when it has none (models trained with task:
causal_lm): what the server's chat API and `generate --chat` both format messages with."""

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

"""SFT examples: chat or prompt/completion rows -> token ids whose labels keep only the answers.

A row is a JSON object with either
- `messages`: a list of {"role", "content"}, rendered with the tokenizer's chat template; the
  loss covers each assistant message's content and the end-of-turn token that closes it, or
- `prompt` and `completion`: the text prompt + completion + EOS, loss on completion + EOS.

The answer spans are found by characters, not by searching tokens: each assistant turn is
rendered once with the conversation before it (plus the generation prompt) and once including
it, the two lengths bound its text, and the tokenizer's offset mapping turns those character
spans into token labels. The whole conversation is tokenized in one piece, exactly as it reads.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from truthgpt.config import SFT_SOURCES, DataConfig
from truthgpt.data.loader import pad_collate
from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.data.sources import expand_paths, iter_jsonl, load_hf_dataset, split_train_val
from truthgpt.errors import ConfigError, DataError, did_you_mean

# The template set on a tokenizer that has none (our trained BPE): ChatML-like role headers in
# plain text and our EOS closing every turn, so a generated answer ends where generation stops.
#   <|user|>\nWhat is 2+3?<|endoftext|><|assistant|>\n5<|endoftext|>
# No new special tokens: the embedding table (maybe a pretrained one) keeps its size.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


# The roles of OpenAI's chat format and of the chat templates that follow it (Llama 3's
# `ipython`, OpenAI's `developer` and the older `function`).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")

# Rows tokenized per tokenizer call.
_ENCODE_BATCH = 512


@dataclass
class SFTRow:
    """One JSON object and where it came from ("file.jsonl:12" or "hf dataset 'x' row 3")."""

    record: dict[str, Any]
    where: str


@dataclass
class SFTStats:
    """What encoding a split did: examples kept, kept but cut, skipped as overlong, skipped
    because cutting left no answer token, skipped as rows without an answer; the longest row."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    answer_cut: int = 0
    no_answer: int = 0
    longest: int = 0

    def describe(self) -> str:
        """ "20 examples, 3 truncated, 1 skipped (...), longest row 75 tokens": zeros left out."""
        counts = [
            (self.truncated, "truncated"),
            (self.dropped, "dropped as overlong"),
            (self.answer_cut, "skipped (truncation cut off every answer token)"),
            (self.no_answer, "skipped (no answer)"),
        ]
        parts = [f"{self.examples} examples"] + [f"{n} {what}" for n, what in counts if n]
        if self.longest:
            parts.append(f"longest row {self.longest} tokens")
        return ", ".join(parts)

    def advice(self, max_seq_len: int, overlong: str) -> str:
        """What to change when these counts left no example, for the rows they name."""
        tips = []
        if self.answer_cut or self.dropped:
            tips.append(
                f"raise data.max_seq_len (now {max_seq_len}; the longest row is {self.longest} "
                "tokens)"
            )
            if overlong != "keep_end":
                tips.append(
                    "set data.overlong: keep_end (keeps each row's last max_seq_len tokens, "
                    "its final answer)"
                )
        if self.no_answer:
            tips.append(
                "give every row an answer: a chat row an `assistant` message, a "
                "prompt/completion row its `completion`"
            )
        return "; or ".join(tips) if tips else "check that the rows have answers"


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_sft_rows(cfg: DataConfig) -> tuple[list[SFTRow], list[SFTRow]]:
    """Train and val rows of `cfg.source` (jsonl or hf); val from `val_paths`, else a content-hash
    split of `val_fraction` (as the text sources split documents)."""
    if cfg.source not in SFT_SOURCES:
        raise ConfigError(
            f"data.source {cfg.source!r} has no sft rows; task sft reads jsonl files (or hf with "
            "a json builder) whose rows hold `messages` or `prompt` and `completion`"
        )
    if not cfg.paths and cfg.source == "jsonl":
        raise DataError("data.paths is empty: source 'jsonl' needs files or globs to read")
    if cfg.source == "jsonl":
        rows = _read_jsonl_rows(expand_paths(cfg.paths, "data.paths"), cfg.max_documents)
        val = (
            _read_jsonl_rows(expand_paths(cfg.val_paths, "data.val_paths"), None)
            if cfg.val_paths
            else None
        )
    else:
        if not cfg.hf_name:
            raise DataError("data.hf_name is empty: source 'hf' needs a dataset name or a builder")
        rows = _read_hf_rows(cfg, cfg.paths, cfg.max_documents)
        val = _read_hf_rows(cfg, cfg.val_paths, None) if cfg.val_paths else None
    if val is not None:
        train = rows
    else:
        # Keyed by content: a duplicated row cannot sit on both sides.
        keys = [
            json.dumps(row.record, sort_keys=True, ensure_ascii=False, default=str) for row in rows
        ]
        train, val = split_train_val(rows, keys, cfg.val_fraction)
    if not train:
        raise DataError(
            f"data.source {cfg.source!r}: no sft row for train in {cfg.paths or cfg.hf_name}; "
            "add rows or lower data.val_fraction"
        )
    return train, val


def _read_jsonl_rows(files: list[Path], max_rows: int | None) -> list[SFTRow]:
    rows: list[SFTRow] = []
    for where, record in iter_jsonl(files):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append(SFTRow(record, where))
    return rows


def _read_hf_rows(cfg: DataConfig, data_files: list[str], max_rows: int | None) -> list[SFTRow]:
    dataset = load_hf_dataset(cfg, data_files)
    if max_rows is not None:
        # Dataset and IterableDataset both iterate as dicts; islice stops a stream early.
        records: Iterable[dict[str, Any]] = itertools.islice(dataset, max_rows)
    else:
        records = dataset
    name = f"hf dataset {cfg.hf_name!r}"
    return [SFTRow(dict(record), f"{name} row {index}") for index, record in enumerate(records)]


def row_format(row: SFTRow, sft_format: str) -> str:
    """The format of `row`, "messages" or "prompt_completion": forced by `sft_format`, or
    detected when it is "auto". DataError naming the row and its keys when it has neither."""
    # Columns of an hf dataset are the union over rows: a key another row has reads as None.
    present = [key for key, value in row.record.items() if value is not None]
    has_messages = "messages" in present
    has_prompt = "prompt" in present and "completion" in present
    if sft_format == "messages" and has_messages:
        return "messages"
    if sft_format == "prompt_completion" and has_prompt:
        return "prompt_completion"
    if sft_format == "auto" and (has_messages or has_prompt):
        return "messages" if has_messages else "prompt_completion"
    wanted = {
        "messages": "`messages`",
        "prompt_completion": "`prompt` and `completion`",
        "auto": "`messages` (a list of {role, content}) or `prompt` and `completion`",
    }[sft_format]
    found = ", ".join(map(repr, present)) or "none"
    raise DataError(
        f"{row.where}: an sft row needs {wanted} (data.sft_format: {sft_format}); keys found: "
        f"{found}"
    )


# ---------------------------------------------------------------------------------------------
# Rendering: text plus the character spans of the answers


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer without a chat template DEFAULT_CHAT_TEMPLATE (saved with it, so
    generation formats prompts the same way). Returns True when the default was set."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def turn_end_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with, when it is not eos
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>): a model trained on the template ends its
    answers with it, so generation must stop there too. None: no template, or turns end with
    eos or with plain text."""
    if not tokenizer.chat_template:
        return None
    answer = "\u2063answer\u2063"  # invisible separators: no template or tokenizer merges them
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError:  # a template that wants a system turn first, say
        return None
    if answer not in text:
        return None
    tail = text[text.rindex(answer) + len(answer) :].strip()
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    if len(ids) == 1 and ids[0] in special and ids[0] != tokenizer.eos_token_id:
        return ids[0]
    return None


def render_row(
    tokenizer: PreTrainedTokenizerBase, row: SFTRow, sft_format: str
) -> tuple[str, list[tuple[int, int]]]:
    """The example's text and the [start, end) character spans that carry the loss."""
    if row_format(row, sft_format) == "prompt_completion":
        prompt = _text_field(row, "prompt")
        completion = _text_field(row, "completion")
        text = prompt + completion + tokenizer.eos_token
        return text, [(len(prompt), len(text))]
    messages = _messages(row)
    full = _apply_template(tokenizer, messages, False, row.where)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:index], True, row.where)
        through = _apply_template(tokenizer, messages[: index + 1], False, row.where)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{row.where}: the chat template does not render this conversation turn by turn "
                f"(message {index} changes the text before it), so the answer cannot be located; "
                "give data.tokenizer a tokenizer whose template appends each turn unchanged"
            )
        # The whitespace after the end-of-turn token belongs to the next turn's header (ChatML's
        # "<|im_end|>\n"): generation stops at the end token and never produces it.
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def _text_field(row: SFTRow, key: str) -> str:
    value = row.record[key]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {key!r} is a {type(value).__name__}, not text")
    return value


def _messages(row: SFTRow) -> list[dict[str, Any]]:
    messages = row.record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{row.where}: `messages` is a {type(messages).__name__}, not a list")
    if not messages:
        raise DataError(
            f"{row.where}: `messages` is empty; a chat row needs its turns, at least one "
            "`assistant` message (the answer the loss is on)"
        )
    for index, message in enumerate(messages):
        ok = (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise DataError(
                f"{row.where}: message {index} must be an object with text `role` and `content`, "
                f"got {message!r:.200}"
            )
        # Only `assistant` turns carry the loss: a misspelt role ("asistant", "Assistant")
        # would otherwise render as a prompt and its row be skipped as one without answers.
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{row.where}: message {index} has role {message['role']!r}"
                f"{did_you_mean(message['role'], CHAT_ROLES)} (roles: {', '.join(CHAT_ROLES)}; "
                "the loss is on the `assistant` messages)"
            )
    return messages


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    where: str,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:  # templates raise on roles or orders they refuse
        raise DataError(f"{where}: the chat template refused this conversation: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_rows(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[SFTRow],
    sft_format: str,
    max_seq_len: int,
    overlong: str,
) -> tuple[list[tuple[list[int], list[int]]], SFTStats]:
    """(input_ids, labels) per kept row, labels -100 outside the answers, and the counts.

    Longer than max_seq_len: `overlong` "truncate" keeps the first max_seq_len tokens,
    "keep_end" the last ones (the final answer survives a long prompt), "drop" skips the row.
    A row with no answer token left to predict is skipped and counted.
    """
    if not tokenizer.is_fast:
        raise DataError(
            "task sft needs a fast tokenizer (a folder with tokenizer.json): the answer tokens "
            "are located through its character offsets"
        )
    examples: list[tuple[list[int], list[int]]] = []
    stats = SFTStats()
    for input_ids, labels in _encode(tokenizer, rows, sft_format):
        stats.longest = max(stats.longest, len(input_ids))
        cut = len(input_ids) > max_seq_len
        if cut and overlong == "drop":
            stats.dropped += 1
            continue
        if cut:
            keep = slice(-max_seq_len, None) if overlong == "keep_end" else slice(max_seq_len)
            input_ids, labels = input_ids[keep], labels[keep]
        # labels[0] is never predicted (the model shifts labels by one).
        if all(label == IGNORE_INDEX for label in labels[1:]):
            if cut:
                stats.answer_cut += 1
            else:
                stats.no_answer += 1
            continue
        stats.truncated += cut
        examples.append((input_ids, labels))
    stats.examples = len(examples)
    return examples, stats


def _encode(
    tokenizer: PreTrainedTokenizerBase, rows: list[SFTRow], sft_format: str
) -> Iterator[tuple[list[int], list[int]]]:
    for start in range(0, len(rows), _ENCODE_BATCH):
        rendered = [
            render_row(tokenizer, row, sft_format) for row in rows[start : start + _ENCODE_BATCH]
        ]
        encoded = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=False,  # templates write their own BOS; p/c texts have none
            # The template's EOS / end-of-turn strings must become their special tokens.
            split_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        for (_, spans), input_ids, offsets in zip(
            rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            yield input_ids, answer_labels(input_ids, offsets, spans)


def answer_labels(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """input_ids where a token's characters overlap an answer span, else -100.

    Overlap, not containment: a token that merges the last prompt character with the first
    answer character (BPE can do that) is still something the model must produce.
    """
    labels = []
    for token, (start, end) in zip(input_ids, offsets, strict=True):
        inside = any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


class ExampleDataset(Dataset):
    """Variable-length examples: item i is {"input_ids", "labels"}, LongTensor[lengths[i]].

    Stored as two flat int32 arrays and offsets. `lengths` lets `EpochBatches` group batches by
    length, and `collate` pads a batch on the right (`pad_collate`).
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int) -> None:
        self.lengths = [len(input_ids) for input_ids, _ in examples]
        self.offsets = [0, *itertools.accumulate(self.lengths)]
        flat_ids = [token for input_ids, _ in examples for token in input_ids]
        flat_labels = [label for _, labels in examples for label in labels]
        self.tokens = torch.tensor(flat_ids, dtype=torch.int32)
        self.labels = torch.tensor(flat_labels, dtype=torch.int32)
        self.pad_id = pad_id

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": self.tokens[start:end].long(), "labels": self.labels[start:end].long()}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_collate(items, self.pad_id)


def sft_texts(rows: Iterable[SFTRow]) -> Iterator[str]:
    """The plain text of each row (contents, prompts, completions), to train a BPE on."""
    for row in rows:
        record = row.record
        if isinstance(record.get("messages"), list):
            parts = [m.get("content") for m in record["messages"] if isinstance(m, dict)]
        else:
            parts = [record.get("prompt"), record.get("completion")]
        text = "\n".join(part for part in parts if isinstance(part, str))
        if text.strip():
            yield text

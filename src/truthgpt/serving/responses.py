"""OpenAI response bodies and stream chunks, built from the engine's outputs.

Completions and chat differ only in names (`text` vs `message`/`delta`, the shape of
`logprobs`, the object type), so one `Choice` accumulator serves both and two small functions
turn it into each format.
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from truthgpt.inference.detokenizer import REPLACEMENT, IncrementalDetokenizer
from truthgpt.inference.request import CompletionOutput
from truthgpt.inference.sampling_params import SamplingParams


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any] | str) -> str:
    # ASCII-only JSON: an SSE event ends at a line break, and clients that split lines the way
    # Python's str.splitlines does (httpx's aiter_lines) also break at U+2028, U+0085 and
    # others that JSON may carry raw; escaped, they cannot cut an event in two.
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


class Delta(NamedTuple):
    """One stream event's share of a choice: new text, new logprob entries and where their
    text starts in the output, and the echoed prompt (sent ahead of the text, once)."""

    text: str
    logprobs: Sequence[dict] = ()
    echo: str = ""
    offsets: Sequence[int] = ()


@dataclass
class Choice:
    """One choice's text, token count and logprobs so far; `take_delta` hands out what is new.

    `echo`: the prompt's text, sent before the output (completions' echo); `prompt_logprobs`:
    its tokens' entries (the first one's logprob None), once the engine has scored them.
    `score_only`: max_tokens 0 with echo: the one token the engine had to make is dropped.
    `prompt_offsets`: where each echoed prompt token's text starts in `echo`."""

    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    echo: str = ""
    prompt_logprobs: list[dict] | None = None
    score_only: bool = False
    prompt_offsets: list[int] | None = None
    _logprobs_seen: int = 0
    _sent_text: int = 0
    _sent_logprobs: int = 0
    _sent_echo: bool = False

    def update(self, out: CompletionOutput) -> None:
        if out.finish_reason is not None:
            # "abort" is ours (a cancelled request); the API knows stop and length only.
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
        if self.score_only:  # no output was asked for: it ends at its length, 0
            self.finish_reason = self.finish_reason and "length"
            return
        self.text += out.delta_text
        self.num_tokens = len(out.token_ids)
        if out.logprobs is not None:
            # The engine's list, which may grow before the next update: its entries up to now
            # are the ones that go with this text.
            self.logprobs = out.logprobs
            self._logprobs_seen = len(out.logprobs)

    def take_delta(self) -> Delta:
        """What is new since the last call (the echoed prompt: the first time only)."""
        seen = self._logprobs_seen
        entries = self.logprobs[self._sent_logprobs : seen]
        delta = Delta(
            self.text[self._sent_text :],
            entries,
            "" if self._sent_echo else self.echo,
            [entry["text_offset"] for entry in entries],
        )
        self._sent_text, self._sent_logprobs, self._sent_echo = len(self.text), seen, True
        return delta

    def entries(self) -> list[dict]:
        """The logprob entries of the tokens so far."""
        return self.logprobs[: self._logprobs_seen]

    def output_offsets(self) -> list[int]:
        """Where each output token's text starts: the engine's decode says (its text_offset)."""
        return [entry["text_offset"] for entry in self.entries()]


def prompt_offsets(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], echo: str
) -> list[int]:
    """Each prompt token's start in the echoed prompt, decoded as the engine decodes an output
    (a character whose bytes span tokens counts once, where the text has it). A prompt sent as
    text is echoed as sent, so the text a tokenizer adds before it (a BOS) is taken off."""
    params = SamplingParams(ignore_eos=True, skip_special_tokens=False)
    decoder = IncrementalDetokenizer(tokenizer, [], params)
    starts = []
    for token_id in prompt_ids:
        starts.append(decoder.decoded_length)
        decoder.add(token_id)
    decoder.flush()  # an unfinished character at the end counts too
    extra = max(decoder.decoded_length - len(echo), 0)
    return [max(start - extra, 0) for start in starts]


def prompt_entries(prompt_ids: list[int], scores: list[dict | None]) -> list[dict]:
    """The engine's prompt logprobs as logprob entries, the first token's with logprob None."""
    first = {"token_id": prompt_ids[0], "logprob": None, "top": None}
    return [first, *scores[1:]]


class TokenText:
    """Token id -> its text as logprobs show tokens, and its bytes; cached per id.

    A token that holds part of a multi-byte character decodes to U+FFFD alone, and many such
    tokens would print alike (a top_logprobs dict keeps one of them): its text is then its bytes
    as OpenAI writes them, `bytes:\\xe6\\x97`, and its `bytes` the real ones."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode([token_id])
            raw = _token_bytes(self.tokenizer, token_id) if REPLACEMENT in text else None
            if raw is None:
                entry = (text, list(text.encode("utf-8")))
            else:
                entry = ("bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw))
            self._cache[token_id] = entry
        return entry


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes | None:
    """The raw bytes of a token that is not valid UTF-8 alone, where the vocabulary shows them:
    a byte-level BPE piece (each byte one printable character, as GPT-2 maps them) or a
    SentencePiece byte piece (`<0xE6>`); None otherwise."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    byte_piece = _BYTE_PIECE.fullmatch(piece)
    if byte_piece:
        return bytes([int(byte_piece.group(1), 16)])
    to_byte = _byte_level_decoder()
    if piece and all(char in to_byte for char in piece):
        return bytes(to_byte[char] for char in piece)
    return None


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """Character -> byte of byte-level BPE: bytes that print as themselves (! to ~, ¡ to ¬, ®
    to ÿ) keep their character; the other 68 take the characters from U+0100 on, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return mapping


def completion_logprobs(
    entries: list[dict],
    token_text: TokenText,
    offsets: list[int],
    prompt: list[dict] | None = None,
    prompt_starts: list[int] | None = None,
) -> dict:
    """The legacy completions format: parallel lists, top alternatives as {token: logprob}.
    `offsets`: where each entry's text starts in the choice's text. With `prompt` (echo), its
    entries come first, starting at `prompt_starts` (the first token's logprob and top
    alternatives are null, as OpenAI gives them)."""
    tokens, starts, logprobs, tops = [], [], [], []

    def add(items: list[dict], at: list[int]) -> None:
        for entry, start in zip(items, at, strict=True):
            starts.append(start)
            text = token_text(entry["token_id"])
            tokens.append(text)
            logprobs.append(entry["logprob"])
            top = entry.get("top")
            tops.append(None if top is None else _top_dict(top, text, entry["logprob"], token_text))

    if prompt:
        add(prompt, prompt_starts or [])
    add(entries, offsets)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": starts,
    }


def _top_dict(top: list, chosen: str, logprob: float, token_text: TokenText) -> dict:
    """{token text: logprob} of the top alternatives, likeliest first, plus the chosen token (as
    OpenAI and vLLM give them: up to k + 1 keys). Two tokens of one text keep the likelier's
    logprob: the key is all the legacy format has."""
    alternatives: dict[str, float] = {}
    for token_id, value in top:
        alternatives.setdefault(token_text(token_id), value)
    alternatives.setdefault(chosen, logprob)
    return alternatives


def chat_logprobs(entries: list[dict], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {
            "token": token_text(token_id),
            "logprob": logprob,
            "bytes": token_text.bytes(token_id),
        }

    return {
        "content": [
            {
                **item(entry["token_id"], entry["logprob"]),
                "top_logprobs": [item(tid, lp) for tid, lp in entry.get("top") or []],
            }
            for entry in entries
        ]
    }


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(choice.num_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


@dataclass
class Reply:
    """The fixed parts of one response: id, model, creation time, chat or not."""

    model: str
    chat: bool
    want_logprobs: bool
    token_text: TokenText
    id: str = ""
    created: int = 0
    _event_head: str | None = None  # chunk_event's envelope up to the choice index

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")
        self.created = self.created or int(time.time())

    def _envelope(self, object_type: str, choices: list[dict]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_type,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def final(self, choices: list[Choice], prompt_tokens: int) -> dict:
        """The whole non-streamed response."""
        rows = []
        for choice in choices:
            logprobs = None
            if self.chat:
                if self.want_logprobs:
                    logprobs = chat_logprobs(choice.entries(), self.token_text)
                rows.append(
                    {
                        "index": choice.index,
                        "message": {"role": "assistant", "content": choice.text},
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                if self.want_logprobs:
                    logprobs = completion_logprobs(
                        choice.entries(),
                        self.token_text,
                        [len(choice.echo) + at for at in choice.output_offsets()],
                        choice.prompt_logprobs,
                        choice.prompt_offsets,
                    )
                rows.append(
                    {
                        "index": choice.index,
                        "text": choice.echo + choice.text,
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
        body = self._envelope("chat.completion" if self.chat else "text_completion", rows)
        body["usage"] = usage(prompt_tokens, choices)
        return body

    def chunk(self, choice: Choice, delta: Delta, first: bool) -> dict:
        """One stream event for one choice: its delta and its finish reason."""
        text, logprobs, echo, offsets = delta
        entry: dict[str, Any] = {"index": choice.index}
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            entry["delta"] = delta
            entry["logprobs"] = (
                chat_logprobs(logprobs, self.token_text) if self.want_logprobs else None
            )
        else:
            entry["text"] = echo + text
            prompt = choice.prompt_logprobs if echo else None
            starts = [len(choice.echo) + at for at in offsets]
            entry["logprobs"] = (
                completion_logprobs(
                    logprobs, self.token_text, starts, prompt, choice.prompt_offsets
                )
                if self.want_logprobs
                else None
            )
        entry["finish_reason"] = choice.finish_reason
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [entry])

    def chunk_event(self, choice: Choice, delta: Delta, first: bool) -> str:
        """`sse(self.chunk(...))`, built from a preformatted envelope when there are no
        logprobs: a stream sends one of these per choice per step, and a dict plus
        `json.dumps` for each was most of the server's own work under load."""
        if self.want_logprobs or delta.echo:
            return sse(self.chunk(choice, delta, first))
        text = delta.text
        if self._event_head is None:
            object_type = "chat.completion.chunk" if self.chat else "text_completion"
            self._event_head = (
                f'data: {{"id": {json.dumps(self.id)}, "object": "{object_type}", '
                f'"created": {self.created}, "model": {json.dumps(self.model)}, '
                '"choices": [{"index": '
            )
        finish = "null" if choice.finish_reason is None else f'"{choice.finish_reason}"'
        if self.chat:
            role = ', "role": "assistant"' if first else ""
            body = f'"delta": {{"content": {json.dumps(text)}{role}}}'
        else:
            body = f'"text": {json.dumps(text)}'
        tail = f', "logprobs": null, "finish_reason": {finish}}}]}}\n\n'
        return f"{self._event_head}{choice.index}, {body}{tail}"

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, choices)
        return body

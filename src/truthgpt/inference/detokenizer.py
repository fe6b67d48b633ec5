"""Incremental detokenization: one token id in, the text that is safe to show out.

Two layers, both with bounded work per token whatever the output length:

1. Decoding. Tokens do not decode one by one: a byte-level BPE token can hold half of a UTF-8
   character, and a SentencePiece "▁" turns into a space only after another piece. So each new
   token decodes a short window of the latest tokens, and the text past what the window had
   already produced is new: the prefix/read offset technique of TGI and vLLM, kept as one window
   plus the count of its characters already shown, so a token costs one decode instead of two.
   Text ending in U+FFFD is held back: the rest of the character may come with the next token.
2. Stop strings. Text that could still begin a stop string is held back until it is known not
   to, so a stop string is never shown in part; on a match the output ends at the stop string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from truthgpt.inference.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8
# Prompt tokens kept as context for the first output token, so that its leading space, or the
# rest of a character the prompt began, comes out as in decode(prompt + output).
_CONTEXT_TOKENS = 5
# The window is cut back to its last few tokens once it reaches _MAX_WINDOW tokens: about one
# decode of <= 16 tokens per token, plus one or two of <= 8 tokens every ~11 tokens. The tail
# kept is the first of these lengths whose text lines up with the window's.
_MAX_WINDOW = 16
_CLEAN_TAILS = (5, 4, 3, 2, 1)
_STUCK_TAILS = (5, 6, 7, 8)
# A window whose text has ended in U+FFFD for this long is not valid UTF-8 (random or broken
# output); it is cut anyway so that such a stream costs no more per token than valid text.
_STUCK_WINDOW = 64


@dataclass(frozen=True)
class DetokenizerStep:
    new_text: str  # text safe to show now
    stopped: bool = False
    stop_reason: str | int | None = None  # the stop string, or the stop / EOS token id


def end_token_ids_of(tokenizer: PreTrainedTokenizerBase, named: Any = None) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's eos, then the ids `named` gives
    (generation_config's eos_token_id: an id or a list, as Qwen's and Llama 3's instruct models
    list the end of a chat turn)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for token_id in named if isinstance(named, list) else [named]:
        if isinstance(token_id, int) and token_id >= 0 and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


class IncrementalDetokenizer:
    """Turns one sequence's new token ids into text, applying stop strings and stop tokens."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        params: SamplingParams,
        end_token_ids: Iterable[int] | None = None,
    ) -> None:
        """`end_token_ids`: the tokens that end the answer unless params.ignore_eos (default:
        the tokenizer's eos)."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stop_strings = params.stop
        self._include_stop_string = params.include_stop_str_in_output
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ends = end_token_ids_of(tokenizer) if end_token_ids is None else end_token_ids
            stop_ids.update(ends)
        self._stop_token_ids = frozenset(stop_ids)
        # Decoding layer: the latest token ids, and how many characters of their decoded text
        # are accounted for (shown, or the prompt's).
        self._window = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._window_shown = len(self._decode(self._window))
        # Characters of output the decoding layer has produced, before stop strings cut any:
        # read before `add`, where the next token's text starts (completions' text_offset).
        self.decoded_length = 0
        # Stop-string layer: text released so far, and decoded text held back.
        self._released: list[str] = []
        self._held = ""
        self.stopped = False
        self.stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        """All output text so far, held-back text included; cut at the stop string once stopped.

        Joins the pieces (O(length)): read it at the end, not every step.
        """
        joined = "".join(self._released)
        self._released = [joined]
        return joined + self._held

    def add(self, token_id: int) -> DetokenizerStep:
        """Take the next generated token; return what can be shown now and whether to stop.

        Tokens after a stop are ignored (an engine that overlaps steps may sample one more).
        """
        if self.stopped:
            return DetokenizerStep("", True, self.stop_reason)
        if token_id in self._stop_token_ids:
            # The request ends here: the stop token's own text is not output, and whatever was
            # held back is released now (it did not turn into a stop string).
            final_text = self._release(self._decode_rest(), final=True)
            if not self.stopped:
                self.stopped, self.stop_reason = True, token_id
            return DetokenizerStep(final_text, True, self.stop_reason)
        new_text = self._release(self._decode_next(token_id), final=False)
        return DetokenizerStep(new_text, self.stopped, self.stop_reason)

    def flush(self) -> str:
        """Release the held-back text when the request ends for another reason (max_tokens)."""
        if self.stopped:
            return ""
        return self._release(self._decode_rest(), final=True)

    # --- decoding layer -----------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        backend = _rust_backend(self._tokenizer)
        if backend is not None:
            return backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_next(self, token_id: int) -> str:
        self._window.append(token_id)
        full = self._decode(self._window)
        settled = len(full.rstrip(REPLACEMENT))
        stuck = settled < len(full) and len(self._window) >= _STUCK_WINDOW
        if stuck:
            # In a lossy byte decode (byte-level BPE) only the last U+FFFD stands for bytes that
            # may yet complete a character; the ones before it are final. (A byte-fallback run
            # could still change, but 64 tokens of invalid UTF-8 are broken output anyway.)
            settled = len(full) - 1
        new_text = full[self._window_shown : settled]
        self._window_shown = max(self._window_shown, settled)
        self.decoded_length += len(new_text)
        if len(self._window) >= _MAX_WINDOW and (settled == len(full) or stuck):
            self._cut_window(full, stuck)
        return new_text

    def _cut_window(self, full: str, stuck: bool) -> None:
        """Keep only the last few tokens, if their text lines up with the end of the window's."""
        # Clean text may keep any tail that lines up. An incomplete character's bytes span at
        # most 3 tokens, so a stuck window keeps at least 4 to hold all of them.
        for length in _STUCK_TAILS if stuck else _CLEAN_TAILS:
            tail = self._window[-length:]
            tail_text = self._decode(tail)
            not_shown = len(full) - self._window_shown
            # A tail that starts inside a character (its first bytes dropped) or at a piece that
            # decodes differently at the start (WordPiece "##") does not line up.
            if full.endswith(tail_text) and len(tail_text) >= not_shown:
                self._window = tail
                self._window_shown = len(tail_text) - not_shown
                return

    def _decode_rest(self) -> str:
        """Everything the window decoded but did not release, incomplete characters included."""
        full = self._decode(self._window)
        rest = full[self._window_shown :]
        self._window_shown = max(self._window_shown, len(full))
        self.decoded_length += len(rest)
        return rest

    # --- stop-string layer --------------------------------------------------------------------

    def _release(self, new_text: str, final: bool) -> str:
        """Append decoded text; return the part that can be shown, handling stop strings."""
        # A match needs at least one new character: the held text (the only older text that
        # could begin a stop string) plus the new text is all there is to search.
        pending = self._held + new_text
        match = self._first_stop(pending)
        if match is not None:
            start, stop = match
            shown = pending[: start + len(stop) if self._include_stop_string else start]
            self._held = ""
            self.stopped, self.stop_reason = True, stop
        else:
            held = 0 if final else self._stop_prefix_length(pending)
            shown, self._held = pending[: len(pending) - held], pending[len(pending) - held :]
        if shown:
            self._released.append(shown)
        return shown

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        # The stop string that ends first is the one a character-by-character stream would have
        # met first; on a tie the earlier start cuts more, leaving no partial stop string.
        best: tuple[int, int, str] | None = None
        for stop in self._stop_strings:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string."""
        longest = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def _rust_backend(tokenizer: PreTrainedTokenizerBase):
    """The `tokenizers.Tokenizer` behind a fast tokenizer whose `decode` adds nothing to the
    backend's (no clean-up of spaces), else None. Calling it directly skips transformers'
    argument conversion, most of the cost of decoding a few ids: the engine decodes every
    sequence on every step."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) or not hasattr(backend, "decode"):
        return None
    if not type(tokenizer).decode.__module__.startswith("transformers."):
        return None  # a subclass decodes its own way: respect it
    return backend

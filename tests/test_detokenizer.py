"""Incremental detokenization against `tokenizer.decode` of the whole output, on two real
tokenizers trained offline: a GPT-2 style byte-level BPE and a Llama style SentencePiece BPE
("▁" spaces, byte fallback for characters it never saw)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from truthgpt.inference.detokenizer import IncrementalDetokenizer
from truthgpt.inference.sampling_params import SamplingParams

TEXTS = [
    "Hello wörld! Café, naïve résumé, façade and jalapeño. ### END ###",
    "日本語のテキストと中文字符が混ざった文章です。東京は大きい。",
    "Emoji 😀🎉👍🏽 and flags 🇯🇵 mixed with ASCII text, then Ελληνικά and привет мир.",
    "The quick brown fox jumps over the lazy dog; def main(): return 42  # done",
]


class DecodeCountingTokenizer(PreTrainedTokenizerFast):
    """A real fast tokenizer that also records how many ids each decode() call was given."""

    decoded_lengths: list[int]

    def decode(self, token_ids, *args, **kwargs):
        self.decoded_lengths.append(len(token_ids))
        return super().decode(token_ids, *args, **kwargs)


def byte_level_bpe() -> DecodeCountingTokenizer:
    # Few merges, so CJK characters and emoji are split across tokens mid-character.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 10, trainer)
    wrapped = DecodeCountingTokenizer(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )
    wrapped.decoded_lengths = []
    return wrapped


def sentencepiece_bpe() -> DecodeCountingTokenizer:
    # Trained without the emoji line, so emoji come out as <0xF0><0x9F>... byte tokens, and
    # decoded the way Llama's tokenizer.json does it (▁ -> space, byte fallback, strip one space).
    corpus = [text for text in TEXTS if "Emoji" not in text]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=len(set("".join(corpus))) + 3 + 60,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 10, trainer)
    spec = json.loads(tokenizer.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    wrapped = DecodeCountingTokenizer(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    wrapped.decoded_lengths = []
    return wrapped


TOKENIZERS = {"byte_level": byte_level_bpe(), "sentencepiece": sentencepiece_bpe()}


@pytest.fixture(params=list(TOKENIZERS))
def tokenizer(request) -> DecodeCountingTokenizer:
    return TOKENIZERS[request.param]


def stream(tokenizer, prompt_ids, output_ids, params=None):
    """Feed the output ids one by one; the shown pieces (flush last) and the detokenizer."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params or SamplingParams())
    pieces = []
    for token_id in output_ids:
        step = detokenizer.add(token_id)
        pieces.append(step.new_text)
        if step.stopped:
            break
    pieces.append(detokenizer.flush())
    return pieces, detokenizer


def continuation(tokenizer, prompt_ids, output_ids, skip_special_tokens=True) -> str:
    """The reference: what the output adds to the decoded prompt."""
    whole = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip_special_tokens)
    return whole[len(tokenizer.decode(prompt_ids, skip_special_tokens=skip_special_tokens)) :]


# --- text ---------------------------------------------------------------------------------------


def test_the_stream_of_real_text_is_the_decoded_text_without_split_characters(tokenizer) -> None:
    # Both tokenizers split some characters across tokens (bytes of CJK / emoji).
    emoji_ids = tokenizer.encode(TEXTS[2])
    prefixes = [tokenizer.decode(emoji_ids[:i]) for i in range(1, len(emoji_ids))]
    assert any(prefix.endswith("\ufffd") for prefix in prefixes)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        for prompt_length in (0, 1, 5, 12):
            prompt, output = ids[:prompt_length], ids[prompt_length:]
            pieces, detokenizer = stream(tokenizer, prompt, output)
            assert "".join(pieces) == continuation(tokenizer, prompt, output)
            assert detokenizer.text == "".join(pieces)
            assert not any("\ufffd" in piece for piece in pieces), pieces


def test_random_token_streams_decode_exactly() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    rng = random.Random(0)
    for trial in range(150):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.choice([0, 3, 9]))]
        output = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 150))]
        skip = trial % 2 == 0
        params = SamplingParams(ignore_eos=True, skip_special_tokens=skip)
        pieces, _ = stream(tokenizer, prompt, output, params)
        assert "".join(pieces) == continuation(tokenizer, prompt, output, skip), trial


def test_a_long_run_of_invalid_utf8_is_released_and_still_exact() -> None:
    # 0x80 alone is never valid UTF-8: every window ends in U+FFFD, the case where holding
    # back forever would make each token decode the whole output.
    tokenizer = TOKENIZERS["byte_level"]
    lone_continuation = tokenizer.convert_tokens_to_ids("Ģ")  # byte 0x80
    cjk = tokenizer.encode("日本語")
    output = [lone_continuation] * 150 + cjk + [lone_continuation] * 90 + cjk[:1] + cjk[1:]
    pieces, _ = stream(tokenizer, [], output)
    assert "".join(pieces) == tokenizer.decode(output)
    assert "\ufffd" in "".join(pieces[:100])  # released along the way, not all at the end


def test_special_tokens_are_skipped_or_kept_as_asked() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("Hello") + [tokenizer.pad_token_id] + tokenizer.encode(" wörld")
    kept, _ = stream(tokenizer, [], ids, SamplingParams(skip_special_tokens=False))
    skipped, _ = stream(tokenizer, [], ids, SamplingParams(skip_special_tokens=True))
    assert "".join(kept) == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(kept) == "Hello<|pad|> wörld"
    assert "".join(skipped) == "Hello wörld"


# --- stop strings -------------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: the stop string a character-by-character stream completes first."""
    found = [(text.find(stop) + len(stop), text.find(stop), stop) for stop in stops if stop in text]
    return None if not found else min(found)[1:]


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        (TEXTS[0], ["rld! Ca"]),  # across tokens, with a space inside
        (TEXTS[0], ["END", "façade"]),  # the earlier one wins
        (TEXTS[1], ["東京"]),  # multi-byte, split mid-character in byte-level
        (TEXTS[2], ["🎉👍"]),  # emoji: byte tokens in SentencePiece
        (TEXTS[3], ["over the", "lazy dog"]),
        (TEXTS[3], ["jumps over the lazy dog; def main(): return 42  # done!"]),  # never
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_end_the_text_and_are_never_shown_in_part(
    tokenizer, text, stops, include
) -> None:
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    match = first_stop(full, stops)
    if match is None:
        expected, stop_index = full, None
    else:
        start, stop = match
        expected = full[: start + len(stop)] if include else full[:start]
        # The token that completes the stop string: the first whose text contains it.
        stop_index = next(
            i for i in range(len(ids)) if first_stop(tokenizer.decode(ids[: i + 1]), stops)
        )
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    shown = ""
    for index, token_id in enumerate(ids):
        step = detokenizer.add(token_id)
        shown += step.new_text
        # Everything shown so far is part of the final output: no piece of a stop string
        # (excluded from it) ever went out early.
        assert expected.startswith(shown), (shown, expected)
        assert step.stopped == (index == stop_index)
        if step.stopped:
            assert step.stop_reason == match[1]
            break
    shown += detokenizer.flush()
    assert shown == expected == detokenizer.text


def test_a_possible_stop_string_is_held_back_until_ruled_out() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("one ### END ### two ##")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="### STOP"))
    shown = [detokenizer.add(token_id).new_text for token_id in ids]
    text_so_far = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    first_hash = next(i for i, text in enumerate(text_so_far) if "#" in text)
    assert "#" not in "".join(shown[: first_hash + 1])  # "#" may begin "### STOP"
    assert "".join(shown).endswith("### two ")  # "### E" ruled the first one out
    assert detokenizer.flush() == "##"  # held to the end, then released
    assert detokenizer.text == "one ### END ### two ##"


# --- stop tokens --------------------------------------------------------------------------------


def test_stop_token_ids_and_eos_end_the_output_without_their_text() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("Hello wörld! ###")
    stop_id = ids[4]
    pieces, detokenizer = stream(
        tokenizer, [], ids, SamplingParams(stop_token_ids=[stop_id], stop="###X")
    )
    assert detokenizer.stopped and detokenizer.stop_reason == stop_id
    assert "".join(pieces) == tokenizer.decode(ids[:4]) == detokenizer.text

    eos = tokenizer.eos_token_id
    output = tokenizer.encode("Hi ##") + [eos] + tokenizer.encode(" more")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="###"))
    steps = [detokenizer.add(token_id) for token_id in output]
    stop_at = output.index(eos)
    assert [step.stopped for step in steps] == [i >= stop_at for i in range(len(output))]
    assert steps[stop_at].stop_reason == eos
    assert steps[stop_at].new_text == "##"  # held back for "###", released at the end
    assert "".join(step.new_text for step in steps) == "Hi ##" == detokenizer.text
    assert detokenizer.flush() == ""

    ignoring = SamplingParams(ignore_eos=True, skip_special_tokens=False)
    pieces, detokenizer = stream(tokenizer, [], output, ignoring)
    assert not detokenizer.stopped
    assert "".join(pieces) == "Hi ##<|endoftext|> more"


# --- work per token -----------------------------------------------------------------------------


def test_each_token_decodes_a_bounded_window(tokenizer) -> None:
    ids = []
    for text in TEXTS * 25:
        ids += tokenizer.encode(text)
    assert len(ids) > 3000
    prompt = tokenizer.encode("A prompt of some length")
    tokenizer.decoded_lengths = []
    pieces, _ = stream(tokenizer, prompt, ids)
    lengths = list(tokenizer.decoded_lengths)
    assert "".join(pieces) == continuation(tokenizer, prompt, ids)
    # About one decode per token, of <= 16 ids plus the <= 3 more that finish a character,
    # whatever the output length.
    assert max(lengths) <= 19
    assert len(lengths) <= 1.2 * len(ids) + 5


def test_invalid_utf8_does_not_grow_the_window_either() -> None:
    tokenizer = TOKENIZERS["byte_level"]
    lone_continuation = tokenizer.convert_tokens_to_ids("Ģ")
    tokenizer.decoded_lengths = []
    stream(tokenizer, [], [lone_continuation] * 3000)
    assert max(tokenizer.decoded_lengths) <= 64
    assert len(tokenizer.decoded_lengths) <= 1.2 * 3000

"""Tokenizers: train a byte-level BPE on the corpus, or load a local Hugging Face one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from truthgpt.config import TokenizerConfig
from truthgpt.data.sources import Corpus
from truthgpt.errors import DataError
from truthgpt.local_paths import check_tokenizer_path

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Packing, not the tokenizer, decides sequence length; a small limit would only warn.
_UNLIMITED_LENGTH = 1_000_000_000_000


def _first_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts, cut off once `max_chars` characters have been yielded."""
    remaining = max_chars
    for text in texts:
        if remaining <= 0:
            return
        yield text[:remaining]
        remaining -= len(text)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, max_chars: int
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on at most `max_chars` characters of `texts`.

    Every byte is in the initial alphabet, so any text encodes (no unknown token) and
    `decode(encode(text)) == text` exactly. The vocabulary may come out smaller than
    `vocab_size` when the text has too few repeated pairs.
    """
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the text and break the round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_first_chars(texts, max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=_UNLIMITED_LENGTH,
        # The clean-up rewrites " ," to "," and similar on decode, which corrupts code.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer folder; pad falls back to eos, eos is required."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"tokenizer folder {str(folder)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"tokenizer folder {str(folder)!r} could not be loaded: {exc}") from exc
    if tokenizer.eos_token is None:
        raise DataError(
            f"tokenizer in {str(folder)!r} has no eos_token; packing needs one between documents. "
            "Set eos_token in its tokenizer_config.json."
        )
    if tokenizer.pad_token is None:
        # Padded positions carry label -100, so the pad id only has to be a valid token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, corpus: Corpus) -> PreTrainedTokenizerBase:
    """Load the tokenizer at `cfg.path` if set, else train a byte-level BPE on `corpus.train`."""
    if cfg.path:
        check_tokenizer_path(cfg)
        return load_tokenizer(cfg.path)
    return train_bpe_tokenizer(corpus.train, cfg.vocab_size, cfg.train_max_chars)

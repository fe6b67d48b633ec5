"""prepare_data: config -> corpus -> tokenizer -> packed train/val blocks, one log line a stage."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from truthgpt.config import Config
from truthgpt.data.packing import PackedDataset, pack_tokens, tokenize_documents
from truthgpt.data.sources import Corpus
from truthgpt.data.tokenizer import build_tokenizer, load_tokenizer
from truthgpt.errors import DataError
from truthgpt.registry import SOURCES

TOKENIZER_DIR = "tokenizer"


@dataclass
class PreparedData:
    """What training needs from the data: the tokenizer and packed blocks per split."""

    tokenizer: PreTrainedTokenizerBase
    train: PackedDataset
    val: PackedDataset | None  # None only when the source gave no val documents
    train_tokens: int
    val_tokens: int


def prepare_data(
    config: Config, run_dir: Path | None, log: Callable[[str], None] = print
) -> PreparedData:
    """Read the corpus, build the tokenizer and pack both splits into `max_seq_len` blocks.

    With a `run_dir`, the tokenizer is saved to `run_dir/tokenizer`; if that folder already
    exists it is loaded instead of trained, so a resumed run tokenizes exactly as before.
    """
    data = config.data
    started = time.perf_counter()
    corpus: Corpus = SOURCES.get_builder(data.source, "data.source")(data)
    train_count = f"{len(corpus.train)}" if hasattr(corpus.train, "__len__") else "streamed"
    log(
        f"data: {data.source}: {train_count} train / {len(corpus.val)} val documents "
        f"({_seconds_since(started)})"
    )

    started = time.perf_counter()
    tokenizer_dir = Path(run_dir) / TOKENIZER_DIR if run_dir is not None else None
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(tokenizer_dir)
        how = f"loaded from {tokenizer_dir}"
    else:
        tokenizer = build_tokenizer(data.tokenizer, corpus)
        how = f"loaded from {data.tokenizer.path}" if data.tokenizer.path else "trained"
        if tokenizer_dir is not None:
            tokenizer = _save_tokenizer(tokenizer, tokenizer_dir)
            how += f", saved to {tokenizer_dir}"
    log(f"data: tokenizer {how}: vocab size {len(tokenizer)} ({_seconds_since(started)})")

    started = time.perf_counter()
    train = _pack(tokenizer, corpus.train, data.max_seq_len)
    val = _pack(tokenizer, corpus.val, data.max_seq_len) if corpus.val else None
    train_tokens, val_tokens = train.num_tokens, val.num_tokens if val is not None else 0
    if train_tokens < data.max_seq_len:
        raise DataError(
            f"the train split has {train_tokens} tokens, fewer than one block of "
            f"data.max_seq_len={data.max_seq_len}; lower data.max_seq_len or add data"
        )
    val_blocks = len(val) if val is not None else 0
    log(
        f"data: {train_tokens:,} train / {val_tokens:,} val tokens -> {len(train):,} train / "
        f"{val_blocks:,} val blocks of {data.max_seq_len} ({_seconds_since(started)})"
    )
    return PreparedData(tokenizer, train, val, train_tokens, val_tokens)


def _pack(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_seq_len: int
) -> PackedDataset:
    stream = pack_tokens(tokenize_documents(tokenizer, texts), tokenizer.eos_token_id)
    return PackedDataset(stream, max_seq_len, tokenizer.pad_token_id)


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> PreTrainedTokenizerBase:
    """Save into a temporary folder and rename it into place, so an interrupted save never leaves
    a half-written tokenizer that a resumed run would load. Returns the tokenizer to use."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    try:
        os.replace(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
        # Another process (a second rank) saved first: use its tokenizer, so all agree.
        shutil.rmtree(partial, ignore_errors=True)
        return load_tokenizer(folder)
    return tokenizer


def _seconds_since(started: float) -> str:
    return f"{time.perf_counter() - started:.1f}s"

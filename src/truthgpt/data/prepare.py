"""prepare_data: config -> corpus -> tokenizer -> train/val datasets, one log line a stage.

task causal_lm: documents packed into `max_seq_len` blocks (`PackedDataset`). task sft: rows
encoded with answer-only labels (`sft.py`), then either bucketed (`ExampleDataset`, padded per
batch) or packed whole into blocks with document ids (`DocumentPackedDataset`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset, default_collate
from transformers import PreTrainedTokenizerBase

from truthgpt.config import Config
from truthgpt.data.loader import Collate
from truthgpt.data.packing import (
    DocumentPackedDataset,
    PackedDataset,
    pack_tokens,
    tokenize_documents,
)
from truthgpt.data.sft import (
    ExampleDataset,
    SFTRow,
    encode_rows,
    ensure_chat_template,
    read_sft_rows,
    sft_texts,
)
from truthgpt.data.shards import TarShards, TokenShards
from truthgpt.data.sources import Corpus
from truthgpt.data.tokenizer import build_tokenizer, load_tokenizer
from truthgpt.errors import DataError
from truthgpt.registry import SOURCES

TOKENIZER_DIR = "tokenizer"


@dataclass
class PreparedData:
    """What training needs from the data: the tokenizer and a dataset per split.

    `train` / `val` are `PackedDataset` (causal_lm), `ExampleDataset` (sft, bucket) or
    `DocumentPackedDataset` (sft, pack; items also carry `document_ids`); a webdataset train
    split is `TokenShards`, streamed from disk (train_tokens is then 0: not counted).
    `collate` turns a list of items into a batch; `EpochBatches` and `val_batches` find it (and
    the lengths that bucketing needs) on the dataset themselves.
    """

    tokenizer: PreTrainedTokenizerBase
    train: Dataset | TokenShards
    val: Dataset | None  # None only when the source gave no val documents
    train_tokens: int
    val_tokens: int
    collate: Collate = field(default=default_collate)
    batching: str = "pack"  # "pack" or "bucket"


def _sft_batching(config: Config) -> str:
    """`data.batching` for sft, auto resolved to bucket (config.py checks it fits the model)."""
    return "bucket" if config.data.batching == "auto" else config.data.batching


def prepare_data(
    config: Config, run_dir: Path | None, log: Callable[[str], None] = print
) -> PreparedData:
    """Read the data, build the tokenizer and make the train / val datasets of the language
    task `config.task` names: `prepare_sft_data` for sft, else `prepare_causal_lm_data`.

    With a `run_dir`, the tokenizer is saved to `run_dir/tokenizer`; if that folder already
    exists it is loaded instead of trained, so a resumed run tokenizes exactly as before.
    """
    if config.task == "sft":
        return prepare_sft_data(config, run_dir, log)
    return prepare_causal_lm_data(config, run_dir, log)


def prepare_causal_lm_data(
    config: Config, run_dir: Path | None, log: Callable[[str], None] = print
) -> PreparedData:
    """Documents -> tokenizer -> `PackedDataset` blocks of `data.max_seq_len` (see prepare_data)."""
    data = config.data
    started = time.perf_counter()
    corpus: Corpus = SOURCES.get_builder(data.source, "data.source")(data)
    train_count = f"{len(corpus.train)}" if hasattr(corpus.train, "__len__") else "streamed"
    log(
        f"data: {data.source}: {train_count} train / {len(corpus.val)} val documents "
        f"({_seconds_since(started)})"
    )

    tokenizer = _tokenizer(config, run_dir, corpus, log, chat=False)
    if isinstance(corpus.train, TarShards):
        return _streamed(tokenizer, corpus, data.max_seq_len, log)

    started = time.perf_counter()
    train = _pack(tokenizer, corpus.train, data.max_seq_len)
    val = _pack(tokenizer, corpus.val, data.max_seq_len) if corpus.val else None
    train_tokens, val_tokens = train.num_tokens, val.num_tokens if val is not None else 0
    val_blocks = len(val) if val is not None else 0
    log(
        f"data: {train_tokens:,} train / {val_tokens:,} val tokens -> {len(train):,} train / "
        f"{val_blocks:,} val blocks of {data.max_seq_len} ({_seconds_since(started)})"
    )
    return PreparedData(tokenizer, train, val, train_tokens, val_tokens)


def check_enough_to_train(data: PreparedData, max_seq_len: int) -> None:
    """Training needs one whole block of packed train text at least. (Here, not in
    prepare_data: `truthgpt eval` prepares data too, and checks only the split it reads.)"""
    if isinstance(data.train, PackedDataset) and data.train_tokens < max_seq_len:
        raise DataError(
            f"the train split has {data.train_tokens} tokens, fewer than one block of "
            f"data.max_seq_len={max_seq_len}; lower data.max_seq_len or add data"
        )


def _streamed(
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    max_seq_len: int,
    log: Callable[[str], None],
) -> PreparedData:
    """Tar shards stay on disk: training streams their blocks (`TokenShards`); val is packed."""
    shards = corpus.train
    train = TokenShards(
        shards, tokenizer, max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    val = _pack(tokenizer, corpus.val, max_seq_len) if corpus.val else None
    val_tokens = val.num_tokens if val is not None else 0
    log(
        f"data: train streamed from {len(shards.files)} shard(s) in blocks of {max_seq_len}; "
        f"{val_tokens:,} val tokens -> {len(val) if val is not None else 0:,} val blocks"
    )
    return PreparedData(tokenizer, train, val, train_tokens=0, val_tokens=val_tokens)


def prepare_sft_data(
    config: Config, run_dir: Path | None, log: Callable[[str], None] = print
) -> PreparedData:
    """Rows -> tokenizer (with a chat template) -> answer-only examples, bucketed or packed."""
    batching = _sft_batching(config)
    data = config.data
    started = time.perf_counter()
    train_rows, val_rows = read_sft_rows(data)
    log(
        f"data: {data.source}: {len(train_rows)} train / {len(val_rows)} val sft rows "
        f"({_seconds_since(started)})"
    )

    # A BPE trained here learns from the rows' own text; a given tokenizer ignores the corpus.
    corpus = Corpus(train=_Texts(train_rows), val=[])
    tokenizer = _tokenizer(config, run_dir, corpus, log, chat=True)

    started = time.perf_counter()
    encode = dict(sft_format=data.sft_format, max_seq_len=data.max_seq_len, overlong=data.overlong)
    train_examples, train_stats = encode_rows(tokenizer, train_rows, **encode)
    val_examples, val_stats = encode_rows(tokenizer, val_rows, **encode)
    log(
        f"data: sft ({data.sft_format}, overlong: {data.overlong}): train "
        f"{train_stats.describe()}; val {val_stats.describe()} ({_seconds_since(started)})"
    )
    if not train_examples:
        raise DataError(
            f"no sft train example is left ({train_stats.describe()}); "
            + train_stats.advice(data.max_seq_len, data.overlong)
        )

    pad_id = tokenizer.pad_token_id
    train_set = ExampleDataset(train_examples, pad_id)
    val_set = ExampleDataset(val_examples, pad_id) if val_examples else None
    train_tokens, val_tokens = train_set.num_tokens, val_set.num_tokens if val_set else 0
    train: Dataset
    val: Dataset | None
    if batching == "pack":
        train = DocumentPackedDataset(train_set, data.max_seq_len, pad_id)
        val = DocumentPackedDataset(val_set, data.max_seq_len, pad_id) if val_set else None
        collate: Collate = default_collate
        what = f"blocks of {data.max_seq_len}"
    else:
        train, val, collate, what = train_set, val_set, train_set.collate, "examples"
    log(
        f"data: {train_tokens:,} train / {val_tokens:,} val tokens -> {len(train):,} train / "
        f"{len(val) if val is not None else 0:,} val {what} (batching: {batching})"
    )
    return PreparedData(
        tokenizer, train, val, train_tokens, val_tokens, collate=collate, batching=batching
    )


@dataclass
class _Texts:
    """Row texts for BPE training; iterable more than once, as `Corpus.train` must be."""

    rows: list[SFTRow]

    def __iter__(self) -> Iterator[str]:
        return sft_texts(self.rows)


def _tokenizer(
    config: Config,
    run_dir: Path | None,
    corpus: Corpus,
    log: Callable[[str], None],
    chat: bool,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the run folder's copy when there is one, else loaded or trained and
    saved there. `chat`: make sure it has a chat template before it is saved."""
    started = time.perf_counter()
    tokenizer_dir = Path(run_dir) / TOKENIZER_DIR if run_dir is not None else None
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(tokenizer_dir)
        how = f"loaded from {tokenizer_dir}"
        if chat and ensure_chat_template(tokenizer):
            how += ", default chat template set"
    else:
        tokenizer = build_tokenizer(config.data.tokenizer, corpus)
        path = config.data.tokenizer.path
        how = f"loaded from {path}" if path else "trained"
        if chat and ensure_chat_template(tokenizer):
            how += ", default chat template set"
        if tokenizer_dir is not None:
            tokenizer = _save_tokenizer(tokenizer, tokenizer_dir)
            how += f", saved to {tokenizer_dir}"
    log(f"data: tokenizer {how}: vocab size {len(tokenizer)} ({_seconds_since(started)})")
    return tokenizer


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

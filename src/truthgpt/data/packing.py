"""Packing: tokenize documents into one flat stream (doc EOS doc EOS ...) cut into blocks."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

# Label value that `torch.nn.functional.cross_entropy` (and Hugging Face models) ignore.
IGNORE_INDEX = -100

# Tokens gathered in a Python list before they move into a compact int32 array.
_CHUNK_TOKENS = 1 << 20


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 1000
) -> Iterator[list[int]]:
    """Yield the token ids of each text, in order, encoding `batch_size` texts per call.

    A generator, so a large corpus never sits in memory as Python lists. No special tokens are
    added, and special-token strings inside a text (a literal "<|endoftext|>") are encoded as
    plain text: only packing puts an EOS between documents.
    """
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        encoded = tokenizer(
            batch,
            add_special_tokens=False,
            split_special_tokens=True,
            # verbose=False: a document longer than model_max_length is fine before packing.
            verbose=False,
            return_attention_mask=False,
        )
        yield from encoded["input_ids"]


def pack_tokens(docs: Iterable[list[int]], eos_id: int) -> np.ndarray:
    """One flat int32 stream: doc0 EOS doc1 EOS ...; documents with no tokens are skipped."""
    chunks: list[np.ndarray] = []
    buffer: list[int] = []
    for ids in docs:
        if not ids:
            continue
        buffer.extend(ids)
        buffer.append(eos_id)
        if len(buffer) >= _CHUNK_TOKENS:
            chunks.append(np.asarray(buffer, dtype=np.int32))
            buffer = []
    chunks.append(np.asarray(buffer, dtype=np.int32))
    return np.concatenate(chunks)


class PackedDataset(Dataset):
    """Non-overlapping blocks of `max_seq_len` tokens over a flat stream.

    Item i is `{"input_ids", "labels"}`, both LongTensor[max_seq_len] and equal (the model shifts
    labels itself, as Hugging Face models do), except that the last, partial block is filled with
    `pad_id` in input_ids and -100 in labels. Every token of the stream is in exactly one block.
    """

    def __init__(self, tokens: np.ndarray, max_seq_len: int, pad_id: int) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32))
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return -(-len(self.tokens) // self.max_seq_len)  # ceil division

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.max_seq_len
        block = self.tokens[start : start + self.max_seq_len].long()
        input_ids = torch.full((self.max_seq_len,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.max_seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[: len(block)] = block
        labels[: len(block)] = block
        return {"input_ids": input_ids, "labels": labels}

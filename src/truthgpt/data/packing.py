"""Packing: documents into one flat stream (doc EOS doc EOS ...) cut into blocks, for
pretraining; whole SFT examples into blocks that keep each example's own attention, for SFT."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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


def pack_examples(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Greedy (next-fit, in order): example indices per block, each block's lengths summing to at
    most max_seq_len; no example is split. Examples longer than a block are an error (the
    `overlong` rule handles them before packing)."""
    blocks: list[list[int]] = []
    used = max_seq_len  # forces a new block for the first example
    for index, length in enumerate(lengths):
        if length > max_seq_len:
            raise ValueError(f"example {index} has {length} tokens, more than {max_seq_len}")
        if used + length > max_seq_len:
            blocks.append([])
            used = 0
        blocks[-1].append(index)
        used += length
    return blocks


class DocumentPackedDataset(Dataset):
    """Blocks of `max_seq_len` tokens, each holding whole examples of `examples` (items
    {"input_ids", "labels"} of any length, e.g. an `ExampleDataset`), packed by `pack_examples`.

    Item i is `{"input_ids", "labels", "document_ids"}`, LongTensor[max_seq_len] each:
    document_ids number the examples 0, 1, ... and the padding at the end gets the next id, so
    the model keeps attention and positions inside each example. The first label of every
    example is -100: it would be predicted from the previous example's last token, which the
    example alone never does. Padding has pad_id / label -100.
    """

    def __init__(self, examples: Any, max_seq_len: int, pad_id: int) -> None:
        self.examples = examples
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))]
        self.blocks = pack_examples(lengths, max_seq_len)
        self.num_tokens = sum(lengths)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]  # IndexError past the end, as a list
        input_ids = torch.full((self.max_seq_len,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.max_seq_len,), IGNORE_INDEX, dtype=torch.long)
        document_ids = torch.full((self.max_seq_len,), len(block), dtype=torch.long)
        start = 0
        for document, example_index in enumerate(block):
            example = self.examples[example_index]
            end = start + len(example["input_ids"])
            input_ids[start:end] = example["input_ids"]
            labels[start:end] = example["labels"]
            labels[start] = IGNORE_INDEX
            document_ids[start:end] = document
            start = end
        return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}

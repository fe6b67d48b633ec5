"""Batches: an endless, resumable shuffled stream for training and a fixed list for evaluation.

Training batches come from `EpochBatches` (blocks in memory, shuffled by epoch) or, for tar
shards, `StreamBatches` (blocks streamed from the shards); `train_batches` picks.

Fixed-length blocks are stacked as they are. A dataset of variable-length examples (SFT) says
so with two attributes, which both classes below pick up: `lengths` (one per item: batches are
grouped by length, "bucketing") and `collate` (how to pad a batch, usually `pad_collate`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.data.shards import START, Position, ShardBlocks, TokenShards
from truthgpt.errors import CheckpointError

# Bucketing sorts by length within chunks of this many batches: the whole epoch sorted would
# put the same neighbours together every epoch and order batches by length; one chunk sorted
# still leaves little padding once a chunk holds a few hundred examples.
BUCKET_CHUNK_BATCHES = 50

Collate = Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack variable-length {"input_ids", "labels"} into [B, longest], padded on the right with
    `pad_id` / -100. No attention mask: a causal model never lets a real token see the pads
    after it, and the pads' own outputs carry no label."""
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        input_ids[row, :length] = item["input_ids"]
        labels[row, :length] = item["labels"]
    return {"input_ids": input_ids, "labels": labels}


def bucket_batches(
    lengths: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    chunk_batches: int = BUCKET_CHUNK_BATCHES,
) -> list[list[int]]:
    """Every index once, in batches of similar length: shuffle, cut into chunks of
    `chunk_batches` batches, sort each chunk by length, cut it into batches, shuffle the batches.
    A pure function of `lengths` and the generator's state; the last batch may be smaller."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start : start + chunk], key=lengths.__getitem__)  # stable
        batches += [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    # Otherwise each chunk would run from its shortest batch to its longest.
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


class EpochBatches:
    """Endless training batches (dicts of stacked LongTensors) over a map-style dataset.

    Epoch e visits the blocks in the order `torch.randperm(n, generator=manual_seed(seed + e))`,
    so every batch is a pure function of (seed, epoch, batch index), and `state_dict()` /
    `load_state_dict()` resume exactly at the next batch. The last incomplete batch of an epoch
    is dropped; a dataset smaller than one batch instead repeats its shuffled blocks to fill a
    single batch per epoch.

    With `lengths` (default: the dataset's `lengths` attribute, if any) the epoch's batches are
    `bucket_batches` from the same generator instead: every example once per epoch, batches of
    similar length. `collate_fn` (default: the dataset's `collate`, else `default_collate`)
    turns a list of items into a batch.

    With `world_size` > 1 (DDP), rank r takes batches r, r + world_size, ... of each epoch, so
    ranks see disjoint blocks and the same number of batches per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        lengths: Sequence[int] | None = None,
        collate_fn: Collate | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("EpochBatches needs a dataset with at least one block")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank} of {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.rank = rank
        self.world_size = world_size
        self.lengths = lengths if lengths is not None else getattr(dataset, "lengths", None)
        if self.lengths is not None and len(self.lengths) != len(dataset):
            raise ValueError(f"{len(self.lengths)} lengths for {len(dataset)} items")
        self.collate_fn = collate_fn or getattr(dataset, "collate", default_collate)
        self.epoch = 0
        self.batch_index = 0  # the next batch to yield within self.epoch
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self._global_batches_per_epoch() // self.world_size)

    def _global_batches_per_epoch(self) -> int:
        if self.lengths is not None:
            return -(-len(self.dataset) // self.batch_size)  # bucketing keeps the last batch
        return max(1, len(self.dataset) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The block indices of every batch this rank takes in `epoch`."""
        count = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.lengths is not None:
            batches = bucket_batches(self.lengths, self.batch_size, generator)
        else:
            order = torch.randperm(count, generator=generator).tolist()
            if count < self.batch_size:
                order = (order * -(-self.batch_size // count))[: self.batch_size]
            size = self.batch_size
            batches = [
                order[i * size : (i + 1) * size] for i in range(self._global_batches_per_epoch())
            ]
        # Modulo: with fewer batches than ranks (a tiny dataset) ranks share batches.
        return [
            batches[(self.rank + k * self.world_size) % len(batches)]
            for k in range(self.batches_per_epoch)
        ]

    def _start(self) -> Iterator[dict[str, torch.Tensor]]:
        # One DataLoader over an endless batch sampler that starts at the current position:
        # workers keep prefetching across epoch boundaries, and position is counted in
        # __next__ from what was handed out, not from what the workers have already read.
        loader = DataLoader(
            self.dataset,
            batch_sampler=_batch_indices(weakref.ref(self), self.epoch, self.batch_index),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collate_fn,
            # Its own generator: creating an iterator draws a base seed, and drawing it from
            # the global torch RNG would shift dropout after a resume (exact resume breaks).
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: {"epoch", "batch_index"}, and "world_size" when the
        batches are shared by more than one rank."""
        state = {"epoch": self.epoch, "batch_index": self.batch_index}
        if self.world_size > 1:
            state["world_size"] = self.world_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that would have followed.

        A position saved at another world size is carried over as the count of the epoch's
        batches all ranks took together (rank r takes batches r, r + world_size, ...); when that
        count does not divide by this world size, the few batches after the last whole round
        are taken again.
        """
        epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size:
            batch_index = batch_index * saved_world // self.world_size
        if epoch < 0 or not 0 <= batch_index < self.batches_per_epoch:
            raise CheckpointError(
                f"data position epoch {epoch}, batch {batch_index} does not fit this dataset "
                f"({self.batches_per_epoch} batches per epoch); was the data or batch size changed?"
            )
        self.epoch, self.batch_index = epoch, batch_index
        self._batches = None  # drops the old DataLoader; the next __next__ starts a new one


def _batch_indices(
    owner: weakref.ref[EpochBatches], epoch: int, batch_index: int
) -> Iterator[list[int]]:
    # The sampler holds its EpochBatches weakly: a strong reference closes a cycle (batches ->
    # iterator -> loader -> sampler -> batches) that only the garbage collector frees, at a
    # random later moment and in an order that drops the workers' queues first, so the
    # iterator's shutdown then waited 5 s to join each of its workers.
    while True:
        yield from owner().epoch_batches(epoch)[batch_index:]
        epoch, batch_index = epoch + 1, 0


def val_batches(
    dataset: Dataset,
    batch_size: int,
    max_batches: int | None = None,
    collate_fn: Collate | None = None,
    max_items: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The first `max_batches` batches of `dataset` in index order (the last may be smaller),
    so every evaluation sees the same blocks; collated as `EpochBatches` does. `max_items`
    (instead of `max_batches`) takes the first that many items."""
    collate = collate_fn or getattr(dataset, "collate", default_collate)
    count = len(dataset)
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    if max_items is not None:
        count = min(count, max_items)
    return [
        collate([dataset[i] for i in range(start, min(start + batch_size, count))])
        for start in range(0, count, batch_size)
    ]


class StreamBatches:
    """Endless training batches streamed from tar shards (`shards.TokenShards`), resumable.

    This rank's share is `max(1, num_workers)` streams (`shards.py` says how streams split the
    shards); a DataLoader worker runs each, and the DataLoader hands out their batches in
    turn. `state_dict()` holds every local stream's position after the batches handed out so
    far (not what workers have prefetched) and which stream's batch comes next.
    """

    def __init__(
        self,
        source: TokenShards,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} or rank {rank} of {world_size}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.rank = rank
        self.world_size = world_size
        self.local_streams = max(1, num_workers)
        self.positions: list[Position] = [START] * self.local_streams
        self.next_stream = 0
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def _start(self) -> Iterator[dict[str, torch.Tensor]]:
        blocks = ShardBlocks(
            self.source,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.local_streams,
            list(self.positions),
            self.next_stream,
        )
        loader = DataLoader(
            blocks,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Not the global RNG (see EpochBatches._start): a resume would shift dropout.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        local, *position = batch.pop("stream_position").tolist()
        self.positions[local] = tuple(position)
        self.next_stream = (local + 1) % self.local_streams
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": [list(position) for position in self.positions],
            "next_stream": self.next_stream,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` saved with the same ranks and data.num_workers."""
        if "streams" not in state:
            raise CheckpointError(
                "the checkpoint's data position is not a webdataset stream position; was "
                "data.source changed?"
            )
        saved = (int(state["world_size"]), len(state["streams"]))
        if saved != (self.world_size, self.local_streams):
            raise CheckpointError(
                f"the webdataset stream position was saved with {saved[0]} process(es) x "
                f"{saved[1]} stream(s) (data.num_workers, at least 1) each; resume with the "
                f"same (this run: {self.world_size} x {self.local_streams}): each stream's "
                "place in its shards is its own"
            )
        self.positions = [tuple(int(v) for v in position) for position in state["streams"]]
        self.next_stream = int(state["next_stream"])
        self._batches = None  # the next __next__ starts a DataLoader at these positions


def train_batches(
    dataset: Dataset | TokenShards,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> EpochBatches | StreamBatches:
    """The training batches of `dataset`: streamed for tar shards, else `EpochBatches`."""
    make = StreamBatches if isinstance(dataset, TokenShards) else EpochBatches
    return make(dataset, batch_size, seed, num_workers, pin_memory, rank, world_size)

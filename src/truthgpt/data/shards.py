"""Tar shards in the WebDataset layout, streamed as packed token blocks: split across ranks and
DataLoader workers without duplicates, and resumable at the exact next block.

A shard is a plain (or compressed) `.tar` whose members are grouped into samples by key: the
member path up to the first dot of its file name (`doc17.txt`, `doc17.json` are sample
`doc17`), one sample's members next to each other, as WebDataset writes them. A sample's text
is its `.txt` member, else the `data.field` of its `.json` member. Shards are read with the
standard library's `tarfile` in stream mode, one sample at a time: nothing is held in memory
beyond the sample being tokenized and the block being filled.

Every rank x worker pair is one *stream* (G = ranks x workers of them). Each epoch the shard
order is shuffled (seed + epoch); with at least G shards, stream g reads shards g, g + G, ...
of that order (a shard-level split); with fewer, every stream reads every shard and keeps the
samples whose (sample index + shard index) % G is g (a sample-level split). A stream packs its
documents (EOS between them) into blocks of `max_seq_len` tokens; the last block of an epoch is
padded, so blocks never straddle epochs. The position of a stream, (epoch, shard cursor in the
epoch's order, sample index in the shard, token offset in the sample), names the first token of
its next block: a resumed stream skips to it and goes on exactly as before.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from truthgpt.data.packing import IGNORE_INDEX
from truthgpt.errors import DataError

Position = tuple[int, int, int, int]  # epoch, shard cursor, sample index, token offset
START: Position = (0, 0, 0, 0)


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member: `a/b/doc17.tok.json` -> (`a/b/doc17`, `tok.json`)."""
    folder, _, name = member_name.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of the tar at `path`, in order, streamed.

    A missing, unreadable or damaged shard is a DataError naming the file (and, for damage
    mid-file, the last sample read before it)."""
    key, members, last = None, {}, None
    data_end = 0  # where the last member's data (padded to whole blocks) ends
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                blocks = -(-member.size // tarfile.BLOCKSIZE)
                data_end = member.offset_data + blocks * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                member_key, extension = sample_key(member.name)
                if key is not None and member_key != key:
                    yield key, members
                    last, members = key, {}
                key = member_key
                handle = tar.extractfile(member)
                members[extension] = handle.read() if handle is not None else b""
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
        if plain and data_end and not _end_marker_at(path, data_end):
            # tarfile stops quietly at a member cut short; a whole archive ends in zero blocks.
            raise tarfile.ReadError("no end-of-archive marker after the last whole member")
    except FileNotFoundError:
        raise DataError(f"webdataset shard {path} does not exist") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        after = f" after sample {last!r}" if last else ""
        raise DataError(
            f"webdataset shard {path} is not a readable tar archive{after}: {exc}. Rewrite the "
            "shard or leave it out of data.paths."
        ) from None
    if key is not None:
        yield key, members


def _end_marker_at(path: Path, offset: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def sample_text(key: str, members: dict[str, bytes], field: str, path: Path) -> str:
    """The text of one sample: its `.txt` member, else `field` of its `.json` member."""
    where = f"{path}: sample {key!r}"
    try:
        if "txt" in members:
            return members["txt"].decode("utf-8")
        if "json" in members:
            record = json.loads(members["json"].decode("utf-8"))
        else:
            found = ", ".join(f".{extension}" for extension in members) or "nothing"
            raise DataError(f"{where} has no .txt or .json member (found {found})")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: its .json member is not JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no field {field!r} (data.field) in its .json; found {keys}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    return value or ""


def check_shards(files: list[Path]) -> None:
    """Every shard exists and starts like a tar archive: a bad path fails now, not hours into
    a run (damage further into a file is found when the stream reaches it)."""
    for path in files:
        try:
            with tarfile.open(path, mode="r|*") as tar:
                tar.next()
        except FileNotFoundError:
            raise DataError(f"webdataset shard {path} does not exist") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"webdataset shard {path} is not a readable tar archive: {exc}"
            ) from None


@dataclass
class TarShards:
    """The train side of a webdataset corpus: its shards, and the leading samples of the first
    shard that were held out as val. Iterating gives the train texts in file order (what a BPE
    is trained on); training streams `TokenShards` instead."""

    files: list[Path]
    field: str
    held_out: int = 0  # samples at the start of files[0] that are val

    def samples(self, shard: int) -> Iterator[tuple[int, str]]:
        """(sample index, text) of the train samples of shard number `shard`."""
        path = self.files[shard]
        for index, (key, members) in enumerate(read_shard(path)):
            if shard == 0 and index < self.held_out:
                continue
            yield index, sample_text(key, members, self.field, path)

    def __iter__(self) -> Iterator[str]:
        for shard in range(len(self.files)):
            for _, text in self.samples(shard):
                if text.strip():
                    yield text


@dataclass
class TokenShards:
    """What training reads from a webdataset corpus: the shards and how to tokenize them into
    blocks. `loader.StreamBatches` turns it into batches."""

    shards: TarShards
    tokenizer: Any  # a transformers tokenizer; pickled into DataLoader workers
    max_seq_len: int
    eos_id: int
    pad_id: int

    def tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=True, verbose=False
        )["input_ids"]
        return [*ids, self.eos_id] if ids else []


def stream_plan(num_shards: int, streams: int, stream: int, seed: int, epoch: int) -> list[int]:
    """The shard indices stream `stream` of `streams` reads in `epoch`, in order."""
    order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed + epoch))
    order = order.tolist()
    return order[stream::streams] if num_shards >= streams else order


class ShardBlocks(IterableDataset):
    """Batches of one run's streams, for a DataLoader with `batch_size=None`.

    In DataLoader worker w (of `local_streams`), the local stream is (w + first_stream) %
    local_streams, so that after a resume the worker the DataLoader asks first is the stream
    whose batch comes next. Each batch carries `stream_position`: [local stream, *position of
    its next block]; `StreamBatches` takes it off.
    """

    def __init__(
        self,
        source: TokenShards,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        local_streams: int,
        positions: list[Position],
        first_stream: int,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_streams = local_streams
        self.positions = positions
        self.first_stream = first_stream

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.first_stream) % self.local_streams
        stream = self.rank * self.local_streams + local
        streams = self.world_size * self.local_streams
        rows, last = [], self.positions[local]
        for block, position in self.blocks(stream, streams, self.positions[local]):
            rows.append(block)
            last = position
            if len(rows) == self.batch_size:
                ids = torch.stack(rows)
                labels = ids.clone()
                labels[ids == -1] = IGNORE_INDEX
                ids[ids == -1] = self.source.pad_id
                yield {
                    "input_ids": ids,
                    "labels": labels,
                    "stream_position": torch.tensor([local, *last]),
                }
                rows = []

    def blocks(
        self, stream: int, streams: int, start: Position
    ) -> Iterator[tuple[torch.Tensor, Position]]:
        """Endless blocks (LongTensor[max_seq_len], -1 for padding) of one stream, each with the
        position of the stream's next block."""
        source, shards = self.source, self.source.shards
        length = source.max_seq_len
        epoch, cursor, sample, offset = start
        num_shards = len(shards.files)
        while True:
            fresh_epoch = (cursor, sample, offset) == (0, 0, 0)
            block: list[int] = []
            read_any = False
            plan = stream_plan(num_shards, streams, stream, self.seed, epoch)
            for at in range(cursor, len(plan)):
                shard = plan[at]
                for index, text in shards.samples(shard):
                    if at == cursor and index < sample:
                        continue
                    if num_shards < streams and (index + shard) % streams != stream:
                        continue
                    read_any = True
                    ids = source.tokens(text) if text.strip() else []
                    start_token = offset if (at, index) == (cursor, sample) else 0
                    while start_token < len(ids):
                        take = ids[start_token : start_token + length - len(block)]
                        block += take
                        start_token += len(take)
                        if len(block) == length:
                            yield torch.tensor(block), (epoch, at, index, start_token)
                            block = []
            if fresh_epoch and not read_any:
                raise DataError(
                    f"webdataset stream {stream} of {streams} (ranks x data.num_workers) got no "
                    f"sample from {num_shards} shard(s); give more samples or fewer workers"
                )
            epoch, cursor, sample, offset = epoch + 1, 0, 0, 0
            if block:  # the epoch's last, partial block: padded, so epochs never share one
                yield torch.tensor(block + [-1] * (length - len(block))), (epoch, 0, 0, 0)

"""Text sources: each turns a `DataConfig` into a `Corpus` of train and val documents.

Builders are registered by name in `truthgpt.registry.SOURCES` (`data.source` in the YAML).
Every source drops empty (whitespace-only) documents and fails with a `DataError` that says
what it read when no train document is left. Splits are deterministic: a document's side
depends only on a stable hash of its content, never on a random seed or on file order.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from truthgpt.config import DataConfig
from truthgpt.errors import ConfigError, DataError
from truthgpt.local_paths import expand_paths
from truthgpt.registry import SOURCES

# Streaming datasets have no length to take a fraction of: without data.max_documents this
# many leading documents are held out as val (and skipped for train).
STREAMING_VAL_DOCUMENTS = 1000

# Third-party code installed next to the standard library is not part of it.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """Documents of one source. `train` can be iterated more than once (a list, or a stream
    that starts over on each `iter()`); `val` is always a list."""

    train: Iterable[str]
    val: list[str]


def split_train_val(
    documents: list[str], keys: list[str], val_fraction: float
) -> tuple[list[str], list[str]]:
    """Deterministic split by key: a document is val when crc32(key) / 2**32 < val_fraction.

    With val_fraction > 0 and at least two documents, both sides get at least one document
    (the lowest / highest hashes are moved), so a small corpus still has a validation set.
    """
    if val_fraction <= 0 or len(documents) < 2:
        return list(documents), []
    scores = [zlib.crc32(key.encode("utf-8")) / 2**32 for key in keys]
    is_val = [score < val_fraction for score in scores]
    if not any(is_val):
        is_val[scores.index(min(scores))] = True
    if all(is_val):
        is_val[scores.index(max(scores))] = False
    train = [doc for doc, val in zip(documents, is_val, strict=True) if not val]
    val = [doc for doc, val in zip(documents, is_val, strict=True) if val]
    return train, val


def _split_by_content(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    # Keyed by content, not position: identical documents land on the same side, so duplicated
    # text cannot leak from train into val, and reordering files does not reshuffle the split.
    return split_train_val(documents, documents, val_fraction)


def _is_empty(text: str) -> bool:
    return not text.strip()


def _check_train(train: list[str], source: str, what_was_read: str) -> None:
    if not train:
        raise DataError(
            f"data.source {source!r}: no non-empty train document after reading {what_was_read}. "
            "Point data.paths at files with text, or lower data.val_fraction."
        )


# ---------------------------------------------------------------------------------------------
# python-stdlib


@SOURCES.register("python-stdlib")
def python_stdlib(cfg: DataConfig) -> Corpus:
    """The running interpreter's own standard-library `.py` files, one document per file.

    Files are taken in order of their relative path; `max_documents` keeps the first N readable,
    non-empty ones, which are then split by a hash of their content.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    relative_paths = []
    for folder, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk never descends into an installed-packages tree.
        dirnames[:] = [name for name in dirnames if name not in _STDLIB_EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        relative_paths += [(base / name).as_posix() for name in filenames if name.endswith(".py")]
    relative_paths.sort()

    documents: list[str] = []
    for relative in relative_paths:
        if cfg.max_documents is not None and len(documents) >= cfg.max_documents:
            break
        try:
            text = (root / relative).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            # The test suite ships deliberately mis-encoded files; they are not usable text.
            continue
        if _is_empty(text):
            continue
        documents.append(text)

    # By content, not path: the stdlib has identical files (__hello__.py, __phello__/spam.py).
    train, val = _split_by_content(documents, cfg.val_fraction)
    _check_train(train, "python-stdlib", f"{len(relative_paths)} files under {root}")
    return Corpus(train=train, val=val)


# ---------------------------------------------------------------------------------------------
# Local files: text and jsonl


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8 or leave it out"
        ) from None


def _read_text_files(files: list[Path], max_documents: int | None) -> list[str]:
    documents = []
    for path in files:
        if max_documents is not None and len(documents) >= max_documents:
            break
        text = _read_utf8(path)
        if not _is_empty(text):
            documents.append(text)
    return documents


@SOURCES.register("text")
def text_files(cfg: DataConfig) -> Corpus:
    """One document per file of `paths`; val from `val_paths`, else split off `val_fraction`.

    `max_documents` caps the documents read from `paths` (before the split); `val_paths` are
    read whole.
    """
    if not cfg.paths:
        raise DataError("data.paths is empty: source 'text' needs files or globs to read")
    files = expand_paths(cfg.paths, "data.paths")
    documents = _read_text_files(files, cfg.max_documents)
    if cfg.val_paths:
        train = documents
        val = _read_text_files(expand_paths(cfg.val_paths, "data.val_paths"), None)
    else:
        train, val = _split_by_content(documents, cfg.val_fraction)
    _check_train(train, "text", f"{len(files)} file(s) matching {cfg.paths}")
    return Corpus(train=train, val=val)


def iter_jsonl(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed value) for every non-blank line; a line that is not UTF-8 or not JSON
    is an error naming it. A UTF-8 byte-order mark (Windows editors write one) is skipped."""
    for path in files:
        # Bytes, decoded line by line: a stray latin-1 byte is named with its line, not raised
        # from inside the file iterator as a bare UnicodeDecodeError.
        with open(path, "rb") as lines:
            for line_number, raw in enumerate(lines, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{where}: not UTF-8 text (byte {exc.start + 1} of the line); convert the "
                        "file to UTF-8 or fix that line"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line "
                        "must be one JSON object"
                    ) from None


def _read_jsonl(files: list[Path], field: str, max_documents: int | None) -> list[str]:
    documents = []
    for where, record in iter_jsonl(files):
        if max_documents is not None and len(documents) >= max_documents:
            break
        text = _field_text(record, field, where)
        if not _is_empty(text):
            documents.append(text)
    return documents


def _field_text(record: Any, field: str, where: str) -> str:
    """The text of `record[field]`; a null value reads as an empty document."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        found = ", ".join(map(repr, record)) or "none"
        raise DataError(
            f"{where}: no field {field!r} (data.field); keys found: {found}. "
            "Set data.field to the key that holds the text."
        )
    return _as_text(record[field], field, where)


def _as_text(value: Any, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    return value


@SOURCES.register("jsonl")
def jsonl_files(cfg: DataConfig) -> Corpus:
    """One JSON object per line, the text in `field`; splits like `text`, per line."""
    if not cfg.paths:
        raise DataError("data.paths is empty: source 'jsonl' needs files or globs to read")
    files = expand_paths(cfg.paths, "data.paths")
    documents = _read_jsonl(files, cfg.field, cfg.max_documents)
    if cfg.val_paths:
        train = documents
        val = _read_jsonl(expand_paths(cfg.val_paths, "data.val_paths"), cfg.field, None)
    else:
        train, val = _split_by_content(documents, cfg.val_fraction)
    _check_train(train, "jsonl", f"{len(files)} file(s) matching {cfg.paths}")
    return Corpus(train=train, val=val)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


@dataclass
class StreamingTexts:
    """The texts of a streaming `datasets.IterableDataset`; each `iter()` starts over."""

    dataset: Any  # datasets.IterableDataset
    field: str
    where: str

    def __iter__(self) -> Iterator[str]:
        for example in self.dataset:
            text = _field_text(example, self.field, self.where)
            if not _is_empty(text):
                yield text


def load_hf_dataset(cfg: DataConfig, data_files: list[str]) -> Any:
    """`datasets.load_dataset` as `cfg` says (a `Dataset`, or an `IterableDataset` when
    streaming), with a DataError that names the dataset when it cannot be loaded."""
    import datasets  # imported here: a second of start-up that only this source needs

    try:
        return datasets.load_dataset(
            cfg.hf_name,
            cfg.hf_config_name,
            data_files=data_files or None,
            split=cfg.hf_split,
            streaming=cfg.streaming,
        )
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        files = f" with data_files {data_files}" if data_files else ""
        raise DataError(
            f"data.hf_name: could not load dataset {cfg.hf_name!r}{files}, "
            f"split {cfg.hf_split!r}: {exc}"
        ) from exc


def _hf_texts(dataset: Any, field: str, where: str) -> list[str]:
    if field not in dataset.column_names:
        raise DataError(
            f"{where}: no column {field!r} (data.field); columns: {', '.join(dataset.column_names)}"
        )
    texts = (_as_text(value, field, where) for value in dataset[field])
    return [text for text in texts if not _is_empty(text)]


@SOURCES.register("hf")
def hf_dataset(cfg: DataConfig) -> Corpus:
    """`datasets.load_dataset(hf_name, hf_config_name, data_files=paths, split=hf_split)`.

    Val: `val_paths` loaded the same way; else a content-hash split of `val_fraction`, or, when
    streaming, the first K documents (K = val_fraction * max_documents, at least 1, or
    STREAMING_VAL_DOCUMENTS without max_documents), which train then skips. Streaming saves
    the download, not memory: prepare_data packs the whole train stream, so set max_documents.
    """
    if not cfg.hf_name:
        raise DataError("data.hf_name is empty: source 'hf' needs a dataset name or a builder")
    where = f"hf dataset {cfg.hf_name!r}"
    dataset = load_hf_dataset(cfg, cfg.paths)
    val: list[str] = []
    if cfg.val_paths:
        val_set = load_hf_dataset(cfg, cfg.val_paths)
        streamed = StreamingTexts(val_set, cfg.field, where)
        val = list(streamed) if cfg.streaming else _hf_texts(val_set, cfg.field, where)

    if not cfg.streaming:
        if cfg.max_documents is not None:
            dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
        documents = _hf_texts(dataset, cfg.field, where)
        if cfg.val_paths:
            train = documents
        else:
            train, val = _split_by_content(documents, cfg.val_fraction)
        _check_train(train, "hf", f"{len(dataset)} rows of {where}")
        return Corpus(train=train, val=val)

    held_out = 0
    if not cfg.val_paths and cfg.val_fraction > 0:
        if cfg.max_documents is None:
            held_out = STREAMING_VAL_DOCUMENTS
        else:
            held_out = min(
                max(1, round(cfg.val_fraction * cfg.max_documents)), cfg.max_documents - 1
            )
        val = list(StreamingTexts(dataset.take(held_out), cfg.field, where))
    stream = dataset.skip(held_out)
    if cfg.max_documents is not None:
        stream = stream.take(cfg.max_documents - held_out)
    train = StreamingTexts(stream, cfg.field, where)
    # Reads one document now so an empty or exhausted stream fails here, not mid-training.
    first = next(iter(train), None)
    if first is None:
        raise DataError(
            f"data.source 'hf': the stream of {where} has no non-empty train document after "
            f"the {held_out} held out for val. Lower data.val_fraction or check data.field."
        )
    return Corpus(train=train, val=val)


# ---------------------------------------------------------------------------------------------
# webdataset: tar shards, streamed


@SOURCES.register("webdataset")
def webdataset_shards(cfg: DataConfig) -> Corpus:
    """Tar shards in the WebDataset layout (`paths`: files or globs), streamed by `shards.py`:
    a sample's text is its `.txt` member, else `field` of its `.json` member.

    Val: the samples of the `val_paths` shards; else the first `val_fraction` of the first
    shard's samples (at least one, when it has two or more), which train then skips. Only that
    shard is read here; the others are opened just far enough to see that they are tar files.
    """
    # Here, not at the top: shards.py imports torch, which validating a config must not.
    from truthgpt.data.shards import TarShards, check_shards, read_shard, sample_text

    if not cfg.paths:
        raise DataError("data.paths is empty: source 'webdataset' needs .tar shards or globs")
    if cfg.max_documents is not None:
        raise ConfigError(
            "data.max_documents does not apply to data.source webdataset (it streams whole "
            "shards); list fewer shards in data.paths instead"
        )
    files = expand_paths(cfg.paths, "data.paths")
    check_shards(files)
    held_out = 0
    if cfg.val_paths:
        val_files = expand_paths(cfg.val_paths, "data.val_paths")
        check_shards(val_files)
        val = [text for text in TarShards(val_files, cfg.field) if not _is_empty(text)]
    else:
        first = [sample_text(key, item, cfg.field, files[0]) for key, item in read_shard(files[0])]
        if cfg.val_fraction > 0 and len(first) >= 2:
            held_out = min(max(1, round(cfg.val_fraction * len(first))), len(first) - 1)
        val = [text for text in first[:held_out] if not _is_empty(text)]
    train = TarShards(files, cfg.field, held_out)
    if next(iter(train), None) is None:  # reads up to the first train text
        _check_train([], "webdataset", f"{len(files)} shard(s) matching {cfg.paths}")
    return Corpus(train=train, val=val)

"""data.source webdataset: tar shards written here from the standard library's own text,
streamed as blocks; every sample once across ranks x workers, exact resume, clear errors."""

from __future__ import annotations

import inspect
import io
import json
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from truthgpt import config as config_module
from truthgpt.config import load
from truthgpt.data import prepare_data
from truthgpt.data.loader import StreamBatches
from truthgpt.data.shards import TarShards, TokenShards
from truthgpt.data.tokenizer import train_bpe_tokenizer
from truthgpt.errors import CheckpointError, ConfigError, DataError
from truthgpt.registry import SOURCES
from truthgpt.training.callbacks import Callback
from truthgpt.training.evaluate import evaluate_run
from truthgpt.training.run import train

# Stdlib text, cut into samples: every sample starts with its own key, so the decoded stream
# says which sample each document is.
STDLIB_TEXT = inspect.getsource(textwrap) + inspect.getsource(json)


def sample_texts(count: int, prefix: str) -> list[str]:
    lines = STDLIB_TEXT.splitlines(keepends=True)
    return [f"# {prefix}{i}\n" + "".join(lines[i * 7 : i * 7 + 5 + i % 9]) for i in range(count)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, samples_per_shard: list[int]) -> list[str]:
    """Shards shard-000.tar, ...; sample i of shard s is `s{s}-{i}`, as .txt or (every third)
    as .json with an extra member beside it, the layout WebDataset writes. Returns the texts."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for shard, count in enumerate(samples_per_shard):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for i, text in enumerate(sample_texts(count, f"s{shard}-")):
                key = f"s{shard}-{i:04d}"
                if i % 3 == 2:
                    add_member(tar, f"{key}.json", json.dumps({"text": text}).encode())
                    add_member(tar, f"{key}.id", str(i).encode())
                else:
                    add_member(tar, f"{key}.txt", text.encode())
                texts.append(text)
    return texts


def corpus_of(data: dict):
    cfg = config_module.load({"data": {"source": "webdataset", **data}}).data
    return SOURCES.get_builder("webdataset", "data.source")(cfg)


def token_source(shards: TarShards, texts: list[str], max_seq_len: int = 32) -> TokenShards:
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400, max_chars=1_000_000)
    return TokenShards(shards, tokenizer, max_seq_len, tokenizer.eos_token_id, 0)


def first_epoch_documents(batches: StreamBatches, source: TokenShards) -> list[str]:
    """The documents every local stream of `batches` packed in epoch 0 (batch size 1: a batch
    is one block, and a block belongs to the epoch of the position before it)."""
    tokens: dict[int, list[int]] = {stream: [] for stream in range(batches.local_streams)}
    done: set[int] = set()
    while len(done) < batches.local_streams:
        stream = batches.next_stream
        epoch = batches.positions[stream][0]
        labels = next(batches)["labels"][0]
        if epoch > 0:
            done.add(stream)
        elif stream not in done:
            tokens[stream] += labels[labels != -100].tolist()
    documents = []
    for ids in tokens.values():
        text = source.tokenizer.decode(ids)  # EOS decodes as its own token text
        documents += text.split(source.tokenizer.eos_token)[:-1]
    return documents


@pytest.mark.parametrize("shard_counts", [[9, 4, 7, 5, 6, 3], [13, 8]], ids=["shards", "samples"])
def test_every_sample_once_across_two_ranks_of_two_workers(
    tmp_path: Path, shard_counts: list[int]
) -> None:
    # 6 shards >= 2 x 2 streams: split by shard; 2 shards: split by sample.
    texts = write_shards(tmp_path / "shards", shard_counts)
    corpus = corpus_of({"paths": [str(tmp_path / "shards" / "*.tar")], "val_fraction": 0.0})
    source = token_source(corpus.train, texts)
    seen: Counter[str] = Counter()
    for rank in range(2):
        batches = StreamBatches(source, 1, seed=3, num_workers=2, rank=rank, world_size=2)
        seen += Counter(first_epoch_documents(batches, source))
    assert seen == Counter(texts)


def test_val_is_held_out_of_the_first_shard(tmp_path: Path) -> None:
    texts = write_shards(tmp_path / "shards", [10, 6])
    corpus = corpus_of({"paths": [str(tmp_path / "shards" / "*.tar")], "val_fraction": 0.2})
    assert corpus.val == texts[:2]
    assert list(corpus.train) == texts[2:]
    val_dir = write_shards(tmp_path / "val", [3])
    explicit = corpus_of(
        {
            "paths": [str(tmp_path / "shards" / "*.tar")],
            "val_paths": [str(tmp_path / "val" / "*.tar")],
        }
    )
    assert explicit.val == val_dir and list(explicit.train) == texts


def take(batches: StreamBatches, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_the_exact_next_batch(tmp_path: Path, workers: int) -> None:
    texts = write_shards(tmp_path / "shards", [9, 4, 7])
    corpus = corpus_of({"paths": [str(tmp_path / "shards" / "*.tar")], "val_fraction": 0.0})
    source = token_source(corpus.train, texts, max_seq_len=24)

    def fresh() -> StreamBatches:
        return StreamBatches(source, 3, seed=0, num_workers=workers, rank=1, world_size=2)

    reference = fresh()
    before = take(reference, 7)  # odd: with two workers, the second one is next
    state = reference.state_dict()
    expected = take(reference, 40)  # across epoch boundaries too
    assert any(position[0] >= 2 for position in reference.positions)
    resumed = fresh()
    resumed.load_state_dict(state)
    got = take(resumed, 40)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    assert not torch.equal(before[0]["input_ids"], expected[0]["input_ids"])
    other = StreamBatches(source, 3, seed=0, num_workers=workers + 3, rank=1, world_size=2)
    with pytest.raises(CheckpointError, match="resume with the same"):
        other.load_state_dict(state)


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step and path.name == "last":
            raise RuntimeError("simulated crash")


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_a_webdataset_run_resumes_exactly(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [12, 9, 10])
    data = {
        "source": "webdataset",
        "paths": [str(tmp_path / "shards" / "*.tar")],
        "max_documents": None,
        "num_workers": 2,
    }

    def raw(name: str) -> dict:
        return tiny_raw_config(
            tmp_path,
            run_name=name,
            data=data,
            model={"dropout": 0.1},
            training={"max_steps": 16, "log_every": 1, "eval_every": 8, "batch_size": 4},
            checkpoint={"save_every": 5},
            logging={"progress": "none", "tensorboard": False, "plot": False},
        )

    full = train(load(raw("full")))
    assert full.final_val_loss < full.initial_val_loss
    assert evaluate_run(full.run_dir, device="cpu")["loss"] > 0  # val: packed blocks
    with pytest.raises(DataError, match="streamed from tar shards"):
        evaluate_run(full.run_dir, split="train", device="cpu")
    broken = load(raw("broken"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    train(broken, resume=True)
    assert step_losses(broken.run_dir) == step_losses(full.run_dir)


def test_missing_and_corrupt_shards_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [6, 5])
    good = str(tmp_path / "shards" / "shard-000.tar")
    missing = str(tmp_path / "shards" / "shard-009.tar")
    with pytest.raises(DataError, match="matches no file") as error:
        corpus_of({"paths": [good, missing]})
    assert missing in str(error.value)

    not_tar = tmp_path / "bad" / "notatar.tar"
    not_tar.parent.mkdir()
    not_tar.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(DataError, match="not a readable tar archive") as error:
        corpus_of({"paths": [good, str(not_tar)]})
    assert str(not_tar) in str(error.value)

    # Damage past the first header passes the up-front check and fails where it is read,
    # inside a DataLoader worker: the error still names the file.
    cut = tmp_path / "bad" / "truncated.tar"
    whole = (tmp_path / "shards" / "shard-001.tar").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    corpus = corpus_of({"paths": [good, str(cut)], "val_fraction": 0.0})
    source = token_source(corpus.train, sample_texts(6, "s0-"))
    batches = StreamBatches(source, 2, seed=0, num_workers=1)
    with pytest.raises(DataError, match="not a readable tar archive") as error:
        take(batches, 200)
    assert str(cut) in str(error.value)
    # Its worker stops now. The re-raised error is in a cycle with its traceback, whose frames
    # hold the DataLoader: left to the garbage collector, its shutdown waited 5 s for the worker.
    error.value.__traceback__ = None
    del batches, error

    no_text = tmp_path / "bad" / "images.tar"
    with tarfile.open(no_text, "w") as tar:
        add_member(tar, "a.jpg", b"\xff\xd8")
        add_member(tar, "b.jpg", b"\xff\xd8")
    with pytest.raises(DataError, match=r"sample 'a' has no \.txt or \.json member \(found \.jpg"):
        corpus_of({"paths": [str(no_text)]})
    with pytest.raises(ConfigError, match="data.max_documents does not apply"):
        corpus_of({"paths": [good], "max_documents": 3})


def test_prepare_data_streams_the_train_split(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", [8, 8])
    config = load(
        tiny_raw_config(
            tmp_path,
            data={
                "source": "webdataset",
                "paths": [str(tmp_path / "shards")],
                "max_documents": None,
                "val_fraction": 0.25,
            },
        )
    )
    with pytest.raises(DataError, match="matches no file"):  # a folder is not a shard
        prepare_data(config, None, log=lambda message: None)
    config = load(config.model_dump(mode="json"), [f"data.paths=['{tmp_path}/shards/*.tar']"])
    data = prepare_data(config, None, log=lambda message: None)
    assert isinstance(data.train, TokenShards) and data.val is not None and len(data.val) > 0

"""The data layer: sources, tokenizer, packing, batches and prepare_data, with real libraries."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from truthgpt import config as config_module
from truthgpt.data import PreparedData, prepare_data
from truthgpt.data.loader import EpochBatches, val_batches
from truthgpt.data.packing import IGNORE_INDEX, PackedDataset, pack_tokens, tokenize_documents
from truthgpt.data.prepare import check_enough_to_train
from truthgpt.data.sources import Corpus, StreamingTexts
from truthgpt.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    build_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)
from truthgpt.errors import ConfigError, DataError
from truthgpt.registry import SOURCES

ROUND_TRIP_TEXTS = [
    "def f(x):\n    if x:\n\t\treturn  x  \n\n\n    return None   \n",
    "  leading spaces, trailing tab\t",
    "héllo wörld — ünïcödé, 日本語のテキスト, Ελληνικά, עברית",
    "emoji 🤖🚀👩‍👩‍👧 and flags 🇫🇷",
    "punctuation ' s , . ; ! ? \" don't  ( ) [ ]",
    f"a literal {EOS_TOKEN} and {PAD_TOKEN} inside text",
    "\r\n windows \r line ends \x00 nul \u200b zero width",
    "",
]


def source_corpus(data: dict) -> Corpus:
    cfg = config_module.load({"data": data}).data
    return SOURCES.get_builder(cfg.source, "data.source")(cfg)


def code_like_text(seed: int, lines: int = 40) -> str:
    """Text with enough repetition for BPE merges, different per seed."""
    rng = np.random.default_rng(seed)
    words = ["value", "index", "result", "count", "name", "items", "total", "self", "data"]
    out = []
    for _ in range(lines):
        a, b = rng.choice(words, 2)
        indent = "    " * int(rng.integers(0, 3))
        out.append(f"{indent}{a} = {b} + {int(rng.integers(0, 100))}  # {b} of {a}")
    return "\n".join(out) + "\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [code_like_text(seed) for seed in range(30)] + ROUND_TRIP_TEXTS
    return train_bpe_tokenizer(texts, vocab_size=400, max_chars=1_000_000)


# ---------------------------------------------------------------------------------------------
# Sources


def test_text_source_globs_recursively_and_splits_deterministically(tmp_path: Path) -> None:
    for i in range(20):
        write(tmp_path / "corpus" / f"part{i % 3}" / f"doc{i:02d}.txt", f"document {i}\n")
    write(tmp_path / "corpus" / "empty.txt", "  \n\n")
    write(tmp_path / "corpus" / "skip.md", "not matched")
    data = {"source": "text", "paths": [str(tmp_path / "corpus" / "**" / "*.txt")]}

    corpus = source_corpus({**data, "val_fraction": 0.2})
    again = source_corpus({**data, "val_fraction": 0.2})
    assert corpus == again
    assert isinstance(corpus.train, list)
    assert len(corpus.train) + len(corpus.val) == 20  # the whitespace-only file is dropped
    assert corpus.val and not set(corpus.train) & set(corpus.val)
    assert not any("not matched" in doc for doc in corpus.train + corpus.val)

    capped = source_corpus({**data, "max_documents": 5, "val_fraction": 0.0})
    assert capped.train == [f"document {i}\n" for i in (0, 3, 6, 9, 12)]  # sorted by path
    assert capped.val == []


def test_text_source_val_paths_and_errors(tmp_path: Path) -> None:
    train_file = write(tmp_path / "train.txt", "train text")
    val_file = write(tmp_path / "val.txt", "val text")
    corpus = source_corpus(
        {"source": "text", "paths": [str(train_file)], "val_paths": [str(val_file)]}
    )
    assert corpus.train == ["train text"] and corpus.val == ["val text"]

    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(DataError, match="matches no file") as error:
        source_corpus({"source": "text", "paths": [str(train_file), missing]})
    assert missing in str(error.value)
    with pytest.raises(
        DataError, match=r"it is a folder: give a glob of its files, e.g. '.*/\*\*/\*'"
    ):
        source_corpus({"source": "text", "paths": [str(tmp_path)]})

    write(tmp_path / "blank.txt", "\n \t\n")
    with pytest.raises(DataError, match="no non-empty train document"):
        source_corpus({"source": "text", "paths": [str(tmp_path / "blank.txt")]})
    with pytest.raises(DataError, match="data.paths is empty"):
        source_corpus({"source": "text"})


def test_jsonl_lines_that_are_not_utf8_are_named_and_a_bom_is_skipped(tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"row {i}"}) for i in range(4)]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(("\n".join(rows[:2]) + '\n{"text": "caf').encode() + b'\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8") as error:
        source_corpus({"source": "jsonl", "paths": [str(latin1)]})
    assert f"{latin1}:3" in str(error.value)

    plain = write(tmp_path / "plain.jsonl", "\n".join(rows) + "\n")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    read = [
        source_corpus({"source": "jsonl", "paths": [str(path)], "val_fraction": 0.0}).train
        for path in (plain, bom)
    ]
    assert read[0] == read[1] == [f"row {i}" for i in range(4)]


def test_jsonl_source_reads_field_and_reports_bad_lines(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "id": i} for i in range(10)] + [{"text": ""}, {"text": None}]
    good = write(tmp_path / "good.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    corpus = source_corpus({"source": "jsonl", "paths": [str(good)], "val_fraction": 0.3})
    assert sorted(corpus.train + corpus.val) == sorted(f"row {i}" for i in range(10))
    assert corpus.val and not set(corpus.train) & set(corpus.val)

    bad_json = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="not valid JSON") as error:
        source_corpus({"source": "jsonl", "paths": [str(bad_json)]})
    assert f"{bad_json}:2" in str(error.value) and "column 10" in str(error.value)

    no_field = write(tmp_path / "nofield.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(DataError) as error:
        source_corpus({"source": "jsonl", "paths": [str(no_field)]})
    message = str(error.value)
    assert f"{no_field}:2" in message and "'text'" in message
    assert "'body'" in message and "'id'" in message

    content = write(tmp_path / "content.jsonl", json.dumps({"content": "in content"}) + "\n")
    corpus = source_corpus({"source": "jsonl", "paths": [str(content)], "field": "content"})
    assert corpus.train == ["in content"]


def test_hf_source_on_local_json(tmp_path: Path) -> None:
    rows = [{"text": f"hf row {i}", "n": i} for i in range(12)] + [{"text": "", "n": -1}]
    data_file = write(tmp_path / "rows.jsonl", "\n".join(json.dumps(row) for row in rows))
    data = {"source": "hf", "hf_name": "json", "paths": [str(data_file)]}

    corpus = source_corpus({**data, "val_fraction": 0.25})
    assert sorted(corpus.train + corpus.val) == sorted(f"hf row {i}" for i in range(12))
    assert corpus.val and corpus == source_corpus({**data, "val_fraction": 0.25})

    val_file = write(tmp_path / "val.jsonl", json.dumps({"text": "held out", "n": 0}))
    corpus = source_corpus({**data, "val_paths": [str(val_file)], "max_documents": 4})
    assert corpus.train == [f"hf row {i}" for i in range(4)] and corpus.val == ["held out"]

    with pytest.raises(DataError, match="no column 'body'") as error:
        source_corpus({**data, "field": "body"})
    assert "text" in str(error.value) and "n" in str(error.value)


def test_hf_source_streaming_holds_out_the_first_documents(tmp_path: Path) -> None:
    rows = [{"text": f"streamed {i}"} for i in range(20)]
    data_file = write(tmp_path / "rows.jsonl", "\n".join(json.dumps(row) for row in rows))
    corpus = source_corpus(
        {
            "source": "hf",
            "hf_name": "json",
            "paths": [str(data_file)],
            "streaming": True,
            "max_documents": 10,
            "val_fraction": 0.2,
        }
    )
    assert isinstance(corpus.train, StreamingTexts)
    assert corpus.val == ["streamed 0", "streamed 1"]
    expected_train = [f"streamed {i}" for i in range(2, 10)]
    assert list(corpus.train) == expected_train
    assert list(corpus.train) == expected_train  # iterating again starts over

    with pytest.raises(DataError, match="no field 'body'"):
        source_corpus(
            {
                "source": "hf",
                "hf_name": "json",
                "paths": [str(data_file)],
                "streaming": True,
                "field": "body",
            }
        )


def test_python_stdlib_source_is_deterministic_and_disjoint() -> None:
    data = {"source": "python-stdlib", "max_documents": 25, "val_fraction": 0.1}
    corpus = source_corpus(data)
    assert corpus == source_corpus(data)
    assert len(corpus.train) + len(corpus.val) == 25
    assert corpus.val and not set(corpus.train) & set(corpus.val)
    assert any("import" in doc for doc in corpus.train)


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_bpe_tokenizer_round_trips(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = next(tokenize_documents(tokenizer, [text])) if text else []
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_bpe_tokenizer_special_tokens_and_size(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 258 < len(tokenizer) <= 400
    # Code merges were learned: indentation and frequent words are single tokens.
    assert len(tokenizer.encode("    value", add_special_tokens=False)) <= 3
    # A literal "<|endoftext|>" in a document is text, not a document boundary.
    ids = next(tokenize_documents(tokenizer, [f"a{EOS_TOKEN}b"]))
    assert tokenizer.eos_token_id not in ids


def test_bpe_tokenizer_stops_after_max_chars() -> None:
    texts = [code_like_text(seed) for seed in range(20)]
    small = train_bpe_tokenizer(texts, vocab_size=2000, max_chars=50)
    large = train_bpe_tokenizer(texts, vocab_size=2000, max_chars=1_000_000)
    assert len(small) < len(large)


def test_tokenizer_save_and_load(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    for text in ROUND_TRIP_TEXTS:
        ids = list(tokenize_documents(loaded, [text]))
        assert ids == list(tokenize_documents(tokenizer, [text]))
        assert loaded.decode(ids[0]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )

    cfg = config_module.load({"data": {"tokenizer": {"path": str(tmp_path / "tok")}}}).data
    assert len(build_tokenizer(cfg.tokenizer, Corpus(train=[], val=[]))) == len(tokenizer)

    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    cfg = config_module.load({"data": {"tokenizer": {"path": str(tmp_path / "missing")}}}).data
    with pytest.raises(ConfigError, match="data.tokenizer.path"):
        build_tokenizer(cfg.tokenizer, Corpus(train=["x"], val=[]))
    # A folder without tokenizer files (a run folder, say) was transformers' five lines about
    # sentencepiece and tiktoken; a run folder's own tokenizer/ is suggested.
    run = tmp_path / "run"
    tokenizer.save_pretrained(run / "tokenizer")
    cfg = config_module.load({"data": {"tokenizer": {"path": str(run)}}}).data
    with pytest.raises(
        ConfigError, match=r"holds no tokenizer files .* did you mean .*/tokenizer'"
    ):
        build_tokenizer(cfg.tokenizer, Corpus(train=["x"], val=[]))


def test_load_tokenizer_pads_with_eos_and_needs_eos(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    backend = tokenizer.backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN).save_pretrained(
        tmp_path / "no_pad"
    )
    loaded = load_tokenizer(tmp_path / "no_pad")
    assert loaded.pad_token == EOS_TOKEN and loaded.pad_token_id == tokenizer.eos_token_id

    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "no_eos")
    with pytest.raises(DataError, match="no eos_token"):
        load_tokenizer(tmp_path / "no_eos")


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_tokens_puts_eos_after_every_document(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [code_like_text(seed, lines=3) for seed in range(7)]
    docs = list(tokenize_documents(tokenizer, texts, batch_size=3))
    assert docs == [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    eos = tokenizer.eos_token_id
    stream = pack_tokens(docs, eos)
    assert stream.dtype == np.int32
    assert stream.tolist() == [token for doc in docs for token in [*doc, eos]]
    assert int((stream == eos).sum()) == len(texts) and stream[-1] == eos
    assert pack_tokens([[5], [], [6]], eos_id=0).tolist() == [5, 0, 6, 0]
    assert pack_tokens([], eos_id=0).tolist() == []


@pytest.mark.parametrize("length,max_seq_len", [(100, 16), (96, 16), (5, 16), (0, 8)])
def test_packed_dataset_loses_and_duplicates_nothing(length: int, max_seq_len: int) -> None:
    stream = np.arange(1, length + 1, dtype=np.int32)
    pad_id = 0
    dataset = PackedDataset(stream, max_seq_len, pad_id)
    assert len(dataset) == -(-length // max_seq_len)

    kept = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].shape == item["labels"].shape == (max_seq_len,)
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        real = item["labels"] != IGNORE_INDEX
        # Padding only at the end of the last block, with pad_id in, -100 out.
        n_real = int(real.sum())
        assert real[:n_real].all() and n_real == min(max_seq_len, length - i * max_seq_len)
        assert (item["input_ids"][~real] == pad_id).all()
        assert torch.equal(item["input_ids"][real], item["labels"][real])
        kept.extend(item["input_ids"][real].tolist())
    assert kept == stream.tolist()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


# ---------------------------------------------------------------------------------------------
# Batches


def index_dataset(blocks: int, seq_len: int = 4) -> PackedDataset:
    """Block i holds tokens i*seq_len ..., so block i's first token // seq_len == i."""
    return PackedDataset(np.arange(blocks * seq_len, dtype=np.int32), seq_len, pad_id=0)


def block_ids(batch: dict[str, torch.Tensor], seq_len: int = 4) -> list[int]:
    return (batch["input_ids"][:, 0] // seq_len).tolist()


def take(batches: EpochBatches, count: int) -> list[list[int]]:
    return [block_ids(next(batches)) for _ in range(count)]


def test_epoch_batches_are_seeded_permutations() -> None:
    dataset = index_dataset(10)
    batches = EpochBatches(dataset, batch_size=3, seed=7)
    assert batches.batches_per_epoch == 3  # 10 // 3: the incomplete last batch is dropped
    first = take(batches, 6)
    assert first == take(EpochBatches(dataset, batch_size=3, seed=7), 6)
    assert first != take(EpochBatches(dataset, batch_size=3, seed=8), 6)
    for epoch in (first[:3], first[3:]):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert first[:3] != first[3:]  # a new order each epoch
    batch = next(iter(batches))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (3, 4)
    assert batch["input_ids"].dtype == torch.long


def test_epoch_batches_resume_exactly_across_an_epoch_boundary() -> None:
    dataset = index_dataset(11)
    uninterrupted = take(EpochBatches(dataset, batch_size=4, seed=3), 9)

    for stop in (1, 2, 5):  # mid-epoch, exactly at an epoch boundary, later epoch
        first = EpochBatches(dataset, batch_size=4, seed=3)
        before = take(first, stop)
        state = first.state_dict()
        assert set(state) == {"epoch", "batch_index"}
        resumed = EpochBatches(dataset, batch_size=4, seed=3)
        resumed.load_state_dict(state)
        assert before + take(resumed, 9 - stop) == uninterrupted
    assert first.state_dict() == {"epoch": 2, "batch_index": 1}  # 2 batches per epoch


def test_ranks_share_out_the_batches_and_resume_at_another_world_size() -> None:
    dataset = index_dataset(40)
    alone = take(EpochBatches(dataset, batch_size=2, seed=5), 12)
    ranks = [EpochBatches(dataset, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    firsts = [take(ranks[0], 4), take(ranks[1], 4)]
    # Rank r takes batches r, r + 2, ...: together the ranks take what one process takes.
    assert [batch for pair in zip(*firsts) for batch in pair] == alone[:8]
    state = ranks[0].state_dict()
    assert state == {"epoch": 0, "batch_index": 4, "world_size": 2}
    resumed = EpochBatches(dataset, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, 4) == alone[8:]


def test_epoch_batches_fill_a_batch_from_a_small_dataset() -> None:
    batches = EpochBatches(index_dataset(3), batch_size=8, seed=0)
    assert batches.batches_per_epoch == 1
    for ids in take(batches, 3):
        assert len(ids) == 8 and set(ids) == {0, 1, 2}


def test_epoch_batches_with_workers_and_ranks_match() -> None:
    dataset = index_dataset(20)
    single = take(EpochBatches(dataset, batch_size=2, seed=1), 12)
    before = set(multiprocessing.active_children())
    with_workers = EpochBatches(dataset, batch_size=2, seed=1, num_workers=2, pin_memory=False)
    assert take(with_workers, 12) == single
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    # Dropped mid-epoch, its workers stop then and there: held in a reference cycle, its
    # DataLoader waited for the garbage collector, whose teardown then took 5 s per worker.
    del with_workers
    assert not any(worker.is_alive() for worker in workers)

    ranks = [EpochBatches(dataset, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    per_rank = [take(batches, 5) for batches in ranks]
    assert per_rank[0] == single[0:10:2] and per_rank[1] == single[1:10:2]


def test_val_batches_are_fixed_and_in_order() -> None:
    dataset = index_dataset(7)
    batches = val_batches(dataset, batch_size=3, max_batches=None)
    assert [block_ids(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    limited = val_batches(dataset, batch_size=3, max_batches=2)
    assert [block_ids(batch) for batch in limited] == [[0, 1, 2], [3, 4, 5]]
    assert all(torch.equal(batches[i]["labels"], limited[i]["labels"]) for i in range(2))


# ---------------------------------------------------------------------------------------------
# prepare_data


def test_prepare_data_end_to_end_saves_and_reuses_the_tokenizer(tmp_path: Path) -> None:
    for i in range(12):
        write(tmp_path / "texts" / f"{i}.py", code_like_text(i, lines=30))
    config = config_module.load(
        {
            "data": {
                "source": "text",
                "paths": [str(tmp_path / "texts" / "*.py")],
                "val_fraction": 0.2,
                "max_seq_len": 32,
                "tokenizer": {"vocab_size": 300},
            }
        }
    )
    run_dir = tmp_path / "run"
    lines: list[str] = []
    prepared = prepare_data(config, run_dir, log=lines.append)
    assert isinstance(prepared, PreparedData)
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert prepared.val is not None and prepared.val_tokens == prepared.val.num_tokens > 0
    assert prepared.train_tokens == prepared.train.num_tokens >= 32
    assert len(prepared.train) == -(-prepared.train_tokens // 32)
    assert prepared.train[0]["input_ids"].shape == (32,)
    # Pretraining packs plain blocks: no document ids, stacked as they are.
    assert isinstance(prepared.train, PackedDataset) and set(prepared.train[0]) == {
        "input_ids",
        "labels",
    }
    assert prepared.batching == "pack" and prepared.collate is torch.utils.data.default_collate
    assert len(lines) == 3 and "trained" in lines[1] and "vocab size" in lines[1]

    # A resumed run loads the saved tokenizer instead of training a new one.
    lines.clear()
    again = prepare_data(config, run_dir, log=lines.append)
    assert "loaded from" in lines[1]
    assert torch.equal(again.train.tokens, prepared.train.tokens)
    assert again.tokenizer.get_vocab() == prepared.tokenizer.get_vocab()

    no_run_dir = prepare_data(config, None, log=lines.append)
    assert no_run_dir.train_tokens == prepared.train_tokens


def test_prepare_data_without_val_and_with_too_little_text(tmp_path: Path) -> None:
    write(tmp_path / "one.txt", code_like_text(0, lines=20))
    data = {
        "source": "text",
        "paths": [str(tmp_path / "one.txt")],
        "tokenizer": {"vocab_size": 260},
    }
    prepared = prepare_data(
        config_module.load({"data": {**data, "max_seq_len": 16}}), None, log=lambda _: None
    )
    assert prepared.val is None and prepared.val_tokens == 0

    # Too little to train on is training's refusal (evaluation reads the same data).
    short = prepare_data(
        config_module.load(
            {"data": {**data, "max_seq_len": 100_000}, "model": {"max_position_embeddings": 10**5}}
        ),
        None,
        log=print,
    )
    check_enough_to_train(prepared, 16)
    with pytest.raises(DataError, match="lower data.max_seq_len") as error:
        check_enough_to_train(short, 100_000)
    assert f"{prepared.train_tokens} tokens" in str(error.value)

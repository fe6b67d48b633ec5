"""Supervised fine-tuning data: rows, answer-only labels, chat templates, bucketing and packing,
with real tokenizers trained here and a tiny end-to-end training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config
from tokenizers import Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast

from truthgpt import config as config_module
from truthgpt.data import prepare_data
from truthgpt.data.loader import EpochBatches, val_batches
from truthgpt.data.packing import IGNORE_INDEX, DocumentPackedDataset, pack_examples
from truthgpt.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    ExampleDataset,
    SFTRow,
    encode_rows,
    ensure_chat_template,
    read_sft_rows,
    row_format,
    turn_end_token_id,
)
from truthgpt.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer
from truthgpt.errors import ConfigError, DataError
from truthgpt.inference.llm import LLM
from truthgpt.models import Decoder, DecoderConfig
from truthgpt.models.export import export_hf
from truthgpt.training.evaluate import evaluate_run
from truthgpt.training.run import train

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTI_TURN = [
    {"role": "system", "content": "You answer arithmetic questions."},
    {"role": "user", "content": "what is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and times 4?"},
    {"role": "assistant", "content": "That is 20, since 5 x 4 = 20."},
]


def arithmetic_rows(count: int) -> list[dict]:
    """Alternating chat and prompt/completion rows: "what is a+b?" -> "a+b"."""
    rows = []
    for index in range(count):
        a, b = index % 7, index // 7
        question, answer = f"what is {a}+{b}?", str(a + b)
        if index % 2:
            rows.append({"prompt": f"Q: {question}\nA:", "completion": answer})
        else:
            messages = [{"role": "user", "content": question}]
            rows.append({"messages": messages + [{"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_config(tmp_path: Path, rows: list | None = None, **data) -> config_module.Config:
    path = write_jsonl(tmp_path / "sft.jsonl", rows if rows is not None else arithmetic_rows(60))
    raw = {
        "task": "sft",
        "data": {
            "source": "jsonl",
            "paths": [str(path)],
            "max_seq_len": 64,
            "val_fraction": 0.1,
            "tokenizer": {"vocab_size": 300},
            **data,
        },
    }
    return config_module.load(raw)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [json.dumps(row) for row in arithmetic_rows(80)] + [m["content"] for m in MULTI_TURN]
    tokenizer = train_bpe_tokenizer(texts * 5, vocab_size=400, max_chars=1_000_000)
    ensure_chat_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A tokenizer shaped like a pretrained chat model's: ChatML special tokens and template."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy
    chatml = PreTrainedTokenizerFast(tokenizer_object=backend)
    chatml.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    chatml.pad_token = EOS_TOKEN
    chatml.chat_template = CHATML_TEMPLATE
    return chatml


def answer_runs(tokenizer: PreTrainedTokenizerFast, labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def encode_one(tokenizer, record: dict, sft_format: str = "auto", max_seq_len: int = 512):
    examples, stats = encode_rows(
        tokenizer, [SFTRow(record, "test:1")], sft_format, max_seq_len, "truncate"
    )
    assert stats.examples == 1
    return examples[0]


# ---------------------------------------------------------------------------------------------
# Rows and formats


def test_rows_of_both_formats_are_read_split_and_detected(tmp_path: Path) -> None:
    config = sft_config(tmp_path)
    train_rows, val_rows = read_sft_rows(config.data)
    assert len(train_rows) + len(val_rows) == 60 and val_rows
    assert train_rows[0].where.endswith("sft.jsonl:1")
    formats = {row_format(row, "auto") for row in train_rows}
    assert formats == {"messages", "prompt_completion"}
    again = read_sft_rows(config.data)
    assert [row.record for row in again[1]] == [row.record for row in val_rows]

    prompt_row = SFTRow({"prompt": "p", "completion": "c", "messages": None}, "f.jsonl:3")
    assert row_format(prompt_row, "auto") == "prompt_completion"
    both = SFTRow({"prompt": "p", "completion": "c", "messages": MULTI_TURN}, "f.jsonl:4")
    assert row_format(both, "auto") == "messages"
    assert row_format(both, "prompt_completion") == "prompt_completion"
    with pytest.raises(DataError, match=r"f\.jsonl:3: an sft row needs `messages`.*'prompt'"):
        row_format(prompt_row, "messages")


def test_a_row_with_neither_format_names_its_line_and_keys(tmp_path: Path) -> None:
    rows = arithmetic_rows(4) + [{"question": "q", "answer": "a"}]
    config = sft_config(tmp_path, rows, val_fraction=0.0)
    with pytest.raises(DataError) as error:
        prepare_data(config, None, log=lambda _: None)
    message = str(error.value)
    assert "sft.jsonl:5" in message and "'question', 'answer'" in message
    assert "`messages`" in message and "`prompt` and `completion`" in message

    bad_message = [{"messages": [{"role": "user", "content": 3}]}]
    with pytest.raises(DataError, match="sft.jsonl:1: message 0 must be"):
        prepare_data(sft_config(tmp_path, bad_message, val_fraction=0.0), None, log=print)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], r"f\.jsonl:7: `messages` is empty"),
        (
            [{"role": "user", "content": "2+2?"}, {"role": "asistant", "content": "4"}],
            r"f\.jsonl:7: message 1 has role 'asistant'; did you mean 'assistant'\?",
        ),
        (
            [{"role": "User", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            r"f\.jsonl:7: message 0 has role 'User'; did you mean 'user'\?",
        ),
    ],
)
def test_an_empty_chat_or_an_unknown_role_is_an_error_naming_the_row(
    tokenizer, messages: list, expected: str
) -> None:
    # Before: an empty list raised transformers' ValueError from inside the template, and a
    # misspelt assistant role rendered as a prompt, so the row was silently skipped.
    row = SFTRow({"messages": messages}, "f.jsonl:7")
    with pytest.raises(DataError, match=expected):
        encode_rows(tokenizer, [row], "auto", 64, "truncate")


def test_hf_json_rows_with_mixed_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", arithmetic_rows(6) + [{"text": "no answer"}])
    data = {"source": "hf", "hf_name": "json", "paths": [str(path)], "val_fraction": 0.0}
    cfg = config_module.load({"task": "sft", "data": data}).data
    rows, _ = read_sft_rows(cfg)
    assert {row_format(row, "auto") for row in rows[:6]} == {"messages", "prompt_completion"}
    with pytest.raises(DataError, match=r"hf dataset 'json' row 6: .*keys found: 'text'"):
        row_format(rows[6], "auto")


def test_sft_needs_a_row_source_and_a_matching_batching(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task sft reads jsonl"):
        prepare_data(config_module.load({"task": "sft"}), None, log=print)
    with pytest.raises(ConfigError, match="data.batching: bucket"):
        raw = {"task": "sft", "model": {"arch": "hf"}, "data": {"batching": "pack"}}
        prepare_data(config_module.load(raw), None, log=print)
    with pytest.raises(ConfigError, match="'bucket' is for task: sft"):
        prepare_data(config_module.load({"data": {"batching": "bucket"}}), None, log=print)


# ---------------------------------------------------------------------------------------------
# Answer-only labels


def test_single_turn_labels_cover_the_answer_and_its_eos(tokenizer) -> None:
    record = {"messages": MULTI_TURN[1:3]}
    input_ids, labels = encode_one(tokenizer, record)
    assert (
        tokenizer.decode(input_ids)
        == f"<|user|>\nwhat is 2+3?{EOS_TOKEN}<|assistant|>\n5{EOS_TOKEN}"
    )
    assert answer_runs(tokenizer, labels) == [f"5{EOS_TOKEN}"]
    assert labels[-1] == tokenizer.eos_token_id
    assert all(
        label in (token, IGNORE_INDEX) for token, label in zip(input_ids, labels, strict=True)
    )


def test_multi_turn_labels_cover_every_assistant_turn(tokenizer) -> None:
    input_ids, labels = encode_one(tokenizer, {"messages": MULTI_TURN})
    assert answer_runs(tokenizer, labels) == [
        f"5{EOS_TOKEN}",
        f"That is 20, since 5 x 4 = 20.{EOS_TOKEN}",
    ]
    # The EOS that closes a user or system turn is context, not an answer.
    eos_positions = [i for i, token in enumerate(input_ids) if token == tokenizer.eos_token_id]
    assert len(eos_positions) == 5
    assert [labels[i] != IGNORE_INDEX for i in eos_positions] == [False, False, True, False, True]


def test_a_pretrained_style_chatml_template_masks_the_same_way(chatml_tokenizer) -> None:
    input_ids, labels = encode_one(chatml_tokenizer, {"messages": MULTI_TURN})
    text = chatml_tokenizer.decode(input_ids)
    assert text.startswith("<|im_start|>system\nYou answer") and text.endswith("<|im_end|>\n")
    # The newline after <|im_end|> starts the next turn: generation stops before it.
    assert answer_runs(chatml_tokenizer, labels) == [
        "5<|im_end|>",
        "That is 20, since 5 x 4 = 20.<|im_end|>",
    ]
    ids, pc_labels = encode_one(chatml_tokenizer, {"prompt": "Q: 2+3=", "completion": "5"})
    assert chatml_tokenizer.decode(ids) == "Q: 2+3=5<|im_end|>"
    assert answer_runs(chatml_tokenizer, pc_labels) == ["5<|im_end|>"]


def test_prompt_completion_labels_cover_the_completion_and_eos(tokenizer) -> None:
    input_ids, labels = encode_one(tokenizer, {"prompt": "Q: what is 2+3?\nA:", "completion": "5"})
    assert tokenizer.decode(input_ids) == f"Q: what is 2+3?\nA:5{EOS_TOKEN}"
    assert answer_runs(tokenizer, labels) == [f"5{EOS_TOKEN}"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    counting = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    counting.add_special_tokens({"eos_token": EOS_TOKEN})
    # Starts with the number of messages: every new turn changes the text before it.
    counting.chat_template = "{{ messages | length }}" + DEFAULT_CHAT_TEMPLATE
    with pytest.raises(DataError, match="test:1: the chat template does not render"):
        encode_one(counting, {"messages": MULTI_TURN})


def test_default_chat_template_is_set_saved_and_reloaded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lines: list[str] = []
    prepared = prepare_data(sft_config(tmp_path), run_dir, log=lines.append)
    assert "default chat template set" in lines[1]
    assert prepared.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    reloaded = load_tokenizer(run_dir / "tokenizer")
    assert reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = reloaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == f"<|user|>\nhi{EOS_TOKEN}<|assistant|>\n"
    assert not ensure_chat_template(reloaded)  # a template that is there is kept

    lines.clear()
    again = prepare_data(sft_config(tmp_path), run_dir, log=lines.append)  # a resumed run
    assert "loaded from" in lines[1] and "default chat template" not in lines[1]
    assert torch.equal(again.train.tokens, prepared.train.tokens)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path: Path, tokenizer) -> None:
    long_prompt = "what is " + " + ".join(str(i) for i in range(60)) + "?"
    rows = [
        SFTRow({"prompt": "Q: 1+1?\nA:", "completion": "2"}, "a:1"),
        SFTRow({"prompt": "Q: 1+2?\nA:", "completion": " " + "3 " * 40}, "a:2"),  # long answer
        SFTRow({"prompt": long_prompt, "completion": "780"}, "a:3"),  # answer cut off
        SFTRow({"messages": [{"role": "user", "content": "no reply"}]}, "a:4"),
    ]
    whole, _ = encode_rows(tokenizer, rows[:3], "auto", 10_000, "truncate")
    longest = max(len(input_ids) for input_ids, _ in whole)

    kept, stats = encode_rows(tokenizer, rows, "auto", 24, "truncate")
    counts = (stats.examples, stats.truncated, stats.dropped, stats.answer_cut, stats.no_answer)
    assert counts == (2, 1, 0, 1, 1) and stats.longest == longest
    assert kept[1] == (whole[1][0][:24], whole[1][1][:24])

    # keep_end: the long prompt loses its start and its answer stays (TRL's keep_end).
    kept, stats = encode_rows(tokenizer, rows, "auto", 24, "keep_end")
    counts = (stats.examples, stats.truncated, stats.dropped, stats.answer_cut, stats.no_answer)
    assert counts == (3, 2, 0, 0, 1)
    assert kept[1:] == [(ids[-24:], labels[-24:]) for ids, labels in whole[1:]]
    assert answer_runs(tokenizer, kept[2][1]) == [f"780{EOS_TOKEN}"]

    kept, stats = encode_rows(tokenizer, rows, "auto", 24, "drop")
    counts = (stats.examples, stats.truncated, stats.dropped, stats.answer_cut, stats.no_answer)
    assert counts == (1, 0, 2, 0, 1)

    lines: list[str] = []
    rows = arithmetic_rows(20) + [{"prompt": long_prompt, "completion": "780"}] * 3
    prepare_data(sft_config(tmp_path, rows, val_fraction=0.0), None, lines.append)
    assert re.search(
        r"train 20 examples, 3 skipped \(truncation cut off every answer token\), longest row "
        r"\d+ tokens; val 0 examples \(",
        lines[2],
    )
    # The advice names what would keep the rows, not a setting that is already there.
    rows = [{"prompt": long_prompt, "completion": "780"}]
    with pytest.raises(DataError, match="no sft train example is left") as error:
        prepare_data(sft_config(tmp_path, rows, max_seq_len=24, overlong="drop"), None, print)
    message = str(error.value)
    assert re.search(r"raise data.max_seq_len \(now 24; the longest row is \d+ tokens\)", message)
    assert "data.overlong: keep_end" in message and "`assistant`" not in message
    rows = [{"messages": [{"role": "user", "content": "no reply"}]}]
    with pytest.raises(DataError, match="no sft train example is left") as error:
        prepare_data(sft_config(tmp_path, rows, val_fraction=0.0), None, print)
    assert "an `assistant` message" in str(error.value)
    assert "max_seq_len" not in str(error.value).split(";", 1)[1]


# ---------------------------------------------------------------------------------------------
# Bucketing


def length_dataset(lengths: list[int]) -> ExampleDataset:
    """Example i is `lengths[i]` copies of token i + 1, so a batch row names its example."""
    examples = [([i + 1] * n, [i + 1] * n) for i, n in enumerate(lengths)]
    return ExampleDataset(examples, pad_id=0)


LENGTHS = [(7 * i) % 23 + 1 for i in range(45)]


def example_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] - 1).tolist()


def take(batches: EpochBatches, count: int) -> list[list[int]]:
    return [example_ids(next(batches)) for _ in range(count)]


def test_bucketed_batches_are_padded_to_their_own_longest_example() -> None:
    dataset = length_dataset(LENGTHS)
    batches = EpochBatches(dataset, batch_size=4, seed=0)
    assert batches.batches_per_epoch == 12  # 45 / 4, the last batch smaller: nothing dropped
    padding = 0
    for _ in range(12):
        batch = next(batches)
        assert set(batch) == {"input_ids", "labels"}
        ids = example_ids(batch)
        assert batch["input_ids"].shape[1] == max(LENGTHS[i] for i in ids)
        for row, index in enumerate(ids):
            length = LENGTHS[index]
            assert (batch["input_ids"][row, :length] == index + 1).all()
            assert (batch["input_ids"][row, length:] == 0).all()
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        padding += int((batch["labels"] == IGNORE_INDEX).sum())
    # Grouping by length pads far less than random batches of the same examples.
    order = torch.randperm(45, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i : i + 4] for i in range(0, 45, 4)]
    random_padding = sum(
        len(batch) * max(LENGTHS[i] for i in batch) - sum(LENGTHS[i] for i in batch)
        for batch in random_batches
    )
    assert padding < random_padding / 3


def test_bucketing_is_deterministic_and_covers_every_example_once_per_epoch() -> None:
    dataset = length_dataset(LENGTHS)
    first = take(EpochBatches(dataset, batch_size=4, seed=3), 36)
    assert first == take(EpochBatches(dataset, batch_size=4, seed=3), 36)
    assert first != take(EpochBatches(dataset, batch_size=4, seed=4), 36)
    epochs = [first[i : i + 12] for i in (0, 12, 24)]
    for epoch in epochs:
        flat = [index for batch in epoch for index in batch]
        assert sorted(flat) == list(range(45))
    assert epochs[0] != epochs[1]


def test_bucketing_resumes_exactly_across_an_epoch_boundary() -> None:
    dataset = length_dataset(LENGTHS)
    uninterrupted = take(EpochBatches(dataset, batch_size=8, seed=1), 15)  # 6 batches per epoch
    for stop in (2, 6, 9):
        first = EpochBatches(dataset, batch_size=8, seed=1)
        before = take(first, stop)
        resumed = EpochBatches(dataset, batch_size=8, seed=1)
        resumed.load_state_dict(first.state_dict())
        assert before + take(resumed, 15 - stop) == uninterrupted
    with_workers = EpochBatches(dataset, batch_size=8, seed=1, num_workers=2, pin_memory=False)
    assert take(with_workers, 15) == uninterrupted


def test_val_batches_of_examples_are_in_order_and_padded() -> None:
    dataset = length_dataset(LENGTHS[:7])
    batches = val_batches(dataset, batch_size=3)
    assert [example_ids(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [batch["input_ids"].shape[1] for batch in batches] == [
        max(LENGTHS[0:3]),
        max(LENGTHS[3:6]),
        LENGTHS[6],
    ]


# ---------------------------------------------------------------------------------------------
# Packing with document boundaries


def test_packed_blocks_hold_whole_examples_with_document_ids() -> None:
    lengths = [5, 9, 3, 12, 1, 7, 8, 16, 2]
    examples = length_dataset(lengths)
    packed = DocumentPackedDataset(examples, max_seq_len=16, pad_id=0)
    assert packed.blocks == pack_examples(lengths, 16) == [[0, 1], [2, 3, 4], [5, 6], [7], [8]]
    seen = []
    for item in packed:
        ids, labels, documents = item["input_ids"], item["labels"], item["document_ids"]
        assert ids.shape == labels.shape == documents.shape == (16,)
        start = 0
        for document in range(int(documents.max()) + 1):
            positions = (documents == document).nonzero().flatten()
            if positions.numel() == 0:
                continue
            assert positions.tolist() == list(range(start, start + len(positions)))  # contiguous
            start += len(positions)
            token = int(ids[positions[0]])
            if token == 0:  # the padding: its own id, after every example
                assert document == int(documents.max()) and (labels[positions] == -100).all()
                continue
            index = token - 1
            seen.append(index)
            assert len(positions) == lengths[index] and (ids[positions] == token).all()
            assert labels[positions[0]] == IGNORE_INDEX  # nothing predicted across examples
            assert (labels[positions[1:]] == token).all()
    assert sorted(seen) == list(range(len(lengths)))
    assert packed.num_tokens == sum(lengths)
    with pytest.raises(ValueError, match="more than 16"):
        pack_examples([3, 17], 16)


def test_packed_loss_equals_the_loss_of_each_example_alone(tmp_path: Path) -> None:
    prepared = prepare_data(sft_config(tmp_path, batching="pack"), None, log=lambda _: None)
    assert prepared.batching == "pack" and isinstance(prepared.train, DocumentPackedDataset)
    batch = val_batches(prepared.train, batch_size=2, max_batches=1)[0]
    assert set(batch) == {"input_ids", "labels", "document_ids"}
    torch.manual_seed(0)
    model = Decoder(
        DecoderConfig(
            vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
        )
    ).eval()
    with torch.no_grad():
        packed_loss = model(**batch).loss
        examples = prepared.train.examples
        loss_sum, count = 0.0, 0
        for block in prepared.train.blocks[:2]:
            for index in block:
                example = examples[index]
                targets = int((example["labels"][1:] != IGNORE_INDEX).sum())
                loss = model(example["input_ids"][None], example["labels"][None]).loss
                loss_sum, count = loss_sum + float(loss) * targets, count + targets
    assert abs(float(packed_loss) - loss_sum / count) < 1e-5


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_tiny_sft_run_lowers_the_val_loss(tmp_path: Path, batching: str) -> None:
    path = write_jsonl(tmp_path / "arithmetic.jsonl", arithmetic_rows(60))
    raw = tiny_raw_config(
        tmp_path,
        task="sft",
        data={
            "source": "jsonl",
            "paths": [str(path)],
            "max_documents": None,
            "max_seq_len": 48,
            "val_fraction": 0.15,
            "batching": batching,
            "tokenizer": {"vocab_size": 300},
        },
        training={"max_steps": 20, "batch_size": 8, "eval_every": 20, "eval_batches": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    result = train(config_module.load(raw))
    assert result.final_val_loss < result.initial_val_loss - 0.5
    assert (result.run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert load_tokenizer(result.run_dir / "tokenizer").chat_template == DEFAULT_CHAT_TEMPLATE


def short_sft_run(tmp_path: Path, rows: Path, tokenizer: dict) -> Path:
    """A two-step sft run on the jsonl `rows` (`tokenizer`: its data.tokenizer section)."""
    raw = tiny_raw_config(
        tmp_path,
        task="sft",
        data={
            "source": "jsonl",
            "paths": [str(rows)],
            "max_documents": None,
            "max_seq_len": 48,
            "tokenizer": tokenizer,
        },
        training={"max_steps": 2, "eval_every": 2, "eval_batches": 1},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    return train(config_module.load(raw)).run_dir


def test_a_template_that_ends_turns_with_its_own_token_makes_it_an_end_of_answer(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, chatml_tokenizer: PreTrainedTokenizerFast
) -> None:
    # A base model's tokenizer (Qwen2.5's): eos <|endoftext|>, turns closed by <|im_end|>. A
    # model fine-tuned on the template ends its answers with <|im_end|>; generation that stops
    # only at eos ran on to max_tokens.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    chatml = PreTrainedTokenizerFast(tokenizer_object=backend)
    chatml.add_special_tokens(
        {"eos_token": EOS_TOKEN, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    chatml.pad_token = EOS_TOKEN
    chatml.chat_template = CHATML_TEMPLATE
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_token_id(chatml) == im_end
    assert turn_end_token_id(chatml_tokenizer) is None  # its eos is <|im_end|> already
    assert turn_end_token_id(tokenizer) is None  # the default template ends turns with eos
    chatml.save_pretrained(tmp_path / "tokenizer")

    rows = [row for row in arithmetic_rows(40) if "messages" in row]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    run_dir = short_sft_run(tmp_path, path, {"path": str(tmp_path / "tokenizer")})
    best = run_dir / "checkpoints" / "best"
    ends = [chatml.eos_token_id, im_end]
    assert GenerationConfig.from_pretrained(best).eos_token_id == ends
    assert LLM(run_dir, device="cpu").end_token_ids == tuple(ends)
    exported = export_hf(run_dir, tmp_path / "export")
    assert GenerationConfig.from_pretrained(exported).eos_token_id == ends


def test_eval_of_an_sft_run_on_plain_text_says_it_takes_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "arithmetic.jsonl", arithmetic_rows(40))
    run_dir = short_sft_run(tmp_path, path, {"vocab_size": 300})
    text = tmp_path / "notes.txt"
    text.write_text("what is 2+2? 4\n")
    with pytest.raises(DataError, match="notes.txt is plain text, and .* is an sft run"):
        evaluate_run(run_dir, [str(text)], device="cpu")
    rows = evaluate_run(run_dir, [str(path)], device="cpu")  # its own rows: a loss
    assert rows["loss"] > 0

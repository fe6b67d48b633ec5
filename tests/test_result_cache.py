"""The result cache: keys that separate every parameter, LRU order, a shared SQLite file.

Everything runs on real SQLite files in tmp_path, and the multi-process test on real processes:
the behaviour under test is SQLite's locking, which a fake would not have.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from truthgpt.errors import ConfigError
from truthgpt.serving.result_cache import (
    PRUNE_EVERY_PUTS,
    ResultCache,
    cache_key,
    is_deterministic,
)

# The dict the server builds for one request: every sampling parameter plus the endpoint.
BASE_PARAMS = {
    "endpoint": "completion",
    "max_tokens": 16,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": None,
    "n": 1,
    "logprobs": None,
    "stop": ["\n\n", "END"],
    "stop_token_ids": [2, 7],
    "ignore_eos": False,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
}

# One different value per parameter; each must give a key of its own.
CHANGED_VALUES = {
    "endpoint": "chat",
    "max_tokens": 17,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "seed": 0,
    "n": 2,
    "logprobs": 0,
    "stop": ["\n\n"],
    "stop_token_ids": [2],
    "ignore_eos": True,
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
}


def disk_rows(path: Path) -> list[str]:
    """Keys in the file, oldest first, read with plain sqlite3 (not through the cache)."""
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT key FROM results ORDER BY stored_at, rowid")]


# --- keys ------------------------------------------------------------------------------------


def test_key_is_stable_and_ignores_dict_order() -> None:
    key = cache_key("m", "def f(", BASE_PARAMS)
    reordered = dict(reversed(list(BASE_PARAMS.items())))
    assert key == cache_key("m", "def f(", dict(BASE_PARAMS))
    assert key == cache_key("m", "def f(", reordered)
    assert len(key) == 64 and int(key, 16) >= 0


def test_every_parameter_changes_the_key() -> None:
    assert set(CHANGED_VALUES) == set(BASE_PARAMS)  # a new parameter needs a case here
    base = cache_key("m", "def f(", BASE_PARAMS)
    keys = {base}
    for name, value in CHANGED_VALUES.items():
        key = cache_key("m", "def f(", {**BASE_PARAMS, name: value})
        assert key not in keys, f"changing {name} to {value!r} did not change the key"
        keys.add(key)
    assert cache_key("other-model", "def f(", BASE_PARAMS) != base
    assert cache_key("m", "def g(", BASE_PARAMS) != base
    assert cache_key("m", [1, 2, 3], BASE_PARAMS) != cache_key("m", [1, 2, 4], BASE_PARAMS)


def test_equal_values_key_equal() -> None:
    base = cache_key("m", "x", BASE_PARAMS)
    as_floats = {**BASE_PARAMS, "max_tokens": 16.0, "top_k": 0.0, "temperature": 0, "top_p": 1}
    assert cache_key("m", "x", as_floats) == base
    as_tuples = {**BASE_PARAMS, "stop": ("\n\n", "END"), "stop_token_ids": (2, 7)}
    assert cache_key("m", "x", as_tuples) == base
    assert cache_key("m", (5, 6), BASE_PARAMS) == cache_key("m", [5, 6], BASE_PARAMS)
    assert cache_key("m", "x", {**BASE_PARAMS, "temperature": -0.0}) == base


def test_stop_order_and_duplicates_do_not_matter() -> None:
    # The detokenizer ends at the stop string that ends first in the text, whatever the order.
    base = cache_key("m", "x", BASE_PARAMS)
    swapped = {**BASE_PARAMS, "stop": ["END", "\n\n", "END"], "stop_token_ids": [7, 2, 2]}
    assert cache_key("m", "x", swapped) == base
    one = {**BASE_PARAMS, "stop": ["END"]}
    assert cache_key("m", "x", {**BASE_PARAMS, "stop": "END"}) == cache_key("m", "x", one)


def test_text_and_token_prompts_key_apart() -> None:
    assert cache_key("m", "12", BASE_PARAMS) != cache_key("m", [12], BASE_PARAMS)
    assert cache_key("m", "", BASE_PARAMS) != cache_key("m", [], BASE_PARAMS)


def test_bool_is_not_the_number_one() -> None:
    assert cache_key("m", "x", {"n": True}) != cache_key("m", "x", {"n": 1})


def test_unkeyable_values_raise() -> None:
    with pytest.raises(ValueError, match=r"params\.temperature is nan"):
        cache_key("m", "x", {**BASE_PARAMS, "temperature": float("nan")})
    with pytest.raises(TypeError, match=r"params\.stop\[0\] is a bytes"):
        cache_key("m", "x", {**BASE_PARAMS, "stop": [b"END"]})
    with pytest.raises(TypeError, match="token ids must be ints"):
        cache_key("m", [1, "2"], BASE_PARAMS)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "seed": None}, True),
        ({"temperature": 0.8, "seed": 1234}, True),
        ({"temperature": 0.8, "seed": 0}, True),  # seed 0 is a seed
        ({"temperature": 0.8, "seed": None}, False),
        ({"temperature": 1e-6}, False),
        ({}, False),  # the OpenAI default temperature is 1
    ],
)
def test_is_deterministic(params: dict, expected: bool) -> None:
    assert is_deterministic(params) is expected


# --- memory tier -----------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used() -> None:
    cache = ResultCache(None, max_entries=2)
    cache.put("a", {"text": "A"})
    cache.put("b", {"text": "B"})
    assert cache.get("a") == {"text": "A"}  # a is now the most recent
    cache.put("c", {"text": "C"})
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") == {"text": "A"}
    assert cache.get("c") == {"text": "C"}
    cache.put("a", {"text": "A2"})  # a replace counts as a use, and evicts nothing
    cache.put("d", {"text": "D"})
    assert cache.get("c") is None
    assert cache.get("a") == {"text": "A2"}


def test_hits_and_misses_are_counted() -> None:
    cache = ResultCache(None)
    assert (cache.hits, cache.misses) == (0, 0)
    assert cache.get("k") is None
    cache.put("k", {"choices": [{"text": "hi", "logprobs": None}]})
    assert cache.get("k") == {"choices": [{"text": "hi", "logprobs": None}]}
    assert cache.get("k") is not None
    assert (cache.hits, cache.misses) == (2, 1)


def test_get_returns_a_copy() -> None:
    cache = ResultCache(None)
    cache.put("k", {"choices": [{"text": "hi"}]})
    cache.get("k")["choices"].append("changed by a caller")
    assert cache.get("k") == {"choices": [{"text": "hi"}]}


def test_bad_values_raise_type_error(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "cache.sqlite")
    with pytest.raises(TypeError, match="not JSON-serialisable.*set"):
        cache.put("k", {"tokens": {1, 2}})
    with pytest.raises(TypeError, match="value must be a dict, got list"):
        cache.put("k", [1, 2])  # type: ignore[arg-type]
    assert cache.get("k") is None and len(cache) == 0
    cache.close()


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_entries must be an integer >= 1, got 0"):
        ResultCache(None, max_entries=0)
    with pytest.raises(ConfigError, match="max_disk_entries"):
        ResultCache(None, max_disk_entries=-1)


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "cache.sqlite", max_entries=10_000)

    def work(thread: int) -> None:
        for i in range(100):
            cache.put(f"{thread}-{i}", {"i": i})
            assert cache.get(f"{thread}-{i}") == {"i": i}

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 400 and cache.hits == 400 and cache.misses == 0
    cache.close()
    assert len(disk_rows(tmp_path / "cache.sqlite")) == 400


# --- disk tier -------------------------------------------------------------------------------


def test_disk_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "cache.sqlite"  # the folder is created
    first = ResultCache(path)
    key = cache_key("m", "x", BASE_PARAMS)
    first.put(key, {"text": "answer", "logprob": -1.5})
    first.close()

    second = ResultCache(path)
    assert len(second) == 0
    assert second.get(key) == {"text": "answer", "logprob": -1.5}
    assert len(second) == 1  # the disk hit was promoted to memory
    assert (second.hits, second.misses) == (1, 0)
    assert second.get("absent") is None
    second.close()
    assert second.get(key) == {"text": "answer", "logprob": -1.5}  # memory still answers


def test_open_instances_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    writer, reader = ResultCache(path), ResultCache(path)
    assert reader.get("k") is None
    writer.put("k", {"v": 1})
    assert reader.get("k") == {"v": 1}
    writer.put("k", {"v": 2})  # INSERT OR REPLACE: the newest value wins on disk
    assert ResultCache(path).get("k") == {"v": 2}
    writer.close()
    reader.close()


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from truthgpt.serving.result_cache import ResultCache
    path, name, count, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cache = ResultCache(path, max_entries=8)
    time.sleep(max(0.0, start - time.time()))  # both processes begin writing together
    for i in range(count):
        cache.put(f"{name}-{i}", {"writer": name, "i": i})
        cache.get(f"{name}-{i // 2}")
    cache.close()
    """
)


def test_two_processes_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    count = 1000  # enough that the two really overlap: with no busy timeout this fails
    start = time.time() + 1.0  # time for both interpreters to start and open the file
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(path), name, str(count), str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=60)
        assert writer.returncode == 0, stderr
        # A dropped disk store would only warn; the test wants none of that.
        assert "result cache" not in stderr, stderr

    reader = ResultCache(path)
    for name in ("a", "b"):
        for i in range(count):
            assert reader.get(f"{name}-{i}") == {"writer": name, "i": i}
    assert reader.misses == 0
    reader.close()


def test_corrupt_file_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.sqlite"
    garbage = bytes(range(256)) * 16
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="truthgpt.serving.result_cache"):
        cache = ResultCache(path)
        cache.put("k", {"v": 1})
        assert cache.get("k") == {"v": 1}
        assert cache.get("other") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "in-memory cache only" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert path.read_bytes() == garbage  # the user's file is left for them to inspect
    cache.close()


def test_unopenable_path_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a_folder"
    path.mkdir()  # a folder where the file should be
    with caplog.at_level(logging.WARNING, logger="truthgpt.serving.result_cache"):
        cache = ResultCache(path)
        cache.put("k", {"v": 1})
        assert cache.get("k") == {"v": 1}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_disk_store_is_pruned_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResultCache(path, max_entries=4, max_disk_entries=10)
    keys = [f"k{i:04d}" for i in range(PRUNE_EVERY_PUTS + 5)]
    for key in keys:
        cache.put(key, {"key": key})
    # Pruned at put number PRUNE_EVERY_PUTS down to 10 rows; 5 more since.
    assert disk_rows(path) == keys[PRUNE_EVERY_PUTS - 10 :]
    cache.close()

    # A smaller bound takes effect when a process opens the file.
    smaller = ResultCache(path, max_disk_entries=3)
    assert disk_rows(path) == keys[-3:]
    assert smaller.get(keys[-1]) == {"key": keys[-1]}
    assert smaller.get(keys[0]) is None
    smaller.close()

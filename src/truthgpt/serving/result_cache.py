"""A cache of finished responses to deterministic requests, so a repeat skips the model.

Only requests whose output is a pure function of (model, prompt, parameters) may be cached:
greedy decoding, or sampling with a fixed seed (the sampler's noise is a hash of seed, step and
vocab index, the same alone or in any batch). Two tiers: an in-memory LRU answers hot repeats
without a syscall, and an optional SQLite file (WAL mode) outlives restarts and is shared by
every server process on the host. The cache must never fail a request: a disk store that is
corrupt, unreadable or stuck is dropped with one warning and the memory tier carries on.

The key's rule: a key that differs when it need not costs one miss, a key that matches when it
should not serves a wrong answer. So the canonical form folds only what provably gives the same
output (1 and 1.0, tuple and list, the order of stop strings) and keeps everything else apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from truthgpt.errors import ConfigError

log = logging.getLogger(__name__)

# Part of every key: bump it when the cached value's layout changes, and entries written by an
# older server are never returned to a newer one (they age out of the disk store instead).
CACHE_FORMAT_VERSION = 1

# Another process holding the write lock makes us wait up to this long before giving up.
BUSY_TIMEOUT_S = 5.0

# Counting rows is a scan of the stored_at index, cheap but not free: prune every N puts.
PRUNE_EVERY_PUTS = 256

# Parameters whose order cannot change the output, so they key as a sorted set. Stop strings:
# the detokenizer ends at the one that *ends first* in the text, whatever their order
# (`Detokenizer._first_stop`); stop token ids are a set there too.
_UNORDERED_PARAMS = ("stop", "stop_token_ids")


def cache_key(model_id: str, prompt: str | list[int], params: dict[str, Any]) -> str:
    """The sha256 hex digest of the canonical JSON of one request.

    model_id: should name the weights, not only a served alias (add a checkpoint fingerprint),
        or new weights under an old name would be answered from the old ones.
    prompt: text, or token ids; "12" and [12] key apart.
    params: every sampling parameter the server passes on, plus whatever else changes the
        response body (e.g. `endpoint`: chat or completion); a missing key and a key set to
        None key apart, so build the dict the same way every time.
    """
    if not isinstance(model_id, str):
        raise TypeError(f"cache_key: model_id must be a str, got {type(model_id).__name__}")
    if isinstance(prompt, str):
        prompt_part: dict[str, Any] = {"text": prompt}
    elif isinstance(prompt, (list, tuple)):
        for token_id in prompt:
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise TypeError(f"cache_key: prompt token ids must be ints, got {token_id!r}")
        prompt_part = {"token_ids": list(prompt)}
    else:
        raise TypeError(
            f"cache_key: prompt must be text or a list of token ids, got {type(prompt).__name__}"
        )
    if not isinstance(params, dict):
        raise TypeError(f"cache_key: params must be a dict, got {type(params).__name__}")
    canonical_params = _canonical(params, "params")
    for name in _UNORDERED_PARAMS:
        value = canonical_params.get(name)
        if isinstance(value, str):  # the OpenAI API takes one stop string or a list
            value = [value]
        if isinstance(value, list) and all(isinstance(item, (str, int)) for item in value):
            canonical_params[name] = sorted(set(value), key=lambda item: (str(type(item)), item))
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "model": model_id,
        "prompt": prompt_part,
        "params": canonical_params,
    }
    # ensure_ascii: one byte form for every string, lone surrogates included.
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _canonical(value: Any, where: str) -> Any:
    """`value` with equal numbers in one form and tuples as lists; `where` names it in errors."""
    if value is None or isinstance(value, (bool, str)):
        return value  # bool before int: True is an int in Python but not the number 1 here
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            # NaN is not equal to itself; no request with one should reach the cache.
            raise ValueError(f"cache_key: {where} is {value!r}; only finite numbers can be keyed")
        # 1.0 -> 1 (and -0.0 -> 0): equal numbers give the engine the same parameter.
        return int(value) if value.is_integer() else value
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"cache_key: {where} has a non-string key {name!r}")
            out[name] = _canonical(item, f"{where}.{name}")
        return out
    raise TypeError(
        f"cache_key: {where} is a {type(value).__name__} ({value!r}); only JSON values "
        "(None, bool, int, float, str, list, tuple, dict) can be keyed"
    )


def is_deterministic(params: dict[str, Any]) -> bool:
    """True when the output is a function of the request alone: greedy, or a fixed seed.

    A missing temperature is the OpenAI default of 1, so not greedy.
    """
    return params.get("temperature", 1.0) == 0 or params.get("seed") is not None


class ResultCache:
    """An in-memory LRU of finished responses in front of an optional SQLite file.

    Safe to call from several threads (one lock around the memory tier and one connection) and
    from several processes on one file (WAL journal, busy timeout, INSERT OR REPLACE).

    path: the SQLite file (created with its folder if missing); None: memory only.
    max_entries: entries kept in memory, least recently used evicted first.
    max_disk_entries: rows kept on disk; the oldest written are pruned every few hundred puts,
        so the file can run over by up to PRUNE_EVERY_PUTS rows per process in between.
    """

    def __init__(
        self,
        path: Path | str | None,
        max_entries: int = 1024,
        max_disk_entries: int = 100_000,
    ) -> None:
        for name, value in (("max_entries", max_entries), ("max_disk_entries", max_disk_entries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"ResultCache {name} must be an integer >= 1, got {value!r}; "
                    "to turn the cache off, do not create one"
                )
        self.path = None if path is None else Path(path)
        self.max_entries = max_entries
        self.max_disk_entries = max_disk_entries
        self.hits = 0
        self.misses = 0
        # Values are kept as JSON text: every get returns a fresh dict, so a caller that edits
        # its response cannot change what the next caller is served.
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._puts_since_prune = 0
        if self.path is not None:
            self._open_disk(self.path)

    # --- public ----------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached value for `key`, or None; memory first, then disk (a disk hit moves up)."""
        with self._lock:
            text = self._memory.get(key)
            if text is not None:
                self._memory.move_to_end(key)
            elif self._db is not None:
                text = self._read_disk(key)
                if text is not None:
                    self._remember(key, text)
            if text is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(text)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store `value` (a JSON-serialisable dict) under `key`, replacing any earlier one."""
        if not isinstance(key, str):
            raise TypeError(f"ResultCache.put: key must be a str, got {type(key).__name__}")
        if not isinstance(value, dict):
            raise TypeError(f"ResultCache.put: value must be a dict, got {type(value).__name__}")
        try:
            text = json.dumps(value, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"ResultCache.put: the value for key {key[:12]}... is not JSON-serialisable "
                f"({exc}); store the finished response as plain JSON data"
            ) from exc
        with self._lock:
            self._remember(key, text)
            if self._db is not None:
                self._write_disk(key, text)

    def __len__(self) -> int:
        """Entries in the memory tier."""
        return len(self._memory)

    def close(self) -> None:
        """Close the disk store; the memory tier keeps answering. Calling it twice is fine."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- memory tier -----------------------------------------------------------------------

    def _remember(self, key: str, text: str) -> None:
        self._memory[key] = text
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    # --- disk tier (every call below holds self._lock) --------------------------------------

    def _open_disk(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, each statement its own short transaction, so
            # no process holds the write lock between calls.
            db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            self._give_up_disk("open", exc)
            return
        self._db = db
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._set_up_disk(db)
                return
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL while another process does the same can fail at
                # once with "database is locked": SQLite skips the busy handler there to avoid
                # a deadlock. The other process finishes in milliseconds, so try again.
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self._give_up_disk("open", exc)
                return
            except sqlite3.Error as exc:
                # A file of garbage opens fine and fails here ("file is not a database").
                self._give_up_disk("open", exc)
                return

    def _set_up_disk(self, db: sqlite3.Connection) -> None:
        """Journal mode, table and index; every step is idempotent, so a retry may repeat it."""
        # WAL: readers never block the writer and other processes see each commit at once.
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is crash-safe in WAL mode; a power cut may lose the last few entries, which
        # for a cache only means recomputing them.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS results "
            "(key TEXT PRIMARY KEY, value TEXT NOT NULL, stored_at REAL NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS results_by_age ON results (stored_at)")
        # A lowered max_disk_entries takes effect at startup, not after many puts.
        self._prune()

    def _read_disk(self, key: str) -> str | None:
        assert self._db is not None
        try:
            row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._give_up_disk("read", exc)
            return None
        return None if row is None else row[0]

    def _write_disk(self, key: str, text: str) -> None:
        assert self._db is not None
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO results (key, value, stored_at) VALUES (?, ?, ?)",
                (key, text, time.time()),
            )
            self._puts_since_prune += 1
            if self._puts_since_prune >= PRUNE_EVERY_PUTS:
                self._prune()
        except sqlite3.Error as exc:
            self._give_up_disk("write", exc)

    def _prune(self) -> None:
        """Delete the oldest-written rows beyond max_disk_entries (FIFO: reads stay read-only)."""
        assert self._db is not None
        self._puts_since_prune = 0
        (rows,) = self._db.execute("SELECT COUNT(*) FROM results").fetchone()
        excess = rows - self.max_disk_entries
        if excess > 0:
            self._db.execute(
                "DELETE FROM results WHERE rowid IN "
                "(SELECT rowid FROM results ORDER BY stored_at, rowid LIMIT ?)",
                (excess,),
            )

    def _give_up_disk(self, action: str, exc: BaseException) -> None:
        # Once only: the store is dropped for the life of this process. Retrying would make a
        # locked file stall the event loop BUSY_TIMEOUT_S on every request.
        log.warning(
            "result cache: could not %s %s (%s: %s); continuing with the in-memory cache only. "
            "Move or delete the file to get the disk cache back.",
            action,
            self.path,
            type(exc).__name__,
            exc,
        )
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock we need."""
    # "database is locked" is SQLITE_BUSY's message, "database table is locked" SQLITE_LOCKED's.
    return "locked" in str(exc) or "busy" in str(exc)

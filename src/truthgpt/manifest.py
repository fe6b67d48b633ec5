"""The manifest of a written folder: every file's size and SHA-256, checked by every reader.

A checkpoint (or export) folder is whole when manifest.json is there and every file it lists
has its size and hash. Sizes cost one stat per file and are always checked; hashes read every
byte, so readers check them when asked or when the folder is small enough to hash in a blink.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from truthgpt.errors import CheckpointError

MANIFEST = "manifest.json"
# Hashing runs at roughly 1 GB/s: up to this many bytes the check costs well under a second.
CHEAP_HASH_BYTES = 256 * 2**20


def write_manifest(folder: Path) -> None:
    """Record every file under `folder`. Call it last, inside the folder's atomic write: a
    folder with a valid manifest is complete."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def check_manifest(folder: Path, hashes: bool | None = None) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered.

    hashes: True always compares SHA-256, False never, None only when the listed files add up
    to at most CHEAP_HASH_BYTES.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {folder} is not a complete checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(folder / name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from None
    for path, size, _ in entries:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{path} is truncated or changed: {actual} bytes, {MANIFEST} says {size}"
            )
    if hashes is None:
        hashes = sum(size for _, size, _ in entries) <= CHEAP_HASH_BYTES
    if hashes:
        for path, _, digest in entries:
            if sha256(path) != digest:
                raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from {MANIFEST}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

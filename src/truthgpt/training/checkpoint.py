"""Checkpoints: a model folder (HF layout, safetensors) plus train_state.pt, written atomically.

A checkpoint is written into a temporary sibling folder, every file fsynced, then renamed into
place, so a crash mid-write never leaves a half-written `last/` or `best/`: either the old one
or the new one is there. A manifest of file sizes and SHA-256 hashes is written last; a folder
without a valid manifest is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from truthgpt.errors import CheckpointError

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(
    folder: Path,
    write_model: Callable[[Path], None],
    train_state: dict[str, Any] | None,
) -> Path:
    """Write a checkpoint to `folder` atomically. `write_model(tmp)` fills the model files."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    old = folder.parent / f".old-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_model(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        _write_manifest(tmp)
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        # A directory cannot be renamed over a non-empty one: move the old one aside first,
        # so that at every instant one complete checkpoint exists under some name.
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        _fsync(folder.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)
        raise CheckpointError(
            f"could not write checkpoint {folder}: {exc.strerror or exc}. "
            "The previous checkpoint is unchanged; free disk space or fix permissions."
        ) from exc
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_train_state(folder: Path) -> dict[str, Any]:
    verify_checkpoint(folder)
    return torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=True)


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present with its size and hash."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from None
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path} is missing or truncated")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its hash in {MANIFEST}")


def _write_manifest(folder: Path) -> None:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

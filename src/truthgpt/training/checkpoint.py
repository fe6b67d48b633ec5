"""Checkpoints: a model folder (HF layout, safetensors) plus train_state.pt, written atomically.

A checkpoint is written into a temporary sibling folder, every file fsynced, then renamed into
place, so a crash mid-write never leaves a half-written `last/` or `best/`: either the old one
or the new one is there. A manifest of file sizes and SHA-256 hashes is written last; a folder
without a valid manifest is not a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from truthgpt.atomic import publish_folder
from truthgpt.errors import CheckpointError
from truthgpt.guard import SHARDED_DIR, STEP_FOLDER, STEP_PREFIX, TRAIN_STATE, check_prunable
from truthgpt.manifest import check_manifest, write_manifest


def save_checkpoint(
    folder: Path,
    write_model: Callable[[Path], None],
    train_state: dict[str, Any] | None,
) -> Path:
    """Write a checkpoint to `folder` atomically. `write_model(tmp)` fills the model files."""

    def fill(tmp: Path) -> None:
        write_model(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        write_manifest(tmp)  # last: a folder with a valid manifest is complete

    try:
        return publish_folder(folder, fill)
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {folder}: {exc.strerror or exc}. "
            "The previous checkpoint is unchanged; free disk space or fix permissions."
        ) from exc


@dataclass(frozen=True)
class Resumable:
    """A checkpoint chosen to resume from: verified once (sizes and hashes, by find_resumable)
    and its training state read once; whoever resumes takes both from here."""

    folder: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def sharded(self) -> bool:
        """Written under FSDP: model and optimizer in `sharded/` (training/sharded.py)."""
        return (self.folder / SHARDED_DIR).is_dir()


def read_train_state(folder: Path) -> dict[str, Any]:
    """train_state.pt of a checkpoint already verified (find_resumable): no second check."""
    return torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=True)


def open_resumable(checkpoints: Path, warn: Callable[[str], None]) -> Resumable | None:
    """The newest complete checkpoint with training state (find_resumable), its state read."""
    folder = find_resumable(checkpoints, warn)
    return Resumable(folder, read_train_state(folder)) if folder is not None else None


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present with its size and hash."""
    check_manifest(folder, hashes=True)


# ---------------------------------------------------------------------------------------------
# The checkpoints of a run: step_N/ folders, last/ (the newest) and best/.


def step_folder_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def link_checkpoint(source: Path, folder: Path) -> Path:
    """Make `folder` an atomic copy of the complete checkpoint `source`, by hard links.

    Checkpoint files are never modified after they are written, so sharing them between
    step_N/ and last/ costs no disk and no I/O. Falls back to copying where links fail.
    """

    def fill(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)

    try:
        return publish_folder(folder, fill)
    except OSError as exc:
        message = f"could not write checkpoint {folder}: {exc.strerror or exc}"
        raise CheckpointError(message) from exc


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def step_checkpoints(checkpoints: Path) -> list[Path]:
    """step_N/ folders, newest first."""
    if not checkpoints.is_dir():
        return []
    folders = [p for p in checkpoints.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
    return sorted(folders, key=folder_step, reverse=True)  # by N: step_1000000 < step_999999


def folder_step(folder: Path) -> int:
    """N of a step_N/ folder."""
    return int(folder.name.removeprefix(STEP_PREFIX))


def prune_step_checkpoints(
    checkpoints: Path, keep_last: int, step: int | None = None
) -> list[Path]:
    """Delete all but the newest `keep_last` step_N/ folders; returns what was removed.

    `step`: that of the checkpoint just written or resumed from. Folders past it are deleted
    too: a run resumed from an earlier checkpoint found them damaged (find_resumable takes the
    newest complete one), so they are a past that was trained again, not the newest work.
    Only step_N folders inside the checkpoints/ of a run folder are ever deleted (guard.py).
    """
    folders = step_checkpoints(checkpoints)
    later = [f for f in folders if step is not None and folder_step(f) > step]
    removed = later + [f for f in folders if f not in later][keep_last:]
    for folder in removed:
        check_prunable(folder)
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def find_resumable(checkpoints: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint with training state: last/ and step_N/ by their step
    (last/ first on a tie). A kill after step_N/ was written but before last/ became its twin
    leaves last/ a checkpoint behind: step_N/ is then the newer one.

    Candidates are verified newest first, each once, until one passes: a folder that is
    incomplete or corrupt (a crash during its write, a truncated file) is skipped with a
    warning, so a run resumes from the previous good one.
    """
    candidates = step_checkpoints(checkpoints)
    last = checkpoints / "last"
    if last.is_dir():
        step = _peek_step(last)
        newer = 0 if step is None else sum(folder_step(f) > step for f in candidates)
        candidates.insert(newer, last)
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except CheckpointError as exc:
            warn(f"warning: skipping checkpoint {folder}: {exc}")
            continue
        if (folder / TRAIN_STATE).is_file():
            return folder
    return None


def newest_on_disk(checkpoints: Path) -> tuple[int, Path] | None:
    """The step and folder of the newest checkpoint with training state in `checkpoints`, not
    verified (find_resumable does that): what a Ctrl-C message names as --resume's start."""
    found = [(folder_step(f), f) for f in step_checkpoints(checkpoints)[:1]]
    last = checkpoints / "last"
    step = _peek_step(last) if (last / TRAIN_STATE).is_file() else None
    if step is not None:
        found.append((step, last))
    return max(found, key=lambda pair: pair[0], default=None)


def _peek_step(folder: Path) -> int | None:
    """The step in `folder`'s train_state.pt, not yet verified, its tensors only mapped (not
    read); None where it cannot be read (verification then says why)."""
    try:
        state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # whatever is wrong with it, verify_checkpoint names it
        return None


def finish_interrupted_save(resumable: Resumable, keep_last: int) -> list[str]:
    """What a save (Trainer.save_resumable) does after writing step_N/, done for the checkpoint
    a run resumes from in case a kill came first: last/ its twin, step_N/ folders pruned to
    `keep_last` (never the one resumed from). Returns what it did, for one log line."""
    if keep_last == 0:  # no step_N/ is written: the next save, into last/, prunes them
        return []
    folder = resumable.folder
    notes = []
    if folder.name != "last":  # last/ is behind it (or damaged)
        link_checkpoint(folder, folder.parent / "last")
        notes.append(f"last/ is {folder.name}/ again")
    removed = prune_step_checkpoints(folder.parent, keep_last, resumable.step)
    notes += [f"pruned {p.name}/" for p in removed]
    return notes

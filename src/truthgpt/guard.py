"""The one check before a command writes, replaces or prunes a folder: delete only what is ours.

Run folders, checkpoint folders and the sources a command reads are never written over, into
or around, whatever --overwrite says. --overwrite replaces a folder only when it is empty or
holds the marker file that the same kind of command left in it (`.truthgpt-run`,
`.truthgpt-export`, `.truthgpt-image`); runs from before markers are known by config.yaml
beside checkpoints/.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from truthgpt.errors import CheckpointError
from truthgpt.manifest import MANIFEST

CONFIG_FILE = "config.yaml"  # the resolved config of a run (config.CONFIG_FILE)
CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
SHARDED_DIR = "sharded"  # an FSDP checkpoint's model and optimizer shards (training/sharded.py)
# A LoRA run of task image-generation saves only its adapter, under diffusers' file name.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STEP_PREFIX = "step_"
STEP_FOLDER = re.compile(rf"{STEP_PREFIX}\d+")
MARKERS = {"run": ".truthgpt-run", "export": ".truthgpt-export", "image": ".truthgpt-image"}
COMMANDS = {"run": "train", "export": "export", "image": "image"}
# Kinds that only add files beside what is there (nothing is replaced, so no --overwrite).
ADDS_ONLY = {"image"}
# How deep to look inside a folder about to be replaced for run or checkpoint folders.
_CONTAINS_DEPTH = 4


def is_run_folder(folder: Path) -> bool:
    """Marked by train, or a run from before markers: checkpoints/ beside a config.yaml whose
    run_name is the folder's name (another tool's config.yaml + checkpoints/ is not ours)."""
    folder = Path(folder)
    if (folder / MARKERS["run"]).is_file():
        return True
    config_path = folder / CONFIG_FILE
    if not (config_path.is_file() and (folder / CHECKPOINTS).is_dir()):
        return False
    try:
        raw = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("run_name") == folder.name


def is_checkpoint_folder(folder: Path) -> bool:
    """A folder written as a checkpoint: training state, our manifest beside a config.json, or
    a place in a run's checkpoints/."""
    folder = Path(folder)
    if (folder / TRAIN_STATE).is_file() or (folder / SHARDED_DIR).is_dir():
        return True
    if (folder / "config.json").is_file() and _is_our_manifest(folder / MANIFEST):
        return True
    return folder.parent.name == CHECKPOINTS and is_run_folder(folder.parent.parent)


def _is_our_manifest(path: Path) -> bool:
    # manifest.json is a common name (web apps, other tools): ours lists files with sha256.
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return False
    return isinstance(files, dict)


def written_by(folder: Path, kind: str) -> bool:
    """True when `folder` holds the marker of `kind` (or is a run from before markers)."""
    folder = Path(folder)
    return (folder / MARKERS[kind]).is_file() or (kind == "run" and is_run_folder(folder))


def mark(folder: Path, kind: str) -> None:
    """Leave the marker that lets a later --overwrite of the same kind replace `folder`."""
    (Path(folder) / MARKERS[kind]).write_text(f"written by truthgpt {COMMANDS[kind]}\n")


def check_output(
    path: str | Path, kind: str, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Raise CheckpointError (one line) unless writing `path` can destroy nothing of the user's.

    kind: run | export | image. sources: what the command reads (never the output, nor inside
    or around it). Returns `path` resolved.
    """
    path = Path(path).expanduser().resolve()
    command = COMMANDS[kind]
    for source in sources:
        source = Path(source).expanduser().resolve()
        if path == source or source in path.parents or path in source.parents:
            raise CheckpointError(
                f"{path} is, contains or lies inside {source}, which `truthgpt {command}` reads; "
                "nothing was written. Choose another output folder."
            )
    for parent in path.parents:
        reason = _protected(parent)
        if reason:
            raise CheckpointError(
                f"{path} lies inside {parent}, {reason}; nothing was written. "
                "Choose an output folder outside it."
            )
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; choose another output folder")
    ours = written_by(path, kind)
    reason = None if ours and kind == "run" else _protected(path)
    if reason:
        raise CheckpointError(
            f"{path} is {reason}; `truthgpt {command}` never writes over it, --overwrite or "
            "not. Choose another output folder."
        )
    if kind in ADDS_ONLY or not any(path.iterdir()):
        return path
    if not ours:
        raise CheckpointError(
            f"{path} is not empty and was not written by `truthgpt {command}` (no "
            f"{MARKERS[kind]}); nothing was written. --overwrite replaces only such folders: "
            "choose another folder, or empty this one yourself."
        )
    if not overwrite:
        raise CheckpointError(
            f"{path} already holds an earlier `truthgpt {command}` output; nothing was written. "
            "Choose another folder or pass --overwrite to replace it."
        )
    inner = _protected_inside(path, own_checkpoints=path / CHECKPOINTS if kind == "run" else None)
    if inner:
        raise CheckpointError(
            f"{path} contains {inner[0]}, {inner[1]}; --overwrite would delete it, so nothing "
            "was written. Choose another output folder."
        )
    return path


def check_output_file(
    path: str | Path, command: str, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Raise CheckpointError (one line) unless writing the file `path` destroys nothing: it may
    not be or lie inside what the command reads, a run folder or a checkpoint, and an existing
    file is replaced only with --overwrite. Returns `path` resolved."""
    path = Path(path).expanduser().resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if path == source or source in path.parents:
            raise CheckpointError(
                f"{path} is or lies inside {source}, which `truthgpt {command}` reads; nothing "
                "was written. Choose another output file."
            )
    for parent in path.parents:
        reason = _protected(parent)
        if reason:
            raise CheckpointError(
                f"{path} lies inside {parent}, {reason}; nothing was written. "
                "Choose an output file outside it."
            )
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name for the output")
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path} already exists; nothing was written. Choose another name or pass "
            "--overwrite to replace it."
        )
    return path


def check_prunable(folder: Path) -> None:
    """Raise CheckpointError unless `folder` is a step_N/ checkpoint of a run folder (the only
    folders pruning may delete)."""
    folder = Path(folder)
    checkpoints = folder.parent
    if (
        not STEP_FOLDER.fullmatch(folder.name)
        or checkpoints.name != CHECKPOINTS
        or not is_run_folder(checkpoints.parent)
    ):
        raise CheckpointError(
            f"refusing to delete {folder}: only step_N folders in a run's {CHECKPOINTS}/ are pruned"
        )


def _protected(folder: Path) -> str | None:
    """Why `folder` must never be written over or into, or None."""
    if is_run_folder(folder):
        return "a run folder"
    if folder.name == CHECKPOINTS and is_run_folder(folder.parent):
        return "a run's checkpoints folder"
    if is_checkpoint_folder(folder):
        return "a checkpoint folder"
    return None


def _protected_inside(folder: Path, own_checkpoints: Path | None) -> tuple[Path, str] | None:
    """The first run or checkpoint folder below `folder` (own_checkpoints excepted), or None."""
    base_depth = len(folder.parts)
    for root, dirs, _ in os.walk(folder):
        here = Path(root)
        keep = []
        for name in sorted(dirs):
            child = here / name
            if child == own_checkpoints:
                continue  # a run's own checkpoints are replaced with it
            reason = _protected(child)
            if reason:
                return child, reason
            if len(child.parts) - base_depth < _CONTAINS_DEPTH:
                keep.append(name)
        dirs[:] = keep
    return None

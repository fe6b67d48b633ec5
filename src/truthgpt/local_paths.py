"""The local files a config names (data files, a tokenizer folder, a model to start from),
checked for being there and being the right kind of thing, without reading them.

Torch-free, so `truthgpt validate` runs every check and lists every problem in about a second,
and `train` finds a typo before a tokenizer is trained or a corpus encoded.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from truthgpt.config import IMAGE_TASKS, Config, ModelConfig, TokenizerConfig
from truthgpt.errors import CheckpointError, ConfigError, DataError, TruthGPTError, closest
from truthgpt.guard import CHECKPOINTS

# Files a saved tokenizer may consist of (fast and slow tokenizers, chat templates).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
)
# Sources whose data.paths are files or globs of files (imagefolder's is one folder).
FILE_SOURCES = ("text", "jsonl", "webdataset")
PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


def has_tokenizer_files(folder: Path) -> bool:
    # Files only: "tokenizer*" also matches the tokenizer/ folder of a run.
    return any(path.is_file() for pattern in TOKENIZER_PATTERNS for path in folder.glob(pattern))


def expand_paths(patterns: list[str], key_path: str) -> list[Path]:
    """Files matching each pattern (glob, `**` recursive), sorted per pattern, duplicates once.

    Raises DataError naming the first pattern that matches no file.
    """
    files: list[Path] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(
            path
            for path in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(path)
        )
        if not matches:
            folder = os.path.isdir(os.path.expanduser(pattern))
            files_in_it = f"{pattern.rstrip('/')}/**/*"
            hint = f"; it is a folder: give a glob of its files, e.g. {files_in_it!r}"
            raise DataError(
                f"{key_path}: {pattern!r} matches no file (relative paths start at "
                f"{os.getcwd()}){hint if folder else ''}"
            )
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(Path(path))
    return files


def check_tokenizer_path(cfg: TokenizerConfig) -> None:
    """`data.tokenizer.path`, when set, is a folder holding a saved tokenizer."""
    if not cfg.path:
        return
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"data.tokenizer.path: {cfg.path!r} is not a folder; give a local Hugging Face "
            "tokenizer folder, or leave it empty to train one on the data"
        )
    if not has_tokenizer_files(folder):  # transformers would blame sentencepiece
        run_tokenizer = Path(cfg.path) / "tokenizer"  # where a run folder keeps its own
        hint = (
            f"; did you mean {str(run_tokenizer)!r}?"
            if has_tokenizer_files(folder / "tokenizer")
            else ""
        )
        raise ConfigError(
            f"data.tokenizer.path: {cfg.path!r} holds no tokenizer files "
            f"({', '.join(TOKENIZER_PATTERNS)}){hint}; give a local Hugging Face tokenizer "
            "folder, or leave it empty to train one on the data"
        )


def check_init_from(cfg: ModelConfig, max_seq_len: int | None = None) -> None:
    """`model.init_from` is a local HF model folder (not a run folder) whose family fits
    `model.arch` and whose positions hold `max_seq_len` (data.max_seq_len).

    arch hf also takes a hub id, so there a missing folder is an error only when the value
    cannot be one (an absolute path, `./x`, `~/x`, `a/b/c`) or its parent folder is here
    (`models/lama` beside `models/llama`: a typo, not a hub repository named so).
    """
    if not cfg.init_from or cfg.arch not in ("llama", "gpt2", "hf"):
        return
    folder = Path(cfg.init_from).expanduser()
    if not folder.is_dir():
        if cfg.arch == "hf" and _could_be_hub_id(cfg.init_from):
            return
        hint = (
            "download the model first, or use model.arch: hf to load a hub id through transformers"
            if cfg.arch != "hf"
            else "download the model first, or give a hub id (namespace/name)"
        )
        raise ConfigError(
            f"model.init_from: {cfg.init_from!r} is not a local folder"
            f"{_sibling_hint(folder)}; {hint}"
        )
    config_file = folder / "config.json"
    if (folder / CHECKPOINTS).is_dir() and not config_file.is_file():
        best = Path(cfg.init_from) / CHECKPOINTS / "best"
        raise ConfigError(
            f"model.init_from: {cfg.init_from!r} is a run folder; give the checkpoint to start "
            f"from, e.g. {str(best)!r}"
        )
    if not config_file.is_file():
        if cfg.arch == "hf":
            return  # transformers says what is missing
        raise CheckpointError(
            f"model.init_from: {cfg.init_from!r} has no config.json, so it is not a Hugging Face "
            "model folder (one written by save_pretrained)"
        )
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"model.init_from: {str(config_file)!r} is not JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"model.init_from: {str(config_file)!r} is not a JSON object")
    positions = context_length(hf)
    if max_seq_len is not None and positions is not None and max_seq_len > positions:
        # gpt2's learned positions end there (an IndexError mid-run); RoPE would run on past
        # what the model was trained for, and its config.json would still say the shorter.
        raise ConfigError(
            f"data.max_seq_len: {max_seq_len} is longer than the {positions} positions "
            f"model.init_from {cfg.init_from!r} takes; set data.max_seq_len to {positions} or "
            "less (data.overlong says what happens to longer sft rows)"
        )
    if cfg.arch == "hf":
        return
    model_type = hf.get("model_type")
    family = "gpt2" if model_type == "gpt2" else "llama"
    if family != cfg.arch:
        raise ConfigError(
            f"model.arch is {cfg.arch!r} but model.init_from {cfg.init_from!r} holds a "
            f"{model_type!r} model; set model.arch: {family}"
        )


# The context length under the names transformers' configs give it.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(hf: dict) -> int | None:
    """The positions a model's config.json (as a dict) says it takes; None when it says none."""
    return next((hf[key] for key in _CONTEXT_KEYS if isinstance(hf.get(key), int)), None)


def _could_be_hub_id(value: str) -> bool:
    """Whether `value` reads as a hub id ("gpt2", "Qwen/Qwen2-0.5B") rather than a local path."""
    if value.startswith((".", "~", "/")) or "\\" in value or value.count("/") > 1:
        return False
    parent = Path(value).parent
    return parent == Path(".") or not parent.is_dir()


def _sibling_hint(folder: Path) -> str:
    """ " (did you mean 'models/llama'?)" for a misspelt folder whose parent exists, else ""."""
    parent = folder.parent
    if not parent.is_dir():
        return ""
    try:
        siblings = [path.name for path in parent.iterdir() if path.is_dir()]
    except OSError:
        return ""
    hint = closest(folder.name, siblings)
    return f" (did you mean {str(parent / hint)!r}?)" if hint else ""


def _check_pipeline_folder(init_from: str | None) -> None:
    if init_from and not (Path(init_from).expanduser() / PIPELINE_INDEX).is_file():
        raise CheckpointError(
            f"model.init_from: {init_from!r} has no {PIPELINE_INDEX}, so it is not a diffusers "
            "pipeline folder (one written by pipe.save_pretrained)"
        )


def _check_folders(paths: list[str], key_path: str) -> None:
    for path in paths:
        if not Path(path).expanduser().is_dir():
            raise DataError(
                f"{key_path}: {path!r} is not a folder (relative paths start at {os.getcwd()})"
            )


def path_problems(config: Config) -> list[TruthGPTError]:
    """Every missing or wrong local path the config names, one error each (empty: all there)."""
    data = config.data
    checks = []
    if config.task in IMAGE_TASKS:
        checks.append(lambda: _check_pipeline_folder(config.model.init_from))
        if data.source == "imagefolder":
            checks.append(lambda: _check_folders(data.paths, "data.paths"))
            checks.append(lambda: _check_folders(data.val_paths, "data.val_paths"))
    else:
        checks.append(lambda: check_init_from(config.model, data.max_seq_len))
        checks.append(lambda: check_tokenizer_path(data.tokenizer))
        if data.source in FILE_SOURCES:
            checks.append(lambda: expand_paths(data.paths, "data.paths"))
            checks.append(lambda: expand_paths(data.val_paths, "data.val_paths"))
    problems = []
    for check in checks:
        try:
            check()
        except TruthGPTError as exc:
            problems.append(exc)
    return problems

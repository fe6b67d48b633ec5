"""The run folder's lifecycle: create or reuse it safely, and resume only the model it holds.

- A fresh start cleans only a folder that is a run's (guard.py), and marks it `.truthgpt-run`.
- A resume compares the new config with the one the checkpoint was trained with: a change to
  what is trained (model, tokenizer, data, task, LoRA... everything outside STEERING_KEYS) is
  refused; a change that only steers the run (max_steps, intervals, logging...) is allowed.
- config_history.jsonl records every start and resume with the keys that changed, so what was
  trained when stays knowable; config.yaml always describes the current run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from truthgpt import config as config_module
from truthgpt.atomic import atomic_write_text, clear_interrupted_writes
from truthgpt.config import RUN_CONFIG, Config
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.guard import CHECKPOINTS, check_output, mark, written_by
from truthgpt.training.checkpoint import Resumable, finish_interrupted_save, open_resumable

HISTORY = "config_history.jsonl"
# Keys a resume may change: they steer the run (how long, how often to log, evaluate and save,
# where it runs) but not what is trained. Everything else must match the checkpoint's config.
# An entry ending in "." allows the whole section.
STEERING_KEYS = (
    # Where the run folder is and what it is called: a copied run (cp -a runs/a runs/b) resumes
    # under its new name.
    "output_dir",
    "run_name",
    "training.max_steps",
    "training.eval_every",
    "training.eval_batches",
    "training.log_every",
    "training.resume",
    "training.parallel",
    # With the world size (torchrun's, not the config's) it sets the global batch: a resume on
    # another number of processes keeps the global batch by changing it.
    "training.grad_accum_steps",
    # Not training.batch_size nor micro_batch: the data position counts micro-batches. Under
    # micro_batch auto the micro-batch the run chose is kept in its train state (micro_batch.py).
    "training.compile",
    "training.compile_mode",
    "training.compile_scope",
    # The same arithmetic by other kernels: a chunked loss, a block-sparse attention mask.
    "training.fused_loss",
    "training.packed_attention",
    "training.gradient_checkpointing",
    "training.fsdp_param_dtype",  # the shards and optimizer state stay fp32 either way
    "training.residual_dtype",  # activations only: the weights and their state stay fp32
    "training.early_stopping.",
    "training.nonfinite.",
    "data.num_workers",
    "checkpoint.",
    "logging.",
    "hardware.",
    "inference.",
    "diffusion.",
    "diffusion_training.samples.",
)
# What an earlier attempt without a checkpoint left: not work to keep on a fresh start.
_STALE = (CHECKPOINTS, "tb", "metrics.jsonl", "loss.png", "tokenizer", "samples", HISTORY)


class RunFolderLock:
    """An exclusive flock on `.NAME.lock` beside a run folder (lock_run_folder). close() lets
    go and removes the file, so a finished run leaves nothing beside its folder."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    def close(self) -> None:
        if self._handle.closed:
            return
        # Removed while still locked, and only if the name is still this file: a process that
        # opened it meanwhile then locks a file without a name, sees so and opens the new one.
        if _names_this_file(self._handle):
            os.unlink(self._handle.name)
        self._handle.close()


def _names_this_file(handle: IO[str]) -> bool:
    try:
        named = os.stat(handle.name)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def lock_run_folder(run_dir: Path) -> RunFolderLock | None:
    """Hold `run_dir` for this process: an exclusive lock on `.NAME.lock` beside it (outside
    it, so no folder that is not ours gets a file), released when the returned lock is closed
    or the process ends, however it ends. A second training of the same folder (a resume, an
    overwrite) is refused while the first runs. None where the OS has no flock (Windows).

    close() removes the file; a process killed holding it leaves it behind, harmless (a lock
    on a file nobody holds is free), and the next training takes and removes it."""
    try:
        import fcntl
    except ImportError:
        return None
    # One lock file whatever path (a symlink) names the folder: two "holders" of one folder
    # would write, and tidy (take_run_folder), under each other.
    run_dir = Path(run_dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(run_dir.parent / f".{run_dir.name}.lock", "a+")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                f"{run_dir} is in use by another `truthgpt train` (pid {holder}); nothing was "
                "changed. Wait for it to finish, stop it (Ctrl-C saves a checkpoint), or pick "
                "another run_name (--set run_name=NAME)."
            ) from None
        if _names_this_file(handle):
            break
        handle.close()  # its holder removed it as we opened it: lock the name's file afresh
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunFolderLock(handle)


def take_run_folder(
    run_dir: Path, log: Callable[[str], None] | None = None
) -> RunFolderLock | None:
    """Lock `run_dir` (lock_run_folder), then tidy what earlier trainings killed mid-write
    left in it and its checkpoints/ (atomic.py's .tmp-/.old- entries), with one log line.

    Holding the lock, this process is the only training of the folder, and it has written
    nothing yet: every such entry is a dead writer's. Under torchrun only rank 0 takes the lock,
    before any rank writes, and the ranks write their shards into folders rank 0 names, so no
    rank of this run has one yet either. Without a lock (no flock) nothing is tidied.
    """
    held = lock_run_folder(run_dir)
    if held is None or not written_by(run_dir, "run"):  # not ours (yet): never touched
        return held
    notes = clear_interrupted_writes(run_dir)
    notes += clear_interrupted_writes(run_dir / CHECKPOINTS, shown_from=run_dir)
    if notes:
        log = log or (lambda message: print(message, flush=True))
        log(f"{run_dir}: tidied the unfinished writes of a killed run: {', '.join(notes)}")
    return held


def prepare_run_dir(
    config: Config,
    overwrite: bool,
    resume: bool | str = False,
    log: Callable[[str], None] | None = None,
) -> Resumable | None:
    """Create or reuse the run folder; returns the checkpoint to resume from, if any (verified,
    its training state read: pass it on rather than reading it again).

    Refuses a folder that is not a run's, a run folder that holds a run unless told to resume
    or overwrite, and a resume whose config changes what is trained.
    """
    log = log or (lambda message: print(message, flush=True))
    run_dir = config.run_dir
    # prepare_run_dir's own rules below say when a used run folder may be reused; the guard
    # refuses everything that is not a run folder of ours (or is a source of this run).
    check_output(run_dir, "run", overwrite=True, sources=read_paths(config))
    checkpoints = run_dir / CHECKPOINTS
    # Temporary folders (".tmp-*") are interrupted writes, not checkpoints.
    has_run = checkpoints.is_dir() and any(
        not p.name.startswith(".") for p in checkpoints.iterdir()
    )
    resume_from = None
    if has_run and resume and not overwrite:
        resume_from = open_resumable(checkpoints, warn=log)
        if resume_from is None:
            raise CheckpointError(
                f"{run_dir} holds checkpoints but none is complete with its training state; "
                "nothing was changed. Pass --overwrite to start over."
            )
    elif resume is True and not overwrite:
        raise CheckpointError(f"nothing to resume: {checkpoints} holds no checkpoint")
    elif has_run and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints exist). Nothing was changed. "
            "Continue it with --resume, pick another run_name (--set run_name=NAME), or pass "
            "--overwrite to start over."
        )
    if resume_from is None:
        for stale in _STALE:
            path = run_dir / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        mark(run_dir, "run")
        _append_history(run_dir, {"step": 0, "event": "start", "changes": {}})
    else:
        step = resume_from.step
        folder = resume_from.folder
        changes = resume_changes(saved_config(folder, run_dir, log), config, folder)
        finished = finish_interrupted_save(resume_from, config.checkpoint.keep_last)
        if finished:
            log(f"finished the save a kill interrupted: {', '.join(finished)}")
        if step >= config.training.max_steps:
            return resume_from  # nothing to train (train() says so): the rest stays as it was
        mark(run_dir, "run")  # a run from before markers becomes a marked one
        truncate_metrics(run_dir, step)
        _append_history(run_dir, {"step": step, "event": "resume", "changes": changes})
        if changes:
            log(f"resumed with changed settings: {describe(changes)}")
    atomic_write_text(run_dir / config_module.CONFIG_FILE, config.to_yaml())
    return resume_from


def remove_new_run_folder(run_dir: Path) -> None:
    """Delete a run folder that `prepare_run_dir` just made, before any checkpoint: only one
    that carries our run marker and holds no checkpoints (anything else is left alone)."""
    checkpoints = run_dir / CHECKPOINTS
    if written_by(run_dir, "run") and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        shutil.rmtree(run_dir, ignore_errors=True)


def read_paths(config: Config) -> list[Path]:
    """The local files and folders a run reads, which its run folder must not be or hold."""
    named = [config.model.init_from, config.data.tokenizer.path]
    named += [*config.data.paths, *config.data.val_paths]
    return [Path(p).expanduser() for p in named if p and Path(p).expanduser().exists()]


def saved_config(checkpoint: Path, run_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The resolved config `checkpoint` was trained with, flattened to dotted keys.

    Checkpoints from before RUN_CONFIG existed fall back to the run's config.yaml.
    """
    path = checkpoint / RUN_CONFIG
    if not path.is_file():
        path = run_dir / config_module.CONFIG_FILE
        log(f"warning: {checkpoint} does not record its config; comparing with {path}")
    try:
        return flatten(config_module.load(path).model_dump(mode="json"))
    except ConfigError:  # written by another version: compare what it says
        return flatten(yaml.safe_load(path.read_text()) or {})


def resume_changes(
    old: dict[str, Any], config: Config, checkpoint: Path
) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} of the steering keys that changed; ConfigError (naming every key, both
    values and what to do) when a key that alters what is trained changed."""
    new = flatten(config.model_dump(mode="json"))
    changes = {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }
    altering = {key: values for key, values in changes.items() if not is_steering(key)}
    if altering:
        raise ConfigError(
            f"cannot resume {config.run_dir} with {describe(altering)}: the checkpoint "
            f"{checkpoint} was trained with the first value, and a resume never changes the "
            "model behind your back. Nothing was changed. Set it back, start a new run "
            "(--set run_name=NAME), or start over with --overwrite."
        )
    return changes


def is_steering(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in STEERING_KEYS)


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(
        f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items()
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _append_history(run_dir: Path, record: dict[str, Any]) -> None:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **record,
        "changes": {key: list(values) for key, values in record["changes"].items()},
    }
    with open(run_dir / HISTORY, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step`: a resumed run rewrites those steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)

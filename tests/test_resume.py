"""Never losing work: exact resume, kill -9, corrupt checkpoints, NaN guard, EMA, early stop."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw_config

from truthgpt import manifest
from truthgpt.config import load
from truthgpt.data import prepare_data
from truthgpt.errors import CheckpointError, TrainingError
from truthgpt.training import trainer as trainer_module
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import (
    find_resumable,
    read_train_state,
    save_checkpoint,
    step_checkpoints,
    verify_checkpoint,
)
from truthgpt.training.ema import EMA
from truthgpt.training.run import train
from truthgpt.training.run_folder import prepare_run_dir
from truthgpt.training.trainer import Trainer, build_model


def resume_config(tmp_path: Path, name: str, **sections: dict) -> dict:
    raw = tiny_raw_config(
        tmp_path,
        run_name=name,
        model={"dropout": 0.1},  # dropout makes the torch RNG part of the state
        training={"max_steps": 20, "log_every": 1, "eval_every": 10},
        checkpoint={"save_every": 5, "keep_last": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values}
    return raw


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def eval_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


class CrashAt(Callback):
    """Simulates a crash right after the checkpoint of `step` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step and path.name == "last":
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("ema", [False, True])
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tmp_path: Path, ema: bool) -> None:
    extra = {"training": {"ema": {"enabled": ema, "decay": 0.9, "evaluate": ema}}}
    full = train(load(resume_config(tmp_path, "full", **extra)))
    broken = load(resume_config(tmp_path, "broken", **extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    assert sorted(step_losses(broken.run_dir)) == list(range(1, 11))
    resumed = train(broken, resume=True)
    assert resumed.steps == 20
    expected, got = step_losses(full.run_dir), step_losses(broken.run_dir)
    assert sorted(got) == list(range(1, 21))
    # fp32 on the CPU, same thread count: the curves are bit-identical, not just close.
    assert got == expected
    assert eval_losses(broken.run_dir) == eval_losses(full.run_dir)
    assert resumed.initial_val_loss == full.initial_val_loss


def test_a_muon_run_resumes_exactly(tmp_path: Path) -> None:
    # Both halves of optim.name muon (Muon's momentum, AdamW's moments) must come back.
    optim = {"name": "muon", "muon_lr": 0.02}
    full = train(load(resume_config(tmp_path, "muonfull", optim=optim)))
    broken = load(resume_config(tmp_path, "muonbroken", optim=optim))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    train(broken, resume=True)
    expected, got = step_losses(full.run_dir), step_losses(broken.run_dir)
    assert sorted(got) == list(range(1, 21)) and got == expected
    assert eval_losses(broken.run_dir) == eval_losses(full.run_dir)
    assert full.final_val_loss < full.initial_val_loss


def test_resume_of_an_hf_arch_run_keeps_the_transformers_model(tmp_path: Path) -> None:
    # A gpt2-typed HF model could open as our decoder; resume must not switch modules under
    # the optimizer state (GPT-2's Conv1D weights are stored transposed).
    hf = {
        "arch": "hf",
        "hf_config": {
            "model_type": "gpt2",
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
        },
    }
    full = train(load(resume_config(tmp_path, "hffull", model=hf)))
    broken = load(resume_config(tmp_path, "hfbroken", model=hf))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken, callbacks=[CrashAt(10)])
    train(broken, resume=True)
    assert step_losses(broken.run_dir) == step_losses(full.run_dir)


def test_kill_9_mid_training_then_resume(tmp_path: Path) -> None:
    raw = resume_config(
        tmp_path,
        "killed",
        model={"hidden_size": 64, "max_position_embeddings": 64},
        data={"max_seq_len": 64},
        training={"max_steps": 60, "eval_every": 30},
        checkpoint={"save_every": 10, "keep_last": 1},
    )
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "truthgpt.cli", "train", str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = Path(raw["output_dir"]) / "killed"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            # Whole lines only: the writer may be half way through the last one.
            lines = metrics.read_text().split("\n")[:-1]
            steps = [json.loads(line)["step"] for line in lines if line]
            if steps and max(steps) >= 25:
                proc.send_signal(signal.SIGKILL)
                killed_after = max(steps)
                break
        time.sleep(0.005)
    proc.wait()
    assert killed_after is not None, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    last = find_resumable(run_dir / "checkpoints", warn=print)
    assert last is not None
    saved_step = torch.load(last / "train_state.pt", weights_only=True)["step"]
    assert saved_step % 10 == 0 and killed_after - saved_step < 10 + 1  # lost < save_every
    resumed = train(load(raw), resume=True)
    assert resumed.steps == 60
    reference = train(load({**raw, "run_name": "reference"}))
    got, expected = step_losses(run_dir), step_losses(reference.run_dir)
    assert sorted(got) == list(range(1, 61))
    for step in range(1, 61):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def killed_mid_write(folder: Path) -> int:
    """Write `folder` as every checkpoint is written (atomic.py), and die by a real kill -9
    half way through; returns the dead writer's pid."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from truthgpt.atomic import publish_folder

        def fill(tmp):
            (tmp / "model.safetensors").write_bytes(b"half of the weights")
            os.kill(os.getpid(), signal.SIGKILL)

        publish_folder(Path(sys.argv[1]), fill)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc.pid


def listing(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir())


def test_the_next_training_tidies_what_killed_writes_left(tmp_path: Path, capsys) -> None:
    raw = resume_config(tmp_path, "tidy", training={"max_steps": 10})
    checkpoints = train(load(raw)).run_dir / "checkpoints"
    pids = [killed_mid_write(checkpoints / name) for name in ("step_000015", "last")]
    assert f".tmp-step_000015-{pids[0]}" in listing(checkpoints)
    # Killed between publish_folder's two renames: best/ moved aside, the new one not yet in.
    moved = checkpoints / f".old-best-{pids[1]}"
    (checkpoints / "best").rename(moved)
    capsys.readouterr()
    assert train(load(raw), resume=True).steps == 10  # nothing to train: only tidied
    lines = [line for line in capsys.readouterr().out.splitlines() if "tidied" in line]
    assert len(lines) == 1, lines
    assert f"removed checkpoints/.tmp-step_000015-{pids[0]}/" in lines[0]
    assert f"restored checkpoints/best/ from checkpoints/.old-best-{pids[1]}/" in lines[0]
    assert listing(checkpoints) == ["best", "last", "step_000005", "step_000010"]
    verify_checkpoint(checkpoints / "best")


def crash_before_relinking_last(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The next save of `step` stops (as a kill would) once step_N/ is written, before last/
    becomes its twin and older step_N/ folders are pruned."""
    link = trainer_module.link_checkpoint

    def crashing_link(source: Path, folder: Path) -> Path:
        if source.name == f"step_{step:06d}":
            raise RuntimeError("simulated kill")
        return link(source, folder)

    monkeypatch.setattr(trainer_module, "link_checkpoint", crashing_link)


def test_resume_takes_the_newest_checkpoint_when_last_is_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    raw = resume_config(tmp_path, "behind", training={"max_steps": 7}, checkpoint={"save_every": 1})
    with monkeypatch.context() as patch:
        crash_before_relinking_last(patch, 7)
        with pytest.raises(RuntimeError, match="simulated kill"):
            train(load(raw))
    checkpoints = Path(raw["output_dir"]) / "behind" / "checkpoints"
    # One step_N/ more than keep_last (2), and last/ one checkpoint behind.
    assert listing(checkpoints) == ["best", "last", *(f"step_00000{n}" for n in (5, 6, 7))]
    assert read_train_state(checkpoints / "last")["step"] == 6
    hashed: list[Path] = []
    sha256 = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda path: hashed.append(path) or sha256(path))
    assert find_resumable(checkpoints, warn=print) == checkpoints / "step_000007"
    assert sorted(hashed) == sorted(
        p
        for p in (checkpoints / "step_000007").rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    monkeypatch.undo()
    # A resume with nothing left to train still ends the save the kill cut short.
    capsys.readouterr()
    assert train(load(raw), resume=True).steps == 7
    assert "finished the save a kill interrupted" in capsys.readouterr().out
    assert listing(checkpoints) == ["best", "last", "step_000006", "step_000007"]
    assert read_train_state(checkpoints / "last")["step"] == 7
    result = train(load({**raw, "training": {**raw["training"], "max_steps": 8}}), resume=True)
    assert result.steps == 8
    assert listing(checkpoints) == ["best", "last", "step_000007", "step_000008"]
    resumes = [json.loads(line) for line in (result.run_dir / "config_history.jsonl").open()]
    assert [r["step"] for r in resumes if r["event"] == "resume"] == [7]


def test_without_validation_best_is_never_older_than_last(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    raw = resume_config(tmp_path, "noval", data={"val_fraction": 0.0}, training={"max_steps": 5})
    checkpoints = train(load(raw)).run_dir / "checkpoints"
    longer = {**raw, "training": {**raw["training"], "max_steps": 10}}
    # The run's last checkpoint is written, then the process dies (before, best/ came after).
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load(longer), callbacks=[CrashAt(10)], resume=True)
    assert train(load(longer), resume=True).steps == 10
    best, last = (load_file(checkpoints / name / "model.safetensors") for name in ("best", "last"))
    assert read_train_state(checkpoints / "last")["step"] == 10
    assert best.keys() == last.keys()
    assert all(torch.equal(best[key], last[key]) for key in best)


def test_checkpoints_past_the_one_resumed_from_count_no_more(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "past", training={"max_steps": 10})
    checkpoints = train(load(raw)).run_dir / "checkpoints"
    # step_10/ (and last/, its twin) damaged: the resume goes on from step_5/.
    weights = checkpoints / "step_000010" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    resume = {
        **raw,
        "training": {**raw["training"], "max_steps": 6},
        "checkpoint": {"save_every": 3, "keep_last": 1},
    }
    assert train(load(resume), resume=True).steps == 6
    # The damaged step_10/ was trained again up to step 6: it is not the newest to keep.
    assert listing(checkpoints) == ["best", "last", "step_000006"]
    for name in ("last", "step_000006"):
        verify_checkpoint(checkpoints / name)
    assert read_train_state(checkpoints / "last")["step"] == 6


def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "trunc", checkpoint={"save_every": 5, "keep_last": 3})
    raw["training"]["max_steps"] = 15
    full = train(load(raw))
    checkpoints = full.run_dir / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == [
        "step_000015",
        "step_000010",
        "step_000005",
    ]
    weights = checkpoints / "last" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    warnings: list[str] = []
    folder = find_resumable(checkpoints, warn=warnings.append)
    # last/ and step_15/ share their files (hard links): both are damaged, step_10 is next.
    assert folder == checkpoints / "step_000010"
    assert any("truncated" in w for w in warnings)
    original = step_losses(full.run_dir)
    result = train(load(raw), resume=True)
    assert result.steps == 15
    assert step_losses(full.run_dir) == original


def test_keep_last_prunes_step_folders(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "prune", checkpoint={"save_every": 4, "keep_last": 2})
    result = train(load(raw))
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["best", "last", "step_000016", "step_000020"]
    for name in names:
        verify_checkpoint(result.run_dir / "checkpoints" / name)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "last"

    def good(path: Path) -> None:
        (path / "model.safetensors").write_bytes(b"weights v1")

    def disk_full(path: Path) -> None:
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    save_checkpoint(folder, good, {"step": 1})
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_checkpoint(folder, disk_full, {"step": 2})
    assert "previous checkpoint is unchanged" in str(info.value)
    verify_checkpoint(folder)
    assert (folder / "model.safetensors").read_bytes() == b"weights v1"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["last"]  # no temp folder left


def test_resume_flags(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "flags")
    raw["training"]["max_steps"] = 5
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(load(raw), resume=True)
    first = train(load({**raw, "training": {**raw["training"], "resume": "auto"}}))
    assert first.steps == 5
    run_dir = first.run_dir
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    again = train(load({**raw, "training": {**raw["training"], "resume": "auto"}}))
    assert again.steps == 5  # resumed at 5 of 5: nothing left to do, nothing lost
    # A resume with nothing to train, even one that asks for fewer steps, changes no file: the
    # run's config still says what its checkpoints were trained with.
    fewer = train(load({**raw, "training": {**raw["training"], "max_steps": 3}}), resume=True)
    assert fewer.steps == 5
    after = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before


def poisoned_trainer(tmp_path: Path, raw: dict, poison_batches: list[int]) -> Trainer:
    """A trainer whose batches number `poison_batches` (epoch 0) contain a token that turns the
    forward pass into NaN: its embedding row is NaN (untied, so the head stays finite)."""
    raw["model"]["tie_embeddings"] = False
    config = load(raw)
    prepare_run_dir(config, overwrite=False)
    data = prepare_data(config, config.run_dir, log=lambda message: None)
    model = build_model(config, vocab_size=len(data.tokenizer))
    poison = model.config.vocab_size - 1  # a padding id the tokenizer never produces
    assert poison >= len(data.tokenizer)
    with torch.no_grad():
        model.embed.weight[poison] = float("nan")
    trainer = Trainer(config, model, data, torch.device("cpu"), config.run_dir, callbacks=[])
    plan = trainer.batches.epoch_batches(0)
    for index in poison_batches:
        data.train.tokens[data.train.max_seq_len * plan[index][0] + 3] = poison
    return trainer


# Where the skip is decided: "host" reads the verdict every step; "device" is the fused AdamW
# path (found_inf), read by the loop only at log / eval / checkpoint steps.
SKIP_PATHS = {
    "host": {"training": {"nonfinite": {"decide": "host"}}},
    "device": {"optim": {"fused": True}},
}


@pytest.mark.parametrize("path", SKIP_PATHS)
def test_a_poisoned_batch_is_skipped_and_the_run_finishes(tmp_path: Path, path: str) -> None:
    raw = resume_config(tmp_path, "nan")
    for key, values in SKIP_PATHS[path].items():
        raw[key] = {**raw[key], **values} if key in raw else values
    raw["training"]["log_every"] = 5  # the device path reads the counts at log steps only
    trainer = poisoned_trainer(tmp_path, raw, poison_batches=[4, 11])
    assert trainer.skip_on_device == (path == "device")
    result = trainer.fit()
    assert result.steps == 20
    assert result.nonfinite_skipped == 2
    # Skipped updates leave the optimizer's step count (Adam's bias correction) alone.
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {18}
    assert all(
        torch.isfinite(p).all() for n, p in trainer.model.named_parameters() if n != "embed.weight"
    )
    assert result.final_val_loss < result.initial_val_loss


@pytest.mark.parametrize("path", SKIP_PATHS)
def test_consecutive_nonfinite_updates_stop_with_a_clear_message(tmp_path: Path, path) -> None:
    raw = resume_config(tmp_path, "nanstop")
    for key, values in SKIP_PATHS[path].items():
        raw[key] = {**raw[key], **values} if key in raw else values
    trainer = poisoned_trainer(tmp_path, raw, poison_batches=[7, 8, 9])
    with pytest.raises(TrainingError, match="3 non-finite updates in a row at step 10"):
        trainer.fit()


def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "nanroll")
    raw["training"]["nonfinite"] = {
        "action": "rollback",
        "max_consecutive": 2,
        "rollback_lr_factor": 0.5,
    }
    raw["optim"] = {**raw.get("optim", {}), "fused": True}  # skipped on the device
    trainer = poisoned_trainer(tmp_path, raw, poison_batches=[7, 8])
    assert trainer.skip_on_device
    result = trainer.fit()
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert result.steps == 20 and result.nonfinite_skipped == 2
    # The run went back to step 5 and on from there: 5 + (20 - 5) optimizer steps ran after.
    assert trainer.scheduler.base_lrs[0] == pytest.approx(raw["optim"]["lr"] * 0.5)
    assert torch.isfinite(torch.tensor(result.final_val_loss))


def test_ema_is_the_running_average() -> None:
    layer = torch.nn.Linear(2, 2, bias=False)
    ema = EMA(layer, decay=0.5)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], start + 1.0)
    with ema.applied():
        assert torch.allclose(layer.weight, start + 1.0)
    assert torch.allclose(layer.weight, start + 2.0)


def test_a_gated_ema_update_is_skipped_or_taken_on_the_device() -> None:
    layer = torch.nn.Linear(2, 2, bias=False)
    gated, plain = EMA(layer, decay=0.75), EMA(layer, decay=0.75)
    with torch.no_grad():
        layer.weight.add_(4.0)
    gated.update(gate=torch.tensor(False))
    assert torch.equal(gated.shadow[0], plain.shadow[0])  # a skipped step leaves it alone
    gated.update(gate=torch.tensor(True))
    plain.update()
    assert torch.allclose(gated.shadow[0], plain.shadow[0])


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    raw = resume_config(tmp_path, "early")
    raw["training"].update(
        {
            "max_steps": 40,
            "eval_every": 5,
            "early_stopping": {"enabled": True, "patience": 2, "min_delta": 100.0},
        }
    )
    result = train(load(raw))
    # The first evaluation (step 5) sets the bar; 10 and 15 fail to beat it by 100 nats.
    assert result.stopped_early and result.steps == 15
    verify_checkpoint(result.run_dir / "checkpoints" / "last")


def test_sigint_saves_and_stops_at_the_step_boundary(tmp_path: Path) -> None:
    class Interrupt(Callback):
        def on_step_end(self, step: int, metrics: dict) -> None:
            if step == 7:
                os.kill(os.getpid(), signal.SIGINT)

    raw = resume_config(tmp_path, "sigint")
    result = train(load(raw), callbacks=[Interrupt()])
    assert result.steps == 7 and result.interrupted  # the CLI then exits 130, not 0
    state_path = result.run_dir / "checkpoints" / "last" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 7
    assert train(load(raw), resume=True).steps == 20


def test_a_ctrl_c_swallowed_during_start_up_still_stops_at_the_first_step(
    tmp_path: Path,
) -> None:
    # Some imports catch everything, KeyboardInterrupt included: the request is remembered.
    from truthgpt.training import signals

    previous = signal.getsignal(signal.SIGINT)
    signals.catch_early_interrupts()
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed, as such an import would
        result = train(load(resume_config(tmp_path, "early_ctrl_c")))
    finally:
        signals._interrupted_early.clear()
        signal.signal(signal.SIGINT, previous)
    assert result.interrupted and result.steps == 1
    assert (
        torch.load(result.run_dir / "checkpoints" / "last" / "train_state.pt", weights_only=True)[
            "step"
        ]
        == 1
    )


def test_a_resume_that_changes_the_global_batch_says_so(tmp_path: Path) -> None:
    class Lines(Callback):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def on_log(self, message: str) -> None:
            self.lines.append(message)

    raw = resume_config(tmp_path, "batch", training={"max_steps": 5})
    train(load(raw))
    lines = Lines()
    longer = {**raw, "training": {**raw["training"], "max_steps": 6, "grad_accum_steps": 2}}
    train(load(longer), resume=True, callbacks=[lines])
    expected = "note: the global batch changes from 8 sequences per step (1 process(es)) to 16 (1)"
    assert any(line.startswith(expected) for line in lines.lines), lines.lines
    assert "--set training.grad_accum_steps=1 keeps it" in "\n".join(lines.lines)


def test_auto_resume_never_deletes_unusable_checkpoints(tmp_path: Path) -> None:
    raw = resume_config(
        tmp_path,
        "keep",
        training={"max_steps": 5, "resume": "auto"},
        checkpoint={"save_every": 5, "keep_last": 1},
    )
    result = train(load(raw))
    checkpoints = result.run_dir / "checkpoints"
    for folder in ("last", "step_000005"):
        (checkpoints / folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="nothing was changed"):
        train(load(raw))
    assert (checkpoints / "best" / "model.safetensors").is_file()
    assert (checkpoints / "last" / "model.safetensors").is_file()

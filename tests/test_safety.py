"""Nothing is lost by accident: outputs never replace what they were not asked to write, a
resume never changes the model it continues, and every reader checks the checkpoint it opens."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw_config
from typer.testing import CliRunner

import truthgpt
from truthgpt import atomic, guard
from truthgpt.cli import app
from truthgpt.config import DiffusionConfig, load
from truthgpt.diffusion.generate import generate_images
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.manifest import write_manifest
from truthgpt.models import load_model, resolve_model_folder
from truthgpt.models.export import export_hf
from truthgpt.training.checkpoint import prune_step_checkpoints, save_checkpoint
from truthgpt.training.run import train

runner = CliRunner()


def small_run(tmp_path: Path, name: str = "tiny", **sections: dict) -> dict:
    """10 steps, saved at 5 and 10 (step_5, step_10, last, best): a second or two on a CPU."""
    raw = tiny_raw_config(
        tmp_path,
        run_name=name,
        training={"max_steps": 10, "eval_every": 5, "log_every": 5},
        checkpoint={"save_every": 5, "keep_last": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values} if isinstance(values, dict) else values
    return raw


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run; tests work on their own copy (see `run_copy`)."""
    raw = small_run(tmp_path_factory.mktemp("trained"))
    return train(load(raw)).run_dir


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    # copytree copies the hard-linked last/ and step_000010/ into separate files.
    return Path(shutil.copytree(trained, tmp_path / "runs" / trained.name))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- 1. no command deletes what it was not asked to write --------------------------------------


def test_export_onto_its_run_folder_is_refused_even_with_overwrite(run_copy: Path) -> None:
    before = listing(run_copy)
    for out in (run_copy, run_copy / "checkpoints", run_copy / "checkpoints" / "last"):
        result = runner.invoke(app, ["export", str(run_copy), "--out", str(out), "--overwrite"])
        assert "run" in one_line_error(result) or "checkpoint" in result.output
    inside = runner.invoke(app, ["export", str(run_copy), "--out", str(run_copy / "hf")])
    assert "lies inside" in one_line_error(inside)
    # The folder that holds the run (the run is what export reads).
    around = runner.invoke(
        app, ["export", str(run_copy), "--out", str(run_copy.parent), "--overwrite"]
    )
    assert "contains or lies inside" in one_line_error(around)
    assert listing(run_copy) == before


def test_export_overwrite_replaces_only_an_earlier_export(run_copy: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not written by `truthgpt export`"):
        export_hf(run_copy, mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "mine"
    out = export_hf(run_copy, tmp_path / "export")
    assert (out / ".truthgpt-export").is_file()
    with pytest.raises(CheckpointError, match="--overwrite"):
        export_hf(run_copy, out)
    assert export_hf(run_copy, out, overwrite=True) == out.resolve()


def test_train_overwrite_never_empties_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    raw = small_run(tmp_path, training={"max_steps": 1})
    run_dir = Path(raw["output_dir"]) / raw["run_name"]
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "tokenizer" / "notes.txt").write_text("the user's")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not written by `truthgpt train`"):
            train(load(raw), overwrite=overwrite)
    assert (run_dir / "tokenizer" / "notes.txt").read_text() == "the user's"


def test_train_overwrite_still_replaces_a_run_from_before_markers(run_copy: Path) -> None:
    (run_copy / ".truthgpt-run").unlink(missing_ok=True)
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["output_dir"] = str(run_copy.parent)
    result = train(load(raw), overwrite=True)
    assert result.steps == 10 and (run_copy / ".truthgpt-run").is_file()


def test_train_overwrite_refuses_a_run_folder_it_reads_from(run_copy: Path) -> None:
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["output_dir"] = str(run_copy.parent)
    raw["model"]["init_from"] = str(run_copy / "checkpoints" / "best")
    before = listing(run_copy)
    with pytest.raises(CheckpointError, match="reads"):
        train(load(raw), overwrite=True)
    assert listing(run_copy) == before


def test_pruning_deletes_only_step_folders_of_a_run(tmp_path: Path) -> None:
    loose = tmp_path / "checkpoints"  # a checkpoints/ that no run folder owns
    for name in ("step_000001", "step_000002"):
        (loose / name).mkdir(parents=True)
    with pytest.raises(CheckpointError, match="refusing to delete"):
        prune_step_checkpoints(loose, keep_last=1)
    assert sorted(p.name for p in loose.iterdir()) == ["step_000001", "step_000002"]
    (loose / "step_notes").mkdir()  # a user's folder whose name merely starts like one
    (tmp_path / ".truthgpt-run").write_text("")
    assert prune_step_checkpoints(loose, keep_last=1) == [loose / "step_000001"]
    assert sorted(p.name for p in loose.iterdir()) == ["step_000002", "step_notes"]


def test_pruning_orders_step_folders_by_their_step(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("step_999999", "step_1000000"):  # past six digits names no longer sort
        (checkpoints / name).mkdir(parents=True)
    guard.mark(tmp_path / "run", "run")
    assert prune_step_checkpoints(checkpoints, keep_last=1) == [checkpoints / "step_999999"]


def test_only_a_run_folder_is_tidied_when_training_takes_it(tmp_path: Path) -> None:
    from truthgpt.training.run_folder import take_run_folder

    folder = tmp_path / "notes"  # a user's folder, named as the run
    for name in (".tmp-draft-12", "checkpoints/.tmp-last-12"):
        (folder / name).mkdir(parents=True)
    take_run_folder(folder).close()
    assert listing(folder) == [".tmp-draft-12", "checkpoints", "checkpoints/.tmp-last-12"]
    guard.mark(folder, "run")
    take_run_folder(folder).close()
    assert listing(folder) == [".truthgpt-run", "checkpoints"]


def test_images_never_go_into_a_run_folder(run_copy: Path) -> None:
    for out, reason in (
        (run_copy, "is a run folder"),
        (run_copy / "checkpoints" / "best" / "pngs", "lies inside"),
    ):
        cfg = DiffusionConfig(prompt="x", output_dir=str(out))  # refused before any loading
        with pytest.raises(CheckpointError, match=reason):
            generate_images(cfg)
    cfg = DiffusionConfig(model=str(run_copy), prompt="x", output_dir=str(run_copy / "pngs"))
    with pytest.raises(CheckpointError, match="reads"):
        generate_images(cfg)


# -- 2. resume never changes the model behind the user's back ----------------------------------


def run_config(run_copy: Path, **changes: object) -> dict:
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["output_dir"] = str(run_copy.parent)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    return raw


def history(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / "config_history.jsonl").read_text().split("\n")
        if line
    ]


def test_resume_refuses_a_change_to_the_model_and_changes_nothing(run_copy: Path) -> None:
    config_before = (run_copy / "config.yaml").read_text()
    before = listing(run_copy)
    raw = run_config(run_copy, model__hidden_size=64, training__max_steps=20)
    with pytest.raises(ConfigError) as info:
        train(load(raw), resume=True)
    message = str(info.value)
    assert "model.hidden_size 32 -> 64" in message and "\n" not in message
    assert "run_name" in message and "--overwrite" in message
    assert "max_steps" not in message  # a steering change is not the problem
    assert (run_copy / "config.yaml").read_text() == config_before
    assert listing(run_copy) == before


def test_a_run_folder_in_training_is_refused_to_a_second_training(run_copy: Path) -> None:
    from truthgpt.training.run_folder import lock_run_folder

    before = listing(run_copy)
    held = lock_run_folder(run_copy)  # as the first training holds it while it runs
    try:
        for resume, overwrite in ((True, False), (False, True)):
            raw = run_config(run_copy, training__max_steps=15)
            with pytest.raises(ConfigError, match="is in use by another `truthgpt train` \\(pid"):
                train(load(raw), resume=resume, overwrite=overwrite)
            assert listing(run_copy) == before  # the overwrite wiped nothing
    finally:
        held.close()
    assert train(load(run_config(run_copy, training__max_steps=15)), resume=True).steps == 15
    assert not (run_copy.parent / f".{run_copy.name}.lock").exists()  # gone with the run


def test_the_lock_file_goes_with_the_run_that_held_it(tmp_path: Path) -> None:
    import fcntl

    from truthgpt.training.run_folder import lock_run_folder

    folder, lock_file = tmp_path / "run", tmp_path / ".run.lock"
    lock_file.write_text("4242\n")  # left by a training killed with -9: nobody holds it
    held = lock_run_folder(folder)
    assert lock_file.read_text() == f"{os.getpid()}\n"
    # A second process opened the file just before the holder let go; it then locks a file
    # without a name, which must not count as holding the folder.
    late = open(lock_file, "a+")  # noqa: SIM115
    held.close()
    assert not lock_file.exists()
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the unnamed file is free to lock...
    again = lock_run_folder(folder)  # ...and the name is a new file, free as well
    with pytest.raises(ConfigError, match="in use"):
        lock_run_folder(folder)
    late.close()
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_with_steering_changes_goes_on_and_records_them(run_copy: Path) -> None:
    raw = run_config(run_copy, training__max_steps=15, training__log_every=1)
    # Other kernels for the same arithmetic steer too (packed_attention has no packed data here).
    raw["training"].update(fused_loss=True, packed_attention="auto")
    result = train(load(raw), resume=True)
    assert result.steps == 15
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["training"]["max_steps"] == 15
    start, resume = history(run_copy)
    assert start["event"] == "start" and start["step"] == 0
    assert resume["event"] == "resume" and resume["step"] == 10
    changes = resume["changes"]
    assert sorted(changes) == [
        "output_dir",
        "training.fused_loss",
        "training.log_every",
        "training.max_steps",
        "training.packed_attention",
    ]
    assert changes["training.max_steps"] == [10, 15] and changes["training.log_every"] == [5, 1]
    saved = yaml.safe_load((run_copy / "checkpoints" / "last" / "run_config.yaml").read_text())
    assert saved["training"]["max_steps"] == 15


def test_a_copied_run_resumes_under_its_new_name(run_copy: Path) -> None:
    copy = Path(shutil.copytree(run_copy, run_copy.parent / "copy", symlinks=True))
    raw = run_config(copy, training__max_steps=15)
    raw["run_name"] = "copy"
    result = train(load(raw), resume=True)
    assert result.run_dir == copy and result.steps == 15
    assert history(copy)[-1]["changes"]["run_name"] == ["tiny", "copy"]
    assert yaml.safe_load((copy / "config.yaml").read_text())["run_name"] == "copy"
    assert history(run_copy)[-1]["event"] == "start"  # the original is untouched


def test_a_run_folder_given_to_train_is_the_run_it_trains(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `truthgpt train RUN_FOLDER` trained <output_dir>/<run_name> of the folder's config.yaml,
    # from the working directory: a copied run resumed the original, and from elsewhere a run
    # found nothing to resume (or, without --resume, a new run started there).
    copy = Path(shutil.copytree(run_copy, run_copy.parent / "copy", symlinks=True))
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["output_dir"] = str(run_copy.parent)  # as written: it names the original, run_copy
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["train", str(copy), "--resume", "--set=training.max_steps=15"])
    assert result.exit_code == 0, result.output
    assert history(copy)[-1]["event"] == "resume"
    assert history(copy)[-1]["changes"]["run_name"] == ["tiny", "copy"]
    assert history(run_copy)[-1]["event"] == "start"  # the original is untouched
    assert list(elsewhere.iterdir()) == []
    # validate says where that run is; a --set run_name still names another one.
    shown = yaml.safe_load(runner.invoke(app, ["validate", str(copy)]).output)
    assert (shown["output_dir"], shown["run_name"]) == (str(copy.parent), "copy")
    assert load(copy, ["run_name=other"]).run_name == "other"


def test_resume_of_a_checkpoint_without_its_config_compares_config_yaml(run_copy: Path) -> None:
    # Checkpoints written before run_config.yaml existed: config.yaml is the reference.
    for folder in (run_copy / "checkpoints").iterdir():
        (folder / "run_config.yaml").unlink()
        (folder / "manifest.json").unlink()
        write_manifest(folder)
    raw = run_config(run_copy, model__num_layers=3)
    with pytest.raises(ConfigError, match="model.num_layers 2 -> 3"):
        train(load(raw), resume=True)


# -- 3. every reader of a checkpoint checks it -------------------------------------------------


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the hash sees it
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "corrupt"])
def test_a_run_folder_falls_back_to_the_newest_valid_checkpoint(
    run_copy: Path, damage, capsys: pytest.CaptureFixture
) -> None:
    checkpoints = run_copy / "checkpoints"
    assert resolve_model_folder(run_copy) == checkpoints / "best"
    damage(checkpoints / "best" / "model.safetensors")
    assert resolve_model_folder(run_copy) == checkpoints / "last"
    damage(checkpoints / "last" / "model.safetensors")
    damage(checkpoints / "step_000010" / "model.safetensors")
    assert resolve_model_folder(run_copy) == checkpoints / "step_000005"
    warnings = capsys.readouterr().err
    assert "warning: skipping checkpoint best/" in warnings
    assert "best/model.safetensors" in warnings
    model, _ = truthgpt.load_model(run_copy)  # the public API takes the same path
    assert isinstance(model, torch.nn.Module)


def test_eval_of_a_run_with_a_damaged_best_uses_last(run_copy: Path) -> None:
    truncate(run_copy / "checkpoints" / "best" / "model.safetensors")
    result = runner.invoke(app, ["eval", str(run_copy), "--max-batches", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: skipping checkpoint best/" in result.output
    assert str(run_copy / "checkpoints" / "last") in result.output


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: truncate(f / "model.safetensors"), "model.safetensors is truncated"),
        (lambda f: flip_a_byte(f / "model.safetensors"), "model.safetensors is corrupt"),
        (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    ],
    ids=["truncated", "corrupt", "no-manifest"],
)
def test_a_damaged_checkpoint_folder_stops_with_one_line(
    run_copy: Path, tmp_path: Path, damage, expected: str
) -> None:
    folder = run_copy / "checkpoints" / "step_000005"
    damage(folder)
    with pytest.raises(CheckpointError, match=expected):
        truthgpt.load_model(folder)
    if expected != "model.safetensors is corrupt":  # models.load_model checks sizes only
        with pytest.raises(CheckpointError, match=expected):
            load_model(folder)
    result = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "hf")])
    assert expected in one_line_error(result)
    assert not (tmp_path / "hf").exists()


def test_a_truncated_plain_hf_folder_is_an_error_not_a_traceback(
    run_copy: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"  # no manifest: an HF folder from elsewhere
    shutil.copytree(run_copy / "checkpoints" / "best", plain)
    (plain / "manifest.json").unlink()
    (plain / "train_state.pt").unlink(missing_ok=True)
    truncate(plain / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_model(plain)


def test_other_tools_folders_are_not_taken_for_runs_or_checkpoints(tmp_path: Path) -> None:
    # A Lightning-style project: its own config.yaml and checkpoints/ are not a run of ours,
    # so train --overwrite must not empty it.
    raw = small_run(tmp_path, run_name="project", training={"max_steps": 1})
    project = Path(raw["output_dir"]) / "project"
    (project / "checkpoints" / "epoch=3").mkdir(parents=True)
    (project / "config.yaml").write_text("trainer: {max_epochs: 3}\n")
    with pytest.raises(CheckpointError, match="not written by `truthgpt train`"):
        train(load(raw), overwrite=True)
    assert (project / "checkpoints" / "epoch=3").is_dir()
    # A web app's manifest.json beside a config.json is no checkpoint.
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "manifest.json").write_text('{"name": "app", "icons": []}')
    (app_dir / "config.json").write_text("{}")
    assert not guard.is_checkpoint_folder(app_dir) and not guard.is_run_folder(project)


# -- a full disk or a folder the machine refuses: one line, and nothing half-written ------------


def test_a_write_that_fails_on_a_full_disk_is_called_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save on a full disk says "unexpected pos 576 vs 534"; what it means is ENOSPC.
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "weights").write_text("the previous version")

    def fill(tmp: Path) -> None:
        (tmp / "weights").write_text("half of the new")
        torch.save(torch.zeros(4), tmp / "state.pt")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 << 20)  # 10 MiB left: full
    with pytest.raises(OSError) as info:
        atomic.publish_folder(folder, fill)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(folder)
    assert "No space left on device (" in str(info.value) and "576 vs 534" in str(info.value)
    assert listing(tmp_path) == ["checkpoint", "checkpoint/weights"]
    assert (folder / "weights").read_text() == "the previous version"

    # With room left on the disk, the failure is the writer's own and keeps its type.
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 100 << 30)
    with pytest.raises(RuntimeError, match="576 vs 534"):
        atomic.publish_folder(folder, fill)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*No space left"):
        monkeypatch.setattr(atomic, "free_bytes", lambda path: 0)
        save_checkpoint(folder, lambda tmp: fill(tmp), None)
    assert (folder / "weights").read_text() == "the previous version"


def test_the_cli_names_what_the_machine_refused_in_one_line(trained: Path) -> None:
    target = Path("/sys/truthgpt-export-test")  # a folder nobody may make, root included
    try:
        target.mkdir()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
            pytest.skip(f"/sys here refuses with {exc}")
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    done = subprocess.run(
        [sys.executable, "-m", "truthgpt", "export", str(trained), "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert "/sys/" in done.stderr

"""The local paths a config names: `validate` lists every missing or wrong one, and `train`
refuses them before it makes a run folder, trains a tokenizer or encodes a corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw_config
from typer.testing import CliRunner

from truthgpt.cli import app
from truthgpt.config import load
from truthgpt.errors import DataError
from truthgpt.local_paths import path_problems
from truthgpt.training.run import train

runner = CliRunner()


def test_validate_lists_every_missing_or_wrong_path(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("text\n")
    run_folder = tmp_path / "runs" / "old"
    (run_folder / "checkpoints").mkdir(parents=True)
    raw = tiny_raw_config(tmp_path)
    raw["data"].update(
        source="text",
        paths=[str(tmp_path / "corpus.txt")],
        val_paths=[str(tmp_path / "val*.txt")],
        tokenizer={"path": str(tmp_path)},
    )
    raw["model"]["init_from"] = str(run_folder)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))

    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "3 missing or wrong path(s)" in lines[0]
    assert f"model.init_from: {str(run_folder)!r} is a run folder" in lines[1]
    assert "data.tokenizer.path:" in lines[2] and "holds no tokenizer files" in lines[2]
    assert "data.val_paths:" in lines[3] and "matches no file" in lines[3]

    # With every path there, validate prints the resolved config.
    (tmp_path / "val.txt").write_text("more text\n")
    fixed = ["--set", "data.tokenizer.path=", "--set", "model.init_from="]
    ok = runner.invoke(app, ["validate", str(path), *fixed])
    assert ok.exit_code == 0, ok.output
    assert "corpus.txt" in ok.output


def test_init_from_without_config_json_is_named_by_key(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, model={"arch": "gpt2", "init_from": str(tmp_path)}))
    (problem,) = path_problems(config)
    assert str(problem).startswith(f"model.init_from: {str(tmp_path)!r} has no config.json")


def test_image_task_paths(tmp_path: Path) -> None:
    raw = {
        "task": "image-generation",
        "model": {"init_from": str(tmp_path)},
        "data": {"source": "imagefolder", "paths": [str(tmp_path / "pictures")]},
    }
    problems = [str(problem) for problem in path_problems(load(raw))]
    assert len(problems) == 2, problems
    assert "has no model_index.json" in problems[0]
    assert problems[1].startswith(f"data.paths: {str(tmp_path / 'pictures')!r} is not a folder")


def test_train_refuses_a_missing_data_path_before_making_the_run_folder(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path)
    raw["data"].update(source="jsonl", paths=[str(tmp_path / "rows" / "*.jsonl")])
    config = load(raw)
    with pytest.raises(DataError, match="data.paths: .* matches no file"):
        train(config)
    assert not config.run_dir.exists()

"""The README's code blocks run as written, in the order shown, in a fresh folder.

`configs/quickstart.yaml` there is the shipped one shrunk to a tiny model and corpus (same
run_name and keys), so the walk-through takes seconds; every command and snippet is the
README's own. Blocks that need what a test cannot have are skipped with the reason printed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from truthgpt.cli import app

ROOT = Path(__file__).resolve().parents[1]

# Commands (by their start, after any .venv/bin/) the test does not run, and why.
SKIPPED = {
    "python3 -m venv": "environment setup: .ci/run runs it in a clean clone",
    "pip install": "environment setup: .ci/run runs it in a clean clone",
    "python -m pytest": "the test suite itself",
    "truthgpt image": "needs a diffusers pipeline folder; tests/test_diffusion.py covers image",
    "truthgpt serve": "a server runs until stopped; tests/test_serve.py starts and drives it",
    "curl": "talks to a running server; tests/test_serve.py sends the same requests",
}
TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "data": {
        "max_documents": 40,
        "max_seq_len": 32,
        "tokenizer": {"vocab_size": 300, "train_max_chars": 300_000},
    },
    "training": {"max_steps": 20, "batch_size": 4, "eval_every": 10, "eval_batches": 2},
    "optim": {"warmup_steps": 2},
    "checkpoint": {"save_every": 10},
    "logging": {"tensorboard": False, "plot": False},
}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every ```bash and ```python block, in order."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S)


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `&&` split."""
    out: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token == "&&":
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
    return out


def tiny_quickstart(folder: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for section, values in TINY.items():
        raw[section] = {**raw.get(section, {}), **values}
        if section == "data":
            raw["data"]["tokenizer"] = values["tokenizer"]
    (folder / "configs").mkdir()
    (folder / "configs" / "quickstart.yaml").write_text(yaml.safe_dump(raw))


def skip_reason(command: list[str]) -> str | None:
    line = " ".join(command).removeprefix(".venv/bin/")
    return next((why for start, why in SKIPPED.items() if line.startswith(start)), None)


def test_readme_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    tiny_quickstart(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ran = 0
    for language, code in readme_blocks():
        if language == "python":
            exec(compile(code, "README.md", "exec"), {})
            ran += 1
            continue
        for command in commands(code):
            reason = skip_reason(command)
            if reason:
                print(f"skipped {' '.join(command)!r}: {reason}")
                continue
            program = command[0].removeprefix(".venv/bin/")
            if program == "printf" and len(command) == 4 and command[2] == ">":
                # printf FORMAT > FILE: the README's way of writing a small prompts file.
                Path(command[3]).write_text(command[1].encode().decode("unicode_escape"))
                continue
            assert program == "truthgpt", f"README runs {command[0]!r}: teach this test to run it"
            result = runner.invoke(app, command[1:])
            assert result.exit_code == 0, f"{' '.join(command)}\n{result.output}"
            ran += 1
    assert ran >= 7  # quickstart train + generate, four Use commands, the Python snippet

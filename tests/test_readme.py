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
    "truthgpt train configs/quickstart.yaml --nproc": "several processes: test_distributed.py",
    "torchrun": "several processes: test_distributed.py",
    "truthgpt train configs/digits-diffusion.yaml": "about 12 minutes on a CPU; "
    "tests/test_diffusion_training.py trains a shortened copy",
}
TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "data": {
        "max_documents": 12,  # 47k tokens: the 100 steps of 4 x 32 of the Python snippet fit
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


def start_server(command: list[str], port: int):
    """`truthgpt serve MODEL ...` as the README types it, on a free port, in a thread."""
    import threading
    import time

    import uvicorn

    from truthgpt.serving.openai_api import build_app
    from truthgpt.serving.server import build_state, serve_config

    model = command[2]
    config = serve_config(model, None, [f"serve.port={port}"])
    state = build_state(model, config)
    server = uvicorn.Server(uvicorn.Config(build_app(state), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the README's server did not start"
        time.sleep(0.05)
    return server, thread, state


def test_readme_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    import shutil
    import subprocess

    from serving_fixtures import free_port

    tiny_quickstart(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ran = 0
    port = str(free_port())  # the README's 8000 may be taken on a test machine
    servers = []
    try:
        ran = _run_blocks(runner, port, servers, shutil, subprocess)
    finally:
        for server, thread, state in servers:
            server.should_exit = True
            thread.join(10)
            state.engine.shutdown()
    assert servers, "the README's serve command did not run"
    assert ran >= 7  # quickstart train + generate, four Use commands, the Python snippet


def _run_blocks(runner, port: str, servers: list, shutil, subprocess) -> int:
    ran = 0
    for language, code in readme_blocks():
        code = code.replace("8000", port)
        if language == "python":
            exec(compile(code, "README.md", "exec"), {})
            ran += 1
            continue
        for command in commands(code):
            if command[:2] == ["truthgpt", "serve"]:
                servers.append(start_server(command, int(port)))
                ran += 1
                continue
            if command[0] == "curl":
                if shutil.which("curl") is None:
                    print("skipped curl: not installed here")
                    continue
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0 and '"choices"' in done.stdout, done.stdout
                ran += 1
                continue
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
    return ran

"""The CLI end to end: validate, train, generate (run folder and plain HF folder)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import tiny_raw_config
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
from typer.testing import CliRunner, Result

from truthgpt.cli import app
from truthgpt.config import load
from truthgpt.data.tokenizer import train_bpe_tokenizer
from truthgpt.manifest import write_manifest
from truthgpt.training import run as run_module
from truthgpt.training import signals
from truthgpt.training import trainer as trainer_module
from truthgpt.training.callbacks import Callback

runner = CliRunner()


def write_config(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(tmp_path, **sections)))
    return path


def test_validate_prints_resolved_config_or_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    ok = runner.invoke(app, ["validate", str(path), "--set", "training.max_steps=7"])
    assert ok.exit_code == 0, ok.output
    assert yaml.safe_load(ok.output)["training"]["max_steps"] == 7
    bad = runner.invoke(app, ["validate", str(path), "--set", "training.max_stepz=7"])
    assert bad.exit_code == 1
    assert "training.max_stepz: unknown key" in bad.output
    assert "Did you mean 'training.max_steps'" in bad.output


def test_validate_shows_the_sections_of_the_configs_task(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    language = runner.invoke(app, ["validate", str(root / "quickstart.yaml")])
    assert language.exit_code == 0, language.output
    shown = yaml.safe_load(language.output)
    assert {"inference", "serve"} <= set(shown)
    assert not {"diffusion", "diffusion_training"} & set(shown)
    # What it leaves out is the defaults: the printed config loads back as the same config.
    assert load(shown) == load(root / "quickstart.yaml")
    image = yaml.safe_load(
        runner.invoke(app, ["validate", str(root / "digits-diffusion.yaml")]).output
    )
    assert {"diffusion", "diffusion_training"} <= set(image)
    assert not {"inference", "serve"} & set(image)
    # A section the config sets is shown whatever its task (a diffusion: for `truthgpt image`).
    drawn = runner.invoke(
        app, ["validate", str(root / "quickstart.yaml"), "--set", "diffusion.prompt=a cat"]
    )
    assert yaml.safe_load(drawn.output)["diffusion"]["prompt"] == "a cat"


def test_train_then_generate(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=10"])
    assert result.exit_code == 0, result.output
    assert "val perplexity" in result.output
    run_dir = tmp_path / "runs" / "tiny"
    args = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12"]
    greedy = [runner.invoke(app, [*args, "--temperature", "0"]) for _ in range(2)]
    assert greedy[0].exit_code == 0, greedy[0].output
    assert greedy[0].output == greedy[1].output
    assert greedy[0].stdout.startswith("def ")
    seeded = [runner.invoke(app, [*args, "--seed", "3", "--top-p", "0.9"]) for _ in range(2)]
    assert seeded[0].exit_code == 0 and seeded[0].output == seeded[1].output
    # --top-k 0 and -1 are off, as in the API and the sampler: the same as a k past the vocab.
    top_k = [runner.invoke(app, [*args, "--seed", "3", "--top-k", k]) for k in ("0", "-1", "9999")]
    assert top_k[0].exit_code == 0, top_k[0].output
    assert top_k[0].output == top_k[1].output == top_k[2].output
    # A prompt past the context (64 tokens) fails before any of it is echoed.
    long = runner.invoke(app, ["generate", str(run_dir), "--prompt", "def f(): pass\n" * 40])
    assert long.exit_code == 1 and "context is 64 tokens" in long.output, long.output
    assert long.stdout == ""
    # A second train into the same run folder is refused, nothing is lost.
    again = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=10"])
    assert again.exit_code == 1 and "already holds a run" in again.output


def test_generate_from_a_plain_hf_folder(tmp_path: Path) -> None:
    # Any AutoModelForCausalLM folder works; reuse a tokenizer trained by a tiny run.
    path = write_config(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "training.max_steps=1"]).exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "runs" / "tiny" / "tokenizer"))
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = runner.invoke(
        app,
        [
            "generate",
            str(folder),
            "--prompt",
            "import ",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("import ")
    # `truthgpt generate ... | head -1`: a reader that leaves early ends it quietly (SIGPIPE's
    # 141), not with rc 1 or a traceback.
    command = [sys.executable, "-m", "truthgpt", "generate", str(folder), "-p", "import "]
    piped = subprocess.Popen(
        [*command, "--temperature", "0", "--max-new-tokens", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    piped.stdout.close()  # the reader is gone before the first word
    stderr = piped.stderr.read().decode()
    assert piped.wait(timeout=120) in (0, 141), stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    # Sampling through transformers' generate: top_k -1 is off there too (transformers
    # itself refuses it), the same as 0.
    sampled = [
        runner.invoke(app, ["generate", str(folder), "-p", "import ", "--seed", "1", "--top-k", k])
        for k in ("-1", "0")
    ]
    assert sampled[0].exit_code == 0, sampled[0].output
    assert sampled[0].output == sampled[1].output


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--top-p", "0", "(0, 1]"),
        ("--top-p", "1.5", "(0, 1]"),
        ("--top-k", "-2", "-1"),
        ("--temperature", "-1", "0"),
        ("--max-new-tokens", "0", "1"),
        ("--device", "tpu", "cuda:N"),
    ],
)
def test_generate_errors_name_the_flag_the_user_typed(
    tmp_path: Path, flag: str, value: str, allowed: str
) -> None:
    out = runner.invoke(app, ["generate", str(tmp_path), "-p", "x", flag, value])
    assert out.exit_code == 1
    assert f"{flag}: " in out.output and allowed in out.output, out.output
    assert "inference." not in out.output


def test_generate_reports_a_missing_folder(tmp_path: Path) -> None:
    out = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert out.exit_code == 1
    assert "does not exist" in out.output


def test_eval_on_the_run_split_and_on_files(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "training.max_steps=5"]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    own = runner.invoke(app, ["eval", str(run_dir), "--max-batches", "3"])
    assert own.exit_code == 0, own.output
    assert "perplexity" in own.stdout and "checkpoints/best on val" in own.stdout
    text = tmp_path / "extra.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    files = runner.invoke(app, ["eval", str(run_dir), "--data", str(text)])
    assert files.exit_code == 0, files.output
    assert "extra.txt" in files.stdout
    loss = float(files.stdout.split("loss ")[1].split()[0])
    assert 0 < loss < 20
    # Rows of a .jsonl file are read as rows (the text in data.field), not as raw JSON text;
    # mixed with text files (where `--data a.txt --data 'b/*.jsonl'` read the rows' JSON
    # syntax as text) they are refused, as is a glob that matches nothing, named as --data.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": text.read_text()}) + "\n")
    as_rows = runner.invoke(
        app, ["eval", str(run_dir), "--data", str(rows), "--set=data.field=body"]
    )
    assert as_rows.exit_code == 0, as_rows.output
    assert float(as_rows.stdout.split("loss ")[1].split()[0]) == loss
    mixed = runner.invoke(app, ["eval", str(run_dir), "--data", str(text), "--data", str(rows)])
    assert mixed.exit_code == 1 and "evaluate each kind in a command of its own" in mixed.output
    nothing = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "no*.txt")])
    assert nothing.exit_code == 1 and "--data: " in nothing.output, nothing.output
    # One checkpoint of the run, on the run's data.
    one = runner.invoke(app, ["eval", str(run_dir / "checkpoints" / "last"), "--max-batches", "3"])
    assert one.exit_code == 0, one.output
    assert "checkpoints/last on val" in one.stdout
    # A file shorter than one block is still text to evaluate (the one-block rule is
    # training's); training on it is refused, naming the train split.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x = 1\n")
    small = runner.invoke(app, ["eval", str(run_dir), "--data", str(tiny)])
    assert small.exit_code == 0, small.output
    assert "tiny.txt" in small.stdout and "train" not in small.output
    on_tiny = ["data.source=text", f"data.paths=[{tiny}]", "run_name=tiny-data"]
    refused = runner.invoke(app, ["train", str(path), *[f"--set={item}" for item in on_tiny]])
    assert refused.exit_code == 1 and "the train split has" in refused.output, refused.output
    no_val = runner.invoke(app, ["eval", str(run_dir), "--set", "data.val_fraction=0"])
    assert no_val.exit_code == 1 and "the val split of" in no_val.output
    assert "no token to predict" in no_val.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    other = runner.invoke(app, ["eval", str(tmp_path)])
    assert other.exit_code == 1 and "is not a run folder" in other.output


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_eval_of_a_model_folder_on_files_is_transformers_loss(tmp_path: Path, kind: str) -> None:
    # A base model's loss on your own data, before fine-tuning it: any HF folder (gpt2 runs
    # on our decoder, opt through transformers), the loss transformers computes on it.
    tokenizer = train_bpe_tokenizer(["def add(a, b):\n    return a + b\n"] * 50, 300, 10_000)
    shape = dict(vocab_size=len(tokenizer), max_position_embeddings=64)
    config = (
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, **shape)
        if kind == "gpt2"
        else transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            **shape,
        )
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "code.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 3)

    result = runner.invoke(app, ["eval", str(folder), "--data", str(text), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    loss = float(result.stdout.split("loss ")[1].split()[0])
    # The file is one document, shorter than the folder's 64 positions: one block, its eos.
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(expected, abs=1e-4)
    no_data = runner.invoke(app, ["eval", str(folder)])
    assert no_data.exit_code == 1 and "evaluate it on with --data" in no_data.output


def test_eval_on_a_run_without_checkpoints_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(path.read_text())  # what training writes first
    for folder in (run_dir, run_dir / "checkpoints"):
        folder.mkdir(exist_ok=True)
        out = runner.invoke(app, ["eval", str(run_dir)])
        assert out.exit_code == 1
        assert "no finished checkpoint yet" in out.output, out.output
        assert "not a run folder" not in out.output


def test_resume_flag_continues_a_run(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    first = runner.invoke(
        app,
        ["train", str(path), "--set", "training.max_steps=10", "--set", "checkpoint.save_every=5"],
    )
    assert first.exit_code == 0, first.output
    more = runner.invoke(
        app,
        [
            "train",
            str(path),
            "--set",
            "training.max_steps=12",
            "--set",
            "checkpoint.save_every=5",
            "--resume",
        ],
    )
    assert more.exit_code == 0, more.output
    assert "resumed from" in more.output and "at step 10" in more.output
    done = runner.invoke(app, ["train", str(path), "--set", "training.max_steps=12", "--resume"])
    assert done.exit_code == 0, done.output
    assert "nothing to train" in done.output and "at step 12" in done.output


class CtrlCTwice(Callback):
    """Two Ctrl-C at the end of `step`: the first asks for a stop at the step boundary, the
    second stops at once (a run stuck in a long step, as a user presses Ctrl-C again)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step: int, metrics: dict) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_ctrl_c_says_which_checkpoint_a_resume_continues_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, training={"log_every": 1}, checkpoint={"save_every": 5})
    run_dir = tmp_path / "runs" / "tiny"
    build_callbacks = run_module.build_callbacks

    def train_until_ctrl_c_twice(step: int, *args: str) -> Result:
        monkeypatch.setattr(
            run_module,
            "build_callbacks",
            lambda config, run_dir: [*build_callbacks(config, run_dir), CtrlCTwice(step)],
        )
        previous = signal.getsignal(signal.SIGINT)
        try:
            return runner.invoke(app, ["train", str(path), *args])
        finally:  # the CLI took SIGINT over for this (test) process
            signal.signal(signal.SIGINT, previous)
            signals._interrupted_early.clear()

    fresh = train_until_ctrl_c_twice(7)
    assert fresh.exit_code == 130, fresh.output
    checkpoint = run_dir / "checkpoints" / "step_000005"
    expected = "stopped at step 7 (steps 6-7 were not saved); the newest checkpoint is step 5, "
    assert f"{expected}{checkpoint}: --resume continues from it" in fresh.output
    assert "before training began" not in fresh.output
    resumed = train_until_ctrl_c_twice(12, "--resume")
    assert resumed.exit_code == 130, resumed.output
    assert "resumed from" in resumed.output and "at step 5" in resumed.output
    assert "stopped at step 12 (steps 11-12 were not saved)" in resumed.output
    assert f"the newest checkpoint is step 10, {run_dir / 'checkpoints'}" in resumed.output
    steps = [json.loads(line)["step"] for line in (run_dir / "config_history.jsonl").open()]
    assert steps == [0, 5]


def test_ctrl_c_right_after_a_checkpoints_rename_names_that_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step_N/ folder is complete once renamed into place; a Ctrl-C before the save returns
    # must name it (as --resume takes it), not the checkpoint before.
    path = write_config(tmp_path, checkpoint={"save_every": 5})
    save = trainer_module.save_checkpoint

    def save_then_ctrl_c_twice(folder: Path, *args: object, **kwargs: object) -> object:
        written = save(folder, *args, **kwargs)
        if folder.name == "step_000010":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return written

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_ctrl_c_twice)
    previous = signal.getsignal(signal.SIGINT)
    try:
        stopped = runner.invoke(app, ["train", str(path)])
    finally:  # the CLI took SIGINT over for this (test) process
        signal.signal(signal.SIGINT, previous)
        signals._interrupted_early.clear()
    assert stopped.exit_code == 130, stopped.output
    step_10 = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000010"
    assert f"the newest checkpoint is step 10, {step_10}: --resume" in stopped.output


class CtrlCAtTheLastLine(Callback):
    def on_log(self, message: str) -> None:
        if message.startswith("run folder:"):
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_after_the_run_finished_says_it_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop has given the signals back; this Ctrl-C must not say "before training began".
    path = write_config(tmp_path, training={"max_steps": 4})
    build_callbacks = run_module.build_callbacks
    monkeypatch.setattr(
        run_module,
        "build_callbacks",
        lambda config, run_dir: [*build_callbacks(config, run_dir), CtrlCAtTheLastLine()],
    )
    previous = signal.getsignal(signal.SIGINT)
    try:
        stopped = runner.invoke(app, ["train", str(path)])
    finally:
        signal.signal(signal.SIGINT, previous)
        signals._interrupted_early.clear()
    assert stopped.exit_code == 130, stopped.output
    assert "before training began" not in stopped.output
    final = tmp_path / "runs" / "tiny" / "checkpoints" / "step_000004"
    expected = f"interrupted after training finished at step 4; it is saved in {final}"
    assert expected in stopped.output


def test_generate_chat_uses_the_template_or_the_servers_plain_one(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "training.max_steps=2"]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    args = ["generate", str(run_dir), "--chat", "--prompt", "hi", "--max-new-tokens", "3"]
    # No template of its own (task causal_lm): the plain role headers the server falls back
    # to, said in one line.
    plain = runner.invoke(app, [*args, "--temperature", "0"])
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("<|user|>\nhi\n<|assistant|>\n")
    assert plain.stderr.count("\n") == 1 and "no chat template" in plain.stderr
    best = run_dir / "checkpoints" / "best"
    tokenizer = AutoTokenizer.from_pretrained(str(best))
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}=>"
    tokenizer.save_pretrained(str(best))
    write_manifest(best)  # an edited checkpoint needs a new manifest, or readers skip it
    chat = runner.invoke(app, [*args, "--temperature", "0"])
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.startswith("[hi]=>") and "no chat template" not in chat.stderr


def test_generate_out_never_writes_over_a_run_or_an_existing_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "training.max_steps=2"]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nimport \n")
    config_before = (run_dir / "config.yaml").read_bytes()
    args = ["generate", str(run_dir), "--prompts-file", str(prompts), "--max-new-tokens", "3"]
    for inside in (run_dir / "config.yaml", run_dir / "checkpoints" / "last" / "x.jsonl", prompts):
        refused = runner.invoke(app, [*args, "--out", str(inside)])
        assert refused.exit_code == 1 and "nothing was written" in refused.output
    assert (run_dir / "config.yaml").read_bytes() == config_before
    out = tmp_path / "results.jsonl"
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--out", str(out), "--overwrite"]).exit_code == 0
    alone = runner.invoke(app, ["generate", str(run_dir), "--prompt", "x", "--out", str(out)])
    assert alone.exit_code == 1 and "--prompts-file" in alone.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    none = runner.invoke(app, ["generate", str(run_dir), "--prompts-file", str(empty)])
    assert none.exit_code == 1 and "holds no prompts" in none.output
    # --stop "\n" (as a shell passes it: backslash, n) stops at the first newline.
    stopped = runner.invoke(
        app,
        ["generate", str(run_dir), "--prompt", "def ", "--stop", "\\n", "--temperature", "0"],
    )
    assert stopped.exit_code == 0 and stopped.stdout.count("\n") <= 1


def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback() -> None:
    # A real SIGINT, sent by the process to itself when pydantic starts to import: the first
    # ~0.2 s of every command, before typer's own Ctrl-C handling (exit 130) is in place.
    code = textwrap.dedent(
        """
        import os, runpy, signal, sys

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "pydantic":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["truthgpt", "validate", "configs/quickstart.yaml"]
        runpy.run_module("truthgpt", run_name="__main__", alter_sys=True)
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "" and done.stdout == ""


@pytest.mark.parametrize("swallowed", [False, True])
def test_ctrl_c_while_train_starts_says_nothing_was_saved(tmp_path: Path, swallowed: bool) -> None:
    # A real SIGINT when torch starts to import (train's first seconds), once as it comes and
    # once swallowed by the import, as a library's bare `except:` does: either way the run
    # stops before anything is built, says so and exits 130, with no traceback.
    path = write_config(tmp_path)
    code = textwrap.dedent(
        f"""
        import os, runpy, signal, sys, time

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    sys.meta_path.remove(self)
                    try:
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(1)  # the signal arrives here
                    except KeyboardInterrupt:
                        if not {swallowed}:
                            raise
                return None

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["truthgpt", "train", {str(path)!r}]
        runpy.run_module("truthgpt", run_name="__main__", alter_sys=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted before training began; nothing was saved\n"
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_help_texts_describe_every_option_and_their_defaults() -> None:
    from truthgpt.config import DiffusionConfig

    def help_of(*command: str) -> str:
        # The help box wraps at the terminal's width: read it as one line of words.
        text = runner.invoke(app, [*command, "--help"]).stdout
        return re.sub(r"[\s│╭╮╰╯─]+", " ", text)

    top = help_of()
    assert "serve" in top and "diffusion" in top
    image = help_of("image")
    assert "A run folder" in image
    fields = DiffusionConfig.model_fields
    assert f"diffusion.steps ({fields['steps'].default})" in image
    assert f"diffusion.guidance ({fields['guidance'].default})" in image
    for option in ("--prompt", "--negative-prompt", "--steps", "--guidance", "--seed"):
        after = image.split(option + " ", 1)[1]
        assert not after.startswith("--"), option  # a description follows the option
    assert "--no-speed <bool> SDPA" in image
    generate = help_of("generate")
    assert "default to the inference: section" in generate
    for option in ("--max-new-tokens", "--temperature", "--top-k", "--top-p"):
        assert "Default: from inference:" in generate.split(option + " <", 1)[1].split(" --")[0]

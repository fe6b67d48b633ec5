"""The Python API the README shows (`import truthgpt`) does what the CLI does: a run's own
`inference:` defaults, and user mistakes as the library's errors, not as Python internals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config
from typer.testing import CliRunner

import truthgpt
from truthgpt.cli import app
from truthgpt.config import load

# What the run's config says generation defaults to, unlike the schema's (0.8, 128 tokens).
RUN_INFERENCE = {"temperature": 0.0, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("api")
    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 10, "eval_every": 10},
        checkpoint={"save_every": 10},
        logging={"progress": "none", "tensorboard": False, "plot": False},
        inference=RUN_INFERENCE,
    )
    return truthgpt.train(load(raw)).run_dir


def test_generate_and_llm_sample_with_the_runs_inference_section(run_dir: Path) -> None:
    """truthgpt.generate and truthgpt.LLM sampled at 0.8 for 128 tokens whatever the run's
    `inference:` said, while `truthgpt generate RUN` used it."""
    llm = truthgpt.LLM(run_dir)
    assert llm.options.temperature == 0 and llm.options.max_new_tokens == 6
    explicit = truthgpt.SamplingParams(temperature=0, max_tokens=6, top_k=50)
    greedy = llm.generate(["def "], explicit, use_tqdm=False)[0].outputs[0].text
    assert llm.generate(["def "], use_tqdm=False)[0].outputs[0].text == greedy
    assert truthgpt.generate(run_dir, "def ") == greedy
    cli = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "def "])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout == "def " + greedy + "\n"
    # A value given wins over the run's; the rest stays the run's.
    three = truthgpt.LLM(run_dir, max_new_tokens=3).options
    assert three.max_new_tokens == 3 and three.temperature == 0
    assert len(llm.tokenizer.encode(truthgpt.generate(run_dir, "def ", max_new_tokens=2))) <= 2


def test_bad_prompts_and_params_are_request_errors(run_dir: Path) -> None:
    llm = truthgpt.LLM(run_dir)
    # A dict of settings was iterated as its keys: "params must be SamplingParams, got str".
    with pytest.raises(truthgpt.RequestError, match="a SamplingParams, or a list .* got dict"):
        llm.generate(["def "], {"temperature": 0})
    with pytest.raises(truthgpt.RequestError, match="prompt 1 must be a string or a list of"):
        llm.generate(["def ", None])  # was a TypeError from deep inside the engine
    with pytest.raises(truthgpt.RequestError, match="prompt must be a string, got int"):
        truthgpt.generate(run_dir, 5)  # was taken for the token id 5


def test_load_config_takes_one_override_as_a_string_and_refuses_a_dict() -> None:
    # A string was read character by character: "override 't' must look like key.path=value".
    assert load({}, "training.max_steps=7").training.max_steps == 7
    with pytest.raises(truthgpt.ConfigError, match=r"\['training.max_steps=7'\]\), got dict"):
        truthgpt.load_config({}, {"training.max_steps": 7})


def test_train_refuses_a_resume_that_is_not_true_false_or_auto(tmp_path: Path) -> None:
    """resume="yes" started a new run where there was none (and resumed where there was)."""
    config = load(tiny_raw_config(tmp_path))
    with pytest.raises(truthgpt.ConfigError, match="resume: 'yes' is not one of True"):
        truthgpt.train(config, resume="yes")
    assert not config.run_dir.exists()


def test_a_device_or_thread_count_that_cannot_be_is_a_config_error(run_dir: Path) -> None:
    # load_model said "pin_memory=True requires a CUDA or other accelerator backend" (no CUDA)
    # or "cannot read the weights in ...: device gpu is invalid".
    with pytest.raises(truthgpt.ConfigError, match="device: 'gpu' is not one of auto, cpu"):
        truthgpt.load_model(run_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(truthgpt.ConfigError, match="'cuda' asked for, but CUDA is not"):
            truthgpt.load_model(run_dir, device="cuda")
    model, _ = truthgpt.load_model(run_dir, device="auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(truthgpt.ConfigError, match="threads: 0 is not a count"):
        truthgpt.generate(run_dir, "def ", threads=0)  # was the default count, silently


def test_a_wrong_init_from_is_refused_before_the_data_is_read(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A typo in model.init_from was found once a tokenizer was trained and the corpus encoded
    (minutes on a real corpus); so was a checkpoint of the other family."""
    missing = load(tiny_raw_config(tmp_path, model={"init_from": str(tmp_path / "nope")}))
    with pytest.raises(truthgpt.ConfigError, match="model.init_from: .* is not a local folder"):
        truthgpt.train(missing)
    best = run_dir / "checkpoints" / "best"
    other = tiny_raw_config(tmp_path, model={"arch": "gpt2", "init_from": str(best)})
    with pytest.raises(truthgpt.ConfigError, match="holds a 'llama' model; set model.arch: llama"):
        truthgpt.train(load(other))
    # A run folder was "has no config.json; is it a model folder?"
    run = tiny_raw_config(tmp_path, model={"init_from": str(run_dir)})
    with pytest.raises(truthgpt.ConfigError, match=r"is a run folder; give the checkpoint .*best"):
        truthgpt.train(load(run))
    assert "data:" not in capsys.readouterr().out


def test_a_max_seq_len_past_the_init_from_models_positions_is_refused_before_the_data(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A gpt2 folder's learned positions ended mid-run (native: 'position 127 is past ...',
    arch hf: an IndexError traceback); a llama one trained past its config.json's length."""
    best = str(run_dir / "checkpoints" / "best")  # the tiny llama: 64 positions
    for arch in ("llama", "hf"):
        model = {"arch": arch, "init_from": best}
        config = tiny_raw_config(tmp_path, model=model, data={"max_seq_len": 128})
        with pytest.raises(truthgpt.ConfigError) as error:
            truthgpt.train(load(config))
        assert str(error.value).startswith(
            f"data.max_seq_len: 128 is longer than the 64 positions model.init_from {best!r} takes"
        )
    assert "data:" not in capsys.readouterr().out
    # From scratch, the config's own length: found by validate.
    scratch = tiny_raw_config(tmp_path, model={"arch": "gpt2"}, data={"max_seq_len": 128})
    with pytest.raises(truthgpt.ConfigError, match=r"data.max_seq_len: 128 is longer than"):
        load(scratch)


def test_a_wrong_hf_init_from_is_named_before_the_data_is_read(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """arch hf passed any init_from to transformers after the data was encoded: a misspelt
    folder read as a hub id ("We couldn't connect to 'https://huggingface.co'"), a run folder
    as "Unrecognized model ... Should have a `model_type` key"."""
    checkpoints = run_dir / "checkpoints"
    typo = str(checkpoints / "bets")
    for arch in ("hf", "llama"):
        config = tiny_raw_config(tmp_path, model={"arch": arch, "init_from": typo})
        with pytest.raises(truthgpt.ConfigError) as error:
            truthgpt.train(load(config))
        expected = f"model.init_from: {typo!r} is not a local folder (did you mean "
        assert str(error.value).startswith(expected + f"{str(checkpoints / 'best')!r}?)")
    run = tiny_raw_config(tmp_path, model={"arch": "hf", "init_from": str(run_dir)})
    with pytest.raises(truthgpt.ConfigError, match=r"is a run folder; give the checkpoint .*best"):
        truthgpt.train(load(run))
    assert "data:" not in capsys.readouterr().out


def test_evaluate_and_export_are_the_cli_commands(run_dir: Path, tmp_path: Path) -> None:
    # The README's "everything the CLI does is one import away" holds for eval and export.
    cli = CliRunner().invoke(app, ["eval", str(run_dir), "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    result = truthgpt.evaluate(run_dir, device="cpu")
    assert f"loss {result['loss']:.4f}" in cli.stdout and result["split"] == "val"
    exported = truthgpt.export(run_dir, tmp_path / "hf")
    text = tmp_path / "code.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 5)
    on_the_run = truthgpt.evaluate(run_dir, str(text), device="cpu")
    # The export on the same file (its own config: blocks of the context, so the same
    # max_seq_len is set here) gives the loss of the run's model.
    seq_len = load(run_dir).data.max_seq_len
    on_the_export = truthgpt.evaluate(
        exported, [text], device="cpu", overrides=f"data.max_seq_len={seq_len}"
    )
    assert on_the_export["loss"] == pytest.approx(on_the_run["loss"], abs=1e-5)
    with pytest.raises(truthgpt.ConfigError, match="split must be"):
        truthgpt.evaluate(run_dir, split="test")
    with pytest.raises(truthgpt.ConfigError, match="data must be a path"):
        truthgpt.evaluate(run_dir, data=3)
    with pytest.raises(truthgpt.CheckpointError, match="which `truthgpt export` reads"):
        truthgpt.export(run_dir, run_dir)


def test_a_callback_registered_as_the_readme_shows_runs_in_training(tmp_path: Path) -> None:
    # The README registers with `@truthgpt.registry.CALLBACKS.register("name")` after a plain
    # `import truthgpt`, which was an AttributeError. A fresh interpreter, as a user's script.
    import subprocess
    import sys

    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 2, "eval_every": 2, "log_every": 1},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    script = f"""
import truthgpt

@truthgpt.registry.CALLBACKS.register("steps_seen")
class StepsSeen:
    def __init__(self, config, run_dir):
        self.steps = []
    def on_step_end(self, step, metrics):
        self.steps.append(step)
    def on_train_end(self, step):
        print("steps seen", self.steps)

raw = {raw!r}
raw["logging"]["callbacks"] = ["steps_seen"]
truthgpt.train(truthgpt.load_config(raw))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps seen [1, 2]" in done.stdout

"""Config schema: errors name the key path, the bad value and the allowed values; overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from truthgpt.config import Config, describe_fields, load, parse_override
from truthgpt.errors import ConfigError
from truthgpt.registry import ARCHS, CALLBACKS, IMAGE_SOURCES, OPTIMIZERS, SCHEDULES, SOURCES

ROOT = Path(__file__).resolve().parents[1]


def error_of(raw: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load(raw, overrides)
    return str(info.value)


def test_defaults_validate() -> None:
    config = load({})
    assert isinstance(config, Config)
    assert config.run_dir == Path("runs") / "run"


def test_unknown_key_has_full_path_and_did_you_mean() -> None:
    message = error_of({"training": {"max_step": 10}})
    assert "training.max_step: unknown key" in message
    assert "Did you mean 'training.max_steps'?" in message
    assert "batch_size" in message  # the allowed keys of that section are listed


def test_hf_trainer_and_peft_names_point_to_ours() -> None:
    # `rank` is no misspelling of `r`: the names other tools use are looked up as such.
    assert "Did you mean 'model.lora.r'?" in error_of({"model": {"lora": {"rank": 4}}})
    assert "Did you mean 'optim.lr'?" in error_of({"training": {"learning_rate": 1e-3}})
    message = error_of({"training": {"gradient_accumulation_steps": 4}})
    assert "Did you mean 'training.grad_accum_steps'?" in message
    assert "Did you mean 'data.max_seq_len'?" in error_of({"data": {"max_length": 512}})


def test_unknown_top_level_section() -> None:
    message = error_of({"modle": {"arch": "llama"}})
    assert "modle: unknown key" in message
    assert "'model'" in message


def test_wrong_type_names_key_and_value() -> None:
    message = error_of({"training": {"batch_size": "eight"}})
    assert "training.batch_size" in message
    assert "'eight'" in message


def test_bad_enum_lists_allowed_values() -> None:
    message = error_of({"training": {"precision": "fp8"}})
    assert "training.precision" in message and "'fp8'" in message
    for allowed in ("fp32", "bf16", "fp16", "auto"):
        assert allowed in message


def test_registry_name_did_you_mean() -> None:
    message = error_of({"optim": {"name": "adamm"}})
    assert "optim.name" in message and "did you mean 'adamw'" in message
    message = error_of({"data": {"source": "python_stdlib"}})
    assert "data.source" in message and "python-stdlib" in message
    message = error_of({"model": {"arch": "lama"}})
    assert "model.arch" in message and "'llama'" in message


def test_a_key_in_the_wrong_section_names_where_it_lives() -> None:
    message = error_of({}, ["max_steps=5", "training.lr=1e-3", "device=cpu"])
    assert "max_steps: unknown key. Did you mean 'training.max_steps'?" in message
    assert "training.lr: unknown key. Did you mean 'optim.lr'?" in message
    assert "Did you mean 'hardware.device' or 'inference.device'?" in message


def test_a_union_field_is_one_error_with_its_value_and_every_choice() -> None:
    # pydantic reports each member: "training.resume.bool: ... (got None)" and
    # "training.resume.literal['auto']: Input should be 'auto' (got None)".
    message = error_of({}, ["training.resume=maybe"])
    assert message == (
        "1 config error(s):\n"
        "  training.resume: unknown value (got 'maybe'); allowed: true, false, auto"
    )
    assert "did you mean 'auto'?" in error_of({}, ["training.resume=aut"])


def test_validate_finds_the_task_data_and_batching_mismatches_training_would_meet() -> None:
    # `truthgpt validate` passed these, and training refused them only once it read the data.
    message = error_of({"task": "sft"})
    assert "data.source: 'python-stdlib' has no sft rows" in message and "jsonl, hf" in message
    message = error_of({"task": "sft", "model": {"arch": "hf"}, "data": {"batching": "pack"}})
    assert "data.batching: 'pack'" in message and "model.arch llama or gpt2" in message
    message = error_of({"data": {"batching": "bucket"}})
    assert "data.batching: 'bucket' is for task: sft" in message and "auto, pack" in message
    sft = {"task": "sft", "data": {"source": "jsonl", "paths": ["rows.jsonl"]}}
    assert load({**sft, "data": {**sft["data"], "batching": "pack"}}).data.batching == "pack"


def test_a_beta_outside_zero_to_one_is_a_config_error() -> None:
    # Was accepted by `truthgpt validate`, then a traceback from torch's AdamW at the first step.
    message = error_of({}, ["optim.betas=[0.9, 1.5]"])
    assert "optim.betas" in message and "(got [0.9, 1.5])" in message
    assert "[0, 1)" in message and "e.g. [0.9, 0.95]" in message
    assert "optim.betas" in error_of({"optim": {"betas": [-0.1, 0.99]}})
    assert load({}, ["optim.betas=[0.0, 0.999]"]).optim.betas == (0.0, 0.999)


def test_lists_and_tuples_of_the_wrong_shape_show_one_that_fits() -> None:
    # Was "optim.betas.1: Field required", with neither the value nor what fits.
    message = error_of({}, ["optim.betas=[0.9]"])
    assert "optim.betas: too few values (got [0.9]); allowed: a list of 2 numbers" in message
    assert "e.g. [0.9, 0.95]" in message
    assert "optim.betas: too many values" in error_of({}, ["optim.betas=[0.9,0.9,0.9]"])
    assert "optim.betas: not a list (got 0.9)" in error_of({}, ["optim.betas=0.9"])
    message = error_of({"data": {"source": "text", "paths": "notes.txt"}})
    assert "data.paths: not a list (got 'notes.txt'); allowed: a list, e.g. ['notes.txt']" in (
        message
    )


def test_a_value_where_a_section_goes_lists_its_keys() -> None:
    # Was "Input should be a valid dictionary or instance of LoraConfig (got True)".
    message = error_of({}, ["model.lora=true"])
    assert "model.lora: is a section of keys, not a value (got True, did you mean " in message
    assert "'model.lora.enabled'?); allowed: enabled, r, alpha" in message
    assert "LoraConfig" not in message
    assert "training: is a section of keys, not a value (got 5)" in error_of({"training": 5})


def test_every_error_is_reported_at_once() -> None:
    message = error_of({"training": {"max_steps": 0, "batch_size": "x"}, "seed": "s"})
    assert message.startswith("3 config error(s)")


def test_cross_field_check() -> None:
    message = error_of({"model": {"hidden_size": 100, "num_heads": 3}})
    assert "model" in message and "not divisible" in message


def test_overrides_are_typed() -> None:
    config = load(
        {"training": {"max_steps": 5}},
        [
            "training.max_steps=50",
            "optim.lr=1e-3",
            "optim.betas=[0.8, 0.9]",
            "logging.tensorboard=false",
            "model.num_kv_heads=2",
            "run_name=abc",
        ],
    )
    assert config.training.max_steps == 50
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.optim.betas == (0.8, 0.9)
    assert config.logging.tensorboard is False
    assert config.model.num_kv_heads == 2
    assert config.run_name == "abc"


def test_override_errors() -> None:
    assert "key.path=value" in error_of({}, ["training.max_steps"])
    assert "training.max_stepz" in error_of({}, ["training.max_stepz=3"])
    assert "is a value, not a section" in error_of({"seed": 1}, ["seed.x=3"])
    assert "seed" in error_of({}, ["seed.x=3"])
    assert parse_override("a.b= hello ") == (["a", "b"], "hello")


def test_config_is_frozen() -> None:
    config = load({})
    with pytest.raises(ValidationError, match="frozen"):
        config.training.max_steps = 3  # type: ignore[misc]


def test_yaml_file_and_run_folder_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_name": "x", "training": {"max_steps": 7}}))
    config = load(path)
    folder = tmp_path / "runfolder"
    folder.mkdir()
    (folder / "config.yaml").write_text(config.to_yaml())
    assert load(folder) == config


def test_bad_files(tmp_path: Path) -> None:
    assert "does not exist" in error_of_path(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    assert "not valid YAML" in error_of_path(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "mapping" in error_of_path(listy)


def test_empty_file_is_an_error_not_a_default_run(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "\n\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        message = error_of_path(empty)
        assert str(empty) in message and "empty" in message
        assert "quickstart.yaml" in message and "digits-diffusion.yaml" in message


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("training:\n  max_steps: 5\n  batch_size: 2\n  max_steps: 7\n")
    message = error_of_path(twice)
    assert "'max_steps' is given twice" in message and "lines 2 and 4" in message
    merged = tmp_path / "merged.yaml"  # a YAML merge key may be overridden: that is its point
    merged.write_text("training:\n  <<: {max_steps: 5, batch_size: 2}\n  max_steps: 7\n")
    assert load(merged).training.max_steps == 7
    same_key_elsewhere = tmp_path / "fine.yaml"  # the same name in two mappings is no repeat
    same_key_elsewhere.write_text("training:\n  max_steps: 5\noptim:\n  lr: 0.001\n")
    assert load(same_key_elsewhere).training.max_steps == 5


def test_diffusion_scheduler_name_is_checked_early() -> None:
    message = error_of({"diffusion": {"scheduler": "euler-a"}})
    assert "diffusion.scheduler" in message and "'euler-a'" in message
    assert "did you mean 'euler_a'" in message and "dpm++_2m_karras" in message
    assert load({"diffusion": {"scheduler": "unipc"}}).diffusion.scheduler == "unipc"


def test_image_size_is_checked_against_the_model_not_the_config() -> None:
    # Only a latent model's autoencoder needs multiples of 8 (tests/test_diffusion.py checks
    # that on the loaded model); a pixel-space model draws any size.
    assert load({"diffusion": {"width": 17, "height": 768}}).diffusion.width == 17
    assert "diffusion.width" in error_of({"diffusion": {"width": 4}})  # still >= 8


def test_registry_builtins_match_the_registered_builders() -> None:
    # The static lists let config.py check names without importing torch; they must name
    # exactly what each built-in module registers.
    for registry in (SOURCES, IMAGE_SOURCES, ARCHS, OPTIMIZERS, SCHEDULES, CALLBACKS):
        registry.load()
        own = {n for n, b in registry.items() if b.__module__ == registry.builtin_module}
        assert own == set(registry.builtins), registry.kind


def test_validate_imports_no_torch() -> None:
    # `truthgpt validate` must answer in about a second: no torch, transformers or diffusers.
    code = (
        "import sys\n"
        "from truthgpt.cli import app\n"
        "app(['validate', 'configs/quickstart.yaml', '--set', 'diffusion.scheduler=ddim',"
        " '--set', 'logging.callbacks=[jsonl]'], standalone_mode=False)\n"
        # ... and its look at the paths a config names reads no file with them.
        "app(['validate', 'configs/quickstart.yaml', '--set', 'data.source=text',"
        " '--set', 'data.paths=[README.md]'], standalone_mode=False)\n"
        "from truthgpt.config import load\n"
        "from truthgpt.errors import ConfigError\n"
        "try:\n"
        "    load({'optim': {'name': 'adamm'}, 'model': {'arch': 'lama'}})\n"
        "except ConfigError as exc:\n"
        "    assert \"did you mean 'adamw'\" in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no ConfigError')\n"
        "heavy = sorted({'torch', 'transformers', 'diffusers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def error_of_path(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


def test_shipped_configs_validate() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load(path)


def test_describe_fields_covers_every_leaf() -> None:
    keys = {row[0] for row in describe_fields()}
    assert {"training.max_steps", "data.tokenizer.vocab_size", "optim.lr", "run_name"} <= keys


def test_readme_documents_every_key_and_ci_runs_its_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    for key, _, _ in describe_fields():
        assert f"`{key}`" in readme, f"README config table lacks {key}"
    # The reference table says each key's default and meaning as the schema does (they had
    # drifted: rows no field had, a default unquoted, meanings left empty).
    table = readme.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    expected = [
        f"| `{key}` | `{default}` | {meaning.replace('|', chr(92) + '|')} |"
        for key, default, meaning in describe_fields()
    ]
    assert rows == expected
    assert all(meaning for _, _, meaning in describe_fields()), "a key without a meaning"
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert command.strip() in readme


def test_a_section_check_names_the_field_not_the_section() -> None:
    # The model section's own check (heads divide the width) is about one field: its key and
    # value, what is allowed, and not the whole section's dict.
    message = error_of({"model": {"hidden_size": 30, "num_heads": 4, "num_layers": 2}})
    assert "model.hidden_size: not divisible by num_heads (4) (got 30)" in message
    assert "allowed: multiples of 4" in message
    assert "num_layers" not in message and "{" not in message
    message = error_of({"model": {"num_heads": 4, "num_kv_heads": 3}})
    assert "model.num_heads: not divisible by num_kv_heads (3) (got 4)" in message


def test_a_number_out_of_range_or_of_the_wrong_type_says_what_is_allowed() -> None:
    message = error_of({"model": {"hidden_size": "wide"}})
    assert "model.hidden_size" in message and "'wide'" in message
    assert "allowed: an integer >= 8" in message
    assert "allowed: a number in (0, 1]" in error_of({"inference": {"top_p": 0}})
    assert "allowed: an integer >= -1, or empty" in error_of({"inference": {"top_k": "all"}})


def test_errors_name_the_flag_that_set_a_key() -> None:
    flags = {"inference.top_p": "--top-p"}
    message = error_of_flags({}, ["inference.top_p=0"], flags)
    assert "--top-p: " in message and "(got 0)" in message and "(0, 1]" in message
    assert "inference.top_p" not in message
    # A key the flags did not set keeps its key path.
    message = error_of_flags({}, ["inference.top_p=0.5", "inference.temperature=-1"], flags)
    assert "inference.temperature: " in message and "--top-p" not in message


def error_of_flags(raw: dict, overrides: list[str], flags: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(raw, overrides, flags)
    return str(info.value)


def test_top_k_0_and_minus_1_mean_off_as_in_the_sampler() -> None:
    for off in (0, -1, None):
        assert load({"inference": {"top_k": off}}).inference.top_k == off
    assert "inference.top_k" in error_of({"inference": {"top_k": -2}})


def test_generate_and_serve_of_a_run_leave_its_training_threads_behind(tmp_path: Path) -> None:
    from truthgpt.config import load_for_model

    # Trained with one thread beside other jobs; the run's config says so.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"hardware": {"threads": 1}, "inference": {"temperature": 0.3}})
    )
    used = load_for_model(run, None)
    assert used.hardware.threads is None  # every core the job may use, as any other command
    assert used.inference.temperature == 0.3  # the rest of the run's config still counts
    assert load_for_model(run, None, ["hardware.threads=2"]).hardware.threads == 2
    # A config given on purpose (--config) is taken whole, the run folder's as any other.
    assert load_for_model(run, run / "config.yaml").hardware.threads == 1
    assert load_for_model(tmp_path / "hf-folder", None).hardware.threads is None


def test_a_checkpoint_folder_brings_the_config_it_was_trained_with(tmp_path: Path) -> None:
    from truthgpt.config import RUN_CONFIG, load_for_model

    # runs/x/checkpoints/best: generate and serve of it sample as of its run folder.
    checkpoint = tmp_path / "checkpoints" / "best"
    checkpoint.mkdir(parents=True)
    (checkpoint / RUN_CONFIG).write_text(
        yaml.safe_dump({"hardware": {"threads": 1}, "inference": {"top_p": 0.5}})
    )
    used = load_for_model(checkpoint, None, ["inference.temperature=0.2"])
    assert used.inference.top_p == 0.5 and used.inference.temperature == 0.2
    assert used.hardware.threads is None

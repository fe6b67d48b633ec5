"""What a model folder holds for the tools around it: checkpoints and exports name their eos in
config.json and generation_config.json, so transformers' `generate` stops where ours does; a
folder without tokenizer files, FSDP shards or a diffusion pipeline is refused by name by
generate, serve and export, not later by an empty tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models

import truthgpt
from truthgpt.config import load
from truthgpt.errors import CheckpointError
from truthgpt.inference.llm import load_tokenizer
from truthgpt.manifest import write_manifest
from truthgpt.models.build import load_model, save_model
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.export import export_hf, write_generation_defaults
from truthgpt.serving.server import build_state, default_model_id

VOCAB = 64


def tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return Decoder(config).eval()


def write_tokenizer(folder: Path, eos: int) -> transformers.PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"t{eos}")
    tokenizer.save_pretrained(folder)
    return tokenizer


def greedy(model: torch.nn.Module, prompt: list[int], new: int, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()


def test_an_export_stops_at_its_eos_in_transformers(tmp_path: Path) -> None:
    """The tokenizer's eos is a token this model emits greedily on the way: transformers
    stops there with the export's own settings, where it ran to max_new_tokens before."""
    model = tiny_decoder()
    checkpoint = tmp_path / "checkpoint"
    save_model(model, checkpoint)
    prompt = [1, 2, 3]
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    free_run = greedy(hf, prompt, 12, eos_token_id=None)
    eos = free_run[3]
    first = free_run.index(eos)  # it may come earlier than the fourth token
    write_tokenizer(checkpoint, eos)

    out = export_hf(checkpoint, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert greedy(exported, prompt, 12) == free_run[: first + 1]


def test_generation_defaults_keep_what_a_folder_already_names(tmp_path: Path) -> None:
    save_model(tiny_decoder(), tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["bos_token_id"] = 7
    config_path.write_text(json.dumps(config))
    transformers.GenerationConfig(eos_token_id=9).save_pretrained(tmp_path)
    write_generation_defaults(tmp_path, write_tokenizer(tmp_path, eos=5))
    config = json.loads(config_path.read_text())
    assert config["bos_token_id"] == 7 and config["eos_token_id"] == 5
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == 9


def test_a_training_checkpoint_names_its_eos(tmp_path: Path) -> None:
    from conftest import tiny_raw_config

    from truthgpt import train

    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 2, "eval_every": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    result = train(load(raw))
    best = result.run_dir / "checkpoints" / "last"
    eos = transformers.AutoTokenizer.from_pretrained(best).eos_token_id
    assert eos is not None
    assert json.loads((best / "config.json").read_text())["eos_token_id"] == eos
    assert transformers.GenerationConfig.from_pretrained(best).eos_token_id == eos
    load_model(best)  # the manifest covers generation_config.json: the folder still verifies


def test_a_model_folder_without_tokenizer_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_only = tmp_path / "model"
    save_model(tiny_decoder(), model_only)
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        load_tokenizer(model_only)
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        build_state(str(model_only), load({}))
    export_hf(model_only, tmp_path / "export")  # exported as it is, with a note that says so
    assert "has no tokenizer files; the export holds the model alone" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["shards", "pipeline", "diffusion-lora"])
def test_serve_says_what_a_folder_holds_instead_of_blaming_its_tokenizer(
    tmp_path: Path, kind: str
) -> None:
    """A run whose checkpoint is FSDP shards, a diffusion pipeline or a diffusion LoRA adapter,
    with no tokenizer files beside the weights: serve, generate, export and load_model name
    what the folder is (a LoRA image run's said "no config.json; is it a model folder?")."""
    run = tmp_path / "run"
    best = run / "checkpoints" / "best"
    best.mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: run\n")
    if kind == "shards":
        save_model(tiny_decoder(), best)
        (best / "sharded").mkdir()
        (best / "sharded" / "__0_0.distcp").write_bytes(b"0")
        expected = "holds FSDP shards"
    elif kind == "pipeline":
        (best / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        (best / "unet").mkdir()
        expected = "holds a diffusion pipeline"
    else:  # what a LoRA run of task image-generation saves: the adapter alone
        (best / "pytorch_lora_weights.safetensors").write_bytes(b"0")
        expected = "holds a diffusion LoRA adapter .* `truthgpt image RUN`"
    write_manifest(best)
    with pytest.raises(CheckpointError, match=expected):
        build_state(str(run), load({}))
    with pytest.raises(CheckpointError, match=expected):
        load_model(best)
    if kind != "shards":  # export merges shards (tests/test_distributed.py)
        with pytest.raises(CheckpointError, match=expected):
            export_hf(run, tmp_path / "export")
    with pytest.raises(CheckpointError, match=expected):
        truthgpt.LLM(str(run))


def test_a_checkpoint_is_served_under_its_run_name(tmp_path: Path) -> None:
    assert default_model_id(str(tmp_path / "runs" / "quick")) == "quick"
    assert default_model_id(str(tmp_path / "runs/quick/checkpoints/best")) == "quick/best"
    assert default_model_id(str(tmp_path / "exported")) == "exported"


def test_a_file_given_for_a_model_folder_is_named_as_a_file(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"  # the training config, typed where the run folder goes
    config.write_text("run_name: x\n")
    for open_it in (truthgpt.load_model, lambda path: build_state(str(path), load(None))):
        with pytest.raises(CheckpointError, match=r"run\.yaml is a file; expected a run folder"):
            open_it(config)

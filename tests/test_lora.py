"""LoRA through peft on the native decoder (llama, gpt2) and on transformers models: only the
adapters train, checkpoints round-trip, and exported folders give our logits in transformers,
merged or as a peft adapter with HF module names."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_raw_config
from peft import PeftModel
from tokenizers import Tokenizer, models
from torch import nn

from truthgpt.config import LoraConfig, OptimConfig, load
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.models.build import load_model, save_model
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.export import export_hf
from truthgpt.models.lora import apply_lora, check_native_targets, trainable_parameters
from truthgpt.training.optim import build_optimizer
from truthgpt.training.run import train

VOCAB = 64
KINDS = ["llama", "gpt2", "hf-gpt_neox", "hf-llama"]
LORA = LoraConfig(enabled=True, r=4, alpha=8.0)


def base_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention: q, k and v slices of different sizes
        cfg = DecoderConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        return Decoder(cfg)
    if kind == "gpt2":
        cfg = DecoderConfig(
            family="gpt2",
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        return Decoder(cfg)
    model_type = kind.removeprefix("hf-")
    extra = {"num_key_value_heads": 2} if model_type == "llama" else {}
    hf_config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        **extra,
    )
    return transformers.AutoModelForCausalLM.from_config(hf_config)


def arch(kind: str) -> str:
    return "hf" if kind.startswith("hf-") else kind


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 12), generator=generator) for _ in range(3)]


@functools.cache
def trained_lora(kind: str) -> PeftModel:
    """A LoRA model after a few AdamW steps, so every lora_B is nonzero (peft starts it at 0,
    where any export mistake in B would go unnoticed). Cached: tests only read it."""
    model = apply_lora(base_model(kind), LORA, arch(kind))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0), torch.device("cpu"))
    model.train()
    for batch in batches():
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=batch).logits


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def write_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_train(kind: str) -> None:
    untouched = {k: v.clone() for k, v in base_model(kind).state_dict().items()}
    model = trained_lora(kind)
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trainable, total = trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total // 4
    # The base weights are exactly as built; every adapter matrix moved.
    state = model.get_base_model().state_dict()
    for name, tensor in untouched.items():
        wrapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(name, state.get(wrapped)), tensor), name
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            assert param.abs().sum() > 0, name


def test_default_targets_cover_every_projection() -> None:
    llama = apply_lora(base_model("llama"), LORA, "llama")
    adapted = {n.split(".lora_A")[0] for n in trainable_names(llama) if ".lora_A." in n}
    layer0 = {n.removeprefix("base_model.model.layers.0.") for n in adapted if ".layers.0." in n}
    assert layer0 == {"attn.qkv", "attn.out", "mlp.gate", "mlp.up", "mlp.down"}
    gpt2 = apply_lora(base_model("gpt2"), LORA, "gpt2")
    assert sum(".lora_A." in n for n in trainable_names(gpt2)) == 2 * 4  # qkv, out, up, down


def test_unknown_target_module_is_a_config_error() -> None:
    bad = LoraConfig(enabled=True, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="model.lora.target_modules.*attn.qkv") as error:
        apply_lora(base_model("llama"), bad, "llama")
    # A config written for the transformers model is told our names, and why q alone cannot be.
    assert "'q_proj' is transformers' name; ours is attn.qkv" in str(error.value)
    assert "adapting it adapts all three" in str(error.value)


@pytest.mark.parametrize(
    ("kind", "good", "typo"), [("hf-llama", "q_proj", "v_prj"), ("llama", "attn.qkv", "attn.ot")]
)
def test_one_misspelt_target_beside_a_good_one_is_a_config_error(
    kind: str, good: str, typo: str
) -> None:
    # peft refuses a list only when no name matches: [q_proj, v_prj] adapted q_proj alone.
    bad = LoraConfig(enabled=True, target_modules=[good, typo])
    with pytest.raises(ConfigError, match=f"model.lora.target_modules: '{typo}' names no module"):
        apply_lora(base_model(kind), bad, kind)
    wrapped = apply_lora(base_model(kind), LoraConfig(enabled=True, target_modules=[good]), kind)
    assert any(".lora_A." in name for name in trainable_names(wrapped))


def test_a_native_targets_typo_is_refused_before_the_data_is_read(tmp_path: Path) -> None:
    # The data (a tokenizer to train, a corpus to encode: minutes on a large one) came first.
    raw = tiny_raw_config(tmp_path, model={"lora": {"enabled": True, "target_modules": ["qkv"]}})
    raw["model"]["lora"]["target_modules"] = ["attn.qkv", "mlp.gate_proj"]
    config = load(raw)
    with pytest.raises(ConfigError, match="'mlp.gate_proj' names no module.*did you mean"):
        train(config)
    assert not config.run_dir.exists()  # no folder made, no tokenizer trained
    # gpt2 has no gate: transformers' gate_proj is not told it is mlp.gate.
    with pytest.raises(ConfigError) as error:
        check_native_targets("gpt2", LoraConfig(enabled=True, target_modules=["gate_proj"]))
    assert "ours is" not in str(error.value) and "mlp.up, mlp.down" in str(error.value)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_and_resume_order(kind: str, tmp_path: Path) -> None:
    model = trained_lora(kind)
    save_model(model, tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    batch = batches()[0]
    frozen = load_model(tmp_path)
    assert isinstance(frozen, PeftModel) and not trainable_names(frozen)
    assert torch.equal(logits(frozen, batch), logits(model, batch))
    # Resume rebuilds the model with trainable=True: the optimizer state it restores lines up
    # with the parameters only if they come in the order a fresh apply_lora gives.
    resumed = load_model(tmp_path, trainable=True)
    fresh = apply_lora(base_model(kind), LORA, arch(kind))
    assert trainable_names(resumed) == trainable_names(fresh)
    assert type(resumed.get_base_model()) is type(model.get_base_model())
    assert torch.equal(logits(resumed, batch), logits(model, batch))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_export_opens_in_transformers_with_our_logits(
    kind: str, merge: bool, tmp_path: Path
) -> None:
    model = trained_lora(kind)
    checkpoint = tmp_path / "checkpoint"
    save_model(model, checkpoint)
    write_tokenizer(checkpoint)
    out = export_hf(checkpoint, tmp_path / "export", merge_lora=merge)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (out / "adapter").is_dir() is not merge
    if not merge:
        hf = PeftModel.from_pretrained(hf, out / "adapter")
    batch = batches()[0]
    torch.testing.assert_close(logits(hf, batch), logits(model, batch), atol=1e-4, rtol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("t5") == 5


def test_export_of_a_plain_model_and_refusal_to_overwrite(tmp_path: Path) -> None:
    model = base_model("gpt2").eval()
    checkpoint = tmp_path / "checkpoint"
    save_model(model, checkpoint)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # A folder that an export did not write is never replaced, --overwrite or not.
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not empty"):
            export_hf(checkpoint, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_hf(checkpoint, out)
    export_hf(checkpoint, out, overwrite=True)
    assert not (out / "adapter").exists()
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    batch = batches()[0]
    torch.testing.assert_close(logits(hf, batch), logits(model, batch), atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="config.json"):
        export_hf(tmp_path, tmp_path / "elsewhere")


@pytest.mark.parametrize("kind", ["llama", "hf-gpt_neox"])
def test_gradient_checkpointing_still_reaches_the_adapters(kind: str) -> None:
    model = apply_lora(base_model(kind), LORA, arch(kind))
    base = model.get_base_model()
    if isinstance(base, Decoder):
        base.set_gradient_checkpointing(True)
    else:
        # Reentrant checkpointing (transformers 4.x's default), enabled after apply_lora: the
        # frozen embedding's output must still be made to require grad.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": True}
            )
    model.train()
    batch = batches()[0]
    model(input_ids=batch, labels=batch).loss.backward()
    # lora_B starts at zero, so only B has a gradient at the first step (A's is B^T times it).
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lora_on_transformers_gpt2_adapts_its_conv1d_weights_without_a_warning() -> None:
    # GPT-2's Conv1D holds its weights transposed; peft fixed fan_in_fan_out itself, warning
    # on every run. Set up front, and the adapted model still starts equal to the base one.
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB)
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    expected = base(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = apply_lora(base, LORA, "hf")
    assert wrapped.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(wrapped(ids).logits, expected)

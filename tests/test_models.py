"""The model layer against `transformers`: same weights give the same logits, loss and tokens.

Tiny real models (a few thousand parameters), fixed seeds, fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import truthgpt.config
from truthgpt.config import ModelConfig
from truthgpt.errors import CheckpointError, ConfigError, RequestError
from truthgpt.models import Decoder, DecoderConfig, KVCache, load_model, save_model
from truthgpt.models.hf_io import decoder_config_from_hf, is_native, load_hf, save_hf
from truthgpt.registry import ARCHS

VOCAB = 96
TOL = 1e-4

LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HF_LLAMA_CASES = {
    "llama-gqa-untied": dict(model_type="llama", tie_word_embeddings=False, **LLAMA_SHAPE),
    "llama-gqa-tied": dict(model_type="llama", tie_word_embeddings=True, **LLAMA_SHAPE),
    "llama-biases-llama3-rope": dict(
        model_type="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        **LLAMA_SHAPE,
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **LLAMA_SHAPE),
    "mistral": dict(model_type="mistral", sliding_window=None, **LLAMA_SHAPE),
}
GPT2_SHAPE = dict(
    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
)
HF_GPT2_CASES = {
    "gpt2-tied": dict(model_type="gpt2", **GPT2_SHAPE),
    "gpt2-untied": dict(model_type="gpt2", tie_word_embeddings=False, **GPT2_SHAPE),
}
HF_CASES = {**HF_LLAMA_CASES, **HF_GPT2_CASES}


def hf_model(config: dict) -> transformers.PreTrainedModel:
    """A tiny transformers model with every weight random (biases and norm gains too, so a
    mapping mistake there cannot hide behind zeros and ones)."""
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def batch(seq_len: int = 12, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def native(family: str, **fields) -> Decoder:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    shape.update(max_position_embeddings=64, **fields)
    return Decoder(DecoderConfig(family=family, **shape)).eval()


# ---------------------------------------------------------------------------------------------
# Same weights, same logits and loss as transformers, both directions


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_and_loss_match_transformers_both_ways(case: str, tmp_path: Path) -> None:
    reference = hf_model(HF_CASES[case])
    reference.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()

    input_ids = batch()
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    with torch.no_grad():
        expected = reference(input_ids, labels=labels)
        got = ours(input_ids, labels)
    assert max_diff(got.logits, expected.logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL

    save_hf(ours, tmp_path / "ours")
    reopened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reopened) is type(reference) or case == "mistral"  # mistral is saved as llama
    with torch.no_grad():
        assert max_diff(reopened(input_ids).logits, got.logits) < TOL


def test_native_model_opens_in_transformers(tmp_path: Path) -> None:
    for family in ("llama", "gpt2"):
        ours = native(family, num_kv_heads=2 if family == "llama" else None, tie_embeddings=False)
        save_hf(ours, tmp_path / family, extra_config={"eos_token_id": 3})
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        assert reference.config.eos_token_id == 3
        input_ids = batch()
        with torch.no_grad():
            assert max_diff(reference(input_ids).logits, ours(input_ids).logits) < TOL
        assert ours.num_params() == sum(p.numel() for p in reference.parameters())


# ---------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_matches_full_forward(family: str) -> None:
    ours = native(family, num_kv_heads=2 if family == "llama" else None)
    input_ids = batch(seq_len=14)
    with torch.no_grad():
        full = ours(input_ids).logits
        cache = ours.new_cache(batch_size=2, max_len=20)
        kv_heads = ours.config.num_kv_heads
        assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, kv_heads, 20, 8)
        steps = [ours(input_ids[:, :5], cache=cache).logits]  # prefill
        for pos in range(5, 9):  # single-token decode
            steps.append(ours(input_ids[:, pos : pos + 1], cache=cache, start_pos=pos).logits)
        steps.append(ours(input_ids[:, 9:14], cache=cache, start_pos=9).logits)  # chunk mid-way
    assert max_diff(torch.cat(steps, dim=1), full) < TOL


def test_cache_bounds_are_checked() -> None:
    ours = native("gpt2")
    cache = ours.new_cache(batch_size=1, max_len=8)
    with pytest.raises(RequestError, match="do not fit the KV cache"):
        ours(batch(seq_len=4, batch_size=1), cache=cache, start_pos=6)
    with pytest.raises(RequestError, match="max_position_embeddings"):
        ours(batch(seq_len=65, batch_size=1))
    with pytest.raises(RequestError, match="max_position_embeddings"):
        ours.new_cache(batch_size=1, max_len=65)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2-tied"])
def test_greedy_tokens_match_transformers_generate(case: str, tmp_path: Path) -> None:
    reference = hf_model(HF_CASES[case])
    reference.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    prompt, new_tokens = batch(seq_len=6), 10
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    # An explicit mask: generate would otherwise take prompt tokens equal to pad_token_id for
    # padding.
    expected = reference.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens
    )

    with torch.no_grad():
        cache = ours.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
        tokens = prompt
        logits = ours(prompt, cache=cache).logits
        for _ in range(new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            start_pos = tokens.shape[1]
            tokens = torch.cat([tokens, next_token], dim=1)
            logits = ours(next_token, cache=cache, start_pos=start_pos).logits
    assert torch.equal(tokens, expected)


# ---------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    for family, tie in (("llama", True), ("llama", False), ("gpt2", True)):
        ours = native(family, tie_embeddings=tie, dropout=0.1)
        folder = tmp_path / f"{family}-{tie}"
        save_model(ours, folder)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        loaded = load_model(folder)
        assert isinstance(loaded, Decoder) and loaded.config == ours.config
        assert (loaded.lm_head.weight is loaded.embed.weight) == tie
        input_ids = batch()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids).logits, ours(input_ids).logits)


def test_load_bf16_and_sharded(tmp_path: Path) -> None:
    ours = native("llama", tie_embeddings=False)
    save_hf(ours, tmp_path)
    # Re-write the single file as two shards with an index, as save_pretrained does for big models.
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, tmp_path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index_file = tmp_path / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    loaded = load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    input_ids = batch()
    with torch.no_grad():
        assert max_diff(loaded(input_ids).logits, ours(input_ids).logits) < 0.1


def test_load_names_missing_and_unexpected_weights(tmp_path: Path) -> None:
    save_hf(native("llama"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.self_attn.k_proj.weight")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as raised:
        load_hf(tmp_path)
    assert "missing weights: model.layers.1.self_attn.k_proj.weight" in str(raised.value)
    assert "unexpected weights: model.layers.0.self_attn.extra.weight" in str(raised.value)


def test_load_bare_gpt2_names_and_mask_buffers(tmp_path: Path) -> None:
    # The original "gpt2" on the hub was saved from GPT2Model: no "transformer." prefix, and
    # with causal-mask buffers among the weights.
    ours = native("gpt2")
    save_hf(ours, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights = {name.removeprefix("transformer."): t for name, t in weights.items()}
    weights["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    input_ids = batch()
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path)(input_ids).logits, ours(input_ids).logits)


def test_missing_folder_and_config_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_hf_configs_are_refused() -> None:
    llama = dict(model_type="llama", **LLAMA_SHAPE)
    assert is_native(llama)
    refused = {
        "gpt_neox": dict(model_type="gpt_neox"),
        "yarn": {**llama, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
        "sliding-window": {**llama, "model_type": "mistral", "sliding_window": 16},
        "gelu": {**llama, "hidden_act": "gelu"},
    }
    for what, config in refused.items():
        assert not is_native(config), what
        with pytest.raises(CheckpointError, match="arch: hf"):
            decoder_config_from_hf(config)
    # transformers 4.x spelling: rope_theta at the top, rope_scaling for the scaled variants.
    legacy = {**llama, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = decoder_config_from_hf(legacy)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# ---------------------------------------------------------------------------------------------
# Builders behind model.arch


def model_config(section: dict) -> ModelConfig:
    return truthgpt.config.load({"model": section}).model


def test_arch_builders_build_from_model_config() -> None:
    section = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=False)
    llama = ARCHS.get_builder("llama")(model_config({"arch": "llama", **section}), 200)
    assert isinstance(llama, Decoder)
    assert llama.config.vocab_size == 256  # rounded up to a multiple of 64
    assert llama.config.intermediate_size == 192  # 8/3 * 64 = 170.7 -> 192
    assert llama.config.num_kv_heads == 2

    gpt2 = ARCHS.get_builder("gpt2")(model_config({"arch": "gpt2", "vocab_size": 100}), 90)
    assert gpt2.config.vocab_size == 100 and gpt2.config.intermediate_size == 4 * 256

    input_ids = batch()
    out = llama(input_ids, input_ids)
    out.loss.backward()
    assert out.logits.shape == (2, 12, 256) and llama.embed.weight.grad is not None
    n = llama.num_params(exclude_embeddings=True)  # includes the untied head
    assert llama.flops_per_token(128) == 6 * n + 12 * 2 * 4 * 16 * 128


def test_native_arch_from_init_from(tmp_path: Path) -> None:
    reference = hf_model(HF_CASES["gpt2-tied"])
    reference.save_pretrained(tmp_path)
    built = ARCHS["gpt2"](model_config({"arch": "gpt2", "init_from": str(tmp_path)}), VOCAB)
    assert built.config.dropout == 0.0  # the section's dropout, not the checkpoint's 0.1
    input_ids = batch()
    with torch.no_grad():
        assert max_diff(built.eval()(input_ids).logits, reference(input_ids).logits) < TOL
    with pytest.raises(ConfigError, match="set model.arch: gpt2"):
        ARCHS["llama"](model_config({"arch": "llama", "init_from": str(tmp_path)}), VOCAB)
    with pytest.raises(ConfigError, match="tokenizer"):
        ARCHS["gpt2"](model_config({"arch": "gpt2", "init_from": str(tmp_path)}), VOCAB + 1)


@pytest.mark.parametrize(
    "hf_config",
    [
        dict(
            model_type="gpt_neox",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        dict(
            model_type="opt",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
        ),
    ],
)
def test_hf_arch_builds_any_causal_lm(hf_config: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ARCHS["hf"](model_config({"arch": "hf", "hf_config": hf_config}), 100)
    assert model.config.vocab_size == 128
    input_ids = batch()
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)

    save_model(model, tmp_path)
    assert not is_native(tmp_path)
    reopened = load_model(tmp_path).eval()
    rebuilt = ARCHS["hf"](model_config({"arch": "hf", "init_from": str(tmp_path)}), 100).eval()
    with torch.no_grad():
        expected = model.eval()(input_ids).logits
        assert torch.equal(reopened(input_ids).logits, expected)
        assert torch.equal(rebuilt(input_ids).logits, expected)


def test_hf_arch_needs_a_source() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        ARCHS["hf"](model_config({"arch": "hf"}), 100)
    with pytest.raises(ConfigError, match="model.hf_config"):
        ARCHS["hf"](model_config({"arch": "hf", "hf_config": {"model_type": "no_such"}}), 100)
    # A type alone would build its full default size (a 20B gpt_neox): the shape must be given.
    shapeless = {"arch": "hf", "hidden_size": 32, "hf_config": {"model_type": "gpt_neox"}}
    with pytest.raises(ConfigError, match="gives no shape"):
        ARCHS["hf"](model_config(shapeless), 100)


# ---------------------------------------------------------------------------------------------
# Packed documents, padding masks, gradient checkpointing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_documents_give_the_logits_of_each_document_alone(family: str) -> None:
    ours = native(family, num_kv_heads=2 if family == "llama" else None)
    doc_a, doc_b = batch(seq_len=5, batch_size=1, seed=2), batch(seq_len=7, batch_size=1, seed=3)
    pad = torch.zeros(1, 4, dtype=torch.long)
    packed = torch.cat([doc_a, doc_b, pad], dim=1)
    # Ids need only differ between neighbours; padding is a document of its own.
    document_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    with torch.no_grad():
        got = ours(packed, document_ids=document_ids).logits
        alone_a, alone_b = ours(doc_a).logits, ours(doc_b).logits
        plain = ours(packed).logits
    assert max_diff(got[:, :5], alone_a) < 1e-5
    assert max_diff(got[:, 5:12], alone_b) < 1e-5
    assert max_diff(plain[:, 5:12], alone_b) > 1e-3  # without the ids, B would see A

    # Rows of a batch keep their own boundaries; the loss is the same as well.
    rows = torch.cat([packed, torch.cat([doc_b, doc_a, pad], dim=1)])
    ids = torch.cat([document_ids, torch.tensor([[5] * 7 + [3] * 5 + [9] * 4])])
    with torch.no_grad():
        both = ours(rows, rows, document_ids=ids)
    assert max_diff(both.logits[1, :7], alone_b[0]) < 1e-5
    assert max_diff(both.logits[1, 7:12], alone_a[0]) < 1e-5
    assert torch.isfinite(both.loss)


def test_document_ids_are_checked() -> None:
    ours = native("llama")
    input_ids = batch(seq_len=6)
    with pytest.raises(RequestError, match="shape of input_ids"):
        ours(input_ids, document_ids=torch.zeros(2, 5, dtype=torch.long))
    cache = ours.new_cache(batch_size=2, max_len=8)
    with pytest.raises(RequestError, match="KV cache"):
        ours(input_ids, cache=cache, document_ids=torch.zeros_like(input_ids))
    with pytest.raises(RequestError, match="attention_mask"):
        ours(input_ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


def left_padded(lengths: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = batch(seq_len=seq_len, batch_size=len(lengths), seed=4)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        mask[row, seq_len - length :] = 1
        input_ids[row, : seq_len - length] = 0
    return input_ids, mask


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2-tied"])
def test_left_padding_with_attention_mask_matches_transformers(case: str, tmp_path: Path) -> None:
    reference = hf_model(HF_CASES[case])
    reference.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    input_ids, mask = left_padded([9, 5], seq_len=9)
    # transformers' forward takes positions as given; generate derives them from the mask.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(input_ids, attention_mask=mask).logits
        alone = ours(input_ids[1:, 4:]).logits
    real = mask.bool()
    assert max_diff(got[real], expected[real]) < TOL
    assert max_diff(got[1, 4:], alone[0]) < 1e-5
    assert torch.isfinite(got).all()  # pad rows too: no all-masked attention row

    # Batched greedy decoding of left-padded prompts, the cache holding the pads.
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    new_tokens = 6
    expected_tokens = reference.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens
    )
    with torch.no_grad():
        cache = ours.new_cache(2, input_ids.shape[1] + new_tokens)
        tokens = input_ids
        logits = ours(input_ids, cache=cache, attention_mask=mask).logits
        for _ in range(new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            start_pos = tokens.shape[1]
            tokens = torch.cat([tokens, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            logits = ours(next_token, cache=cache, start_pos=start_pos, attention_mask=mask).logits
    assert torch.equal(tokens, expected_tokens)


def loss_and_grads(model: Decoder, input_ids: torch.Tensor, **kwargs) -> tuple:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs
    loss = model(input_ids, input_ids, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    family: str, dropout: float
) -> None:
    ours = native(family, dropout=dropout).train()
    assert ours.gradient_checkpointing is False
    input_ids = batch(seq_len=10)
    document_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    calls: list[int] = []
    ours.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
    plain_loss, plain_grads = loss_and_grads(ours, input_ids, document_ids=document_ids)
    assert len(calls) == 1
    ours.set_gradient_checkpointing(True)
    loss, grads = loss_and_grads(ours, input_ids, document_ids=document_ids)
    assert len(calls) == 3  # forward, then once more in backward: it was recomputed
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6), name
    with torch.no_grad():  # no recomputation without training, and no error either
        ours.eval()(input_ids)

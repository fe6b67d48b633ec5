"""Hugging Face checkpoints in and out of the native decoder, through explicit weight maps.

Supported `transformers` shapes: LlamaForCausalLM, MistralForCausalLM (no sliding window),
Qwen2ForCausalLM (no sliding window) and GPT2LMHeadModel. A folder holds `config.json` and
`model.safetensors` (or shards listed in `model.safetensors.index.json`), exactly what
`save_pretrained` writes, so either side opens what the other saved.

The maps below name, per layer, which HF tensor(s) make each of our tensors:
- llama: q/k/v projections are concatenated into our fused `attn.qkv` (rows q, k, v).
- gpt2: HF's `Conv1D` stores weights as [in, out], the transpose of `nn.Linear`; its `c_attn`
  is already fused q, k, v in our row order. `attn.bias` / `attn.masked_bias` are causal-mask
  buffers that old checkpoints carry, not weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.models.decoder import Decoder, DecoderConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

LLAMA_TYPES = ("llama", "mistral", "qwen2")
NATIVE_TYPES = (*LLAMA_TYPES, "gpt2")

# Our name -> HF name (a tuple: concatenated along dim 0), per layer and for the whole model.
LLAMA_LAYER_MAP: dict[str, str | tuple[str, ...]] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.down.bias": "mlp.down_proj.bias",
}
LLAMA_MODEL_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_LAYER_PREFIX = "model.layers.{}."

GPT2_LAYER_MAP: dict[str, str | tuple[str, ...]] = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.out.weight": "attn.c_proj.weight",
    "attn.out.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight",
    "mlp_norm.bias": "ln_2.bias",
    "mlp.up.weight": "mlp.c_fc.weight",
    "mlp.up.bias": "mlp.c_fc.bias",
    "mlp.down.weight": "mlp.c_proj.weight",
    "mlp.down.bias": "mlp.c_proj.bias",
}
GPT2_MODEL_MAP = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
GPT2_LAYER_PREFIX = "transformer.h.{}."
# Conv1D weights ([in, out]) are transposed relative to nn.Linear.
GPT2_TRANSPOSED = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)

# Buffers that some checkpoints carry and that are not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation


# ---------------------------------------------------------------------------------------------
# Configs


def decoder_config_from_hf(hf_config: dict[str, Any]) -> DecoderConfig:
    """Our DecoderConfig for a transformers config.json dict; CheckpointError when some feature
    of it would not be reproduced exactly (the message says which)."""
    model_type = hf_config.get("model_type")
    if model_type in LLAMA_TYPES:
        return _llama_config_from_hf(hf_config)
    if model_type == "gpt2":
        return _gpt2_config_from_hf(hf_config)
    raise CheckpointError(
        f"model_type {model_type!r} has no native decoder (supported: {', '.join(NATIVE_TYPES)}); "
        "use model.arch: hf to run it through transformers"
    )


def _unsupported(model_type: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{model_type} checkpoint uses {what}, which the native decoder does not reproduce; "
        "use model.arch: hf to run it through transformers"
    )


def _llama_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    model_type = hf["model_type"]
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(model_type, f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise _unsupported(model_type, f"head_dim {hf['head_dim']} != hidden_size / heads")
    max_positions = hf.get("max_position_embeddings", 2048)
    # A sliding window shorter than the context changes attention; one at least as long does
    # not. Mistral always applies its window; Qwen2 only with use_sliding_window.
    window = hf.get("sliding_window")
    uses_window = (
        model_type == "mistral"
        or bool(hf.get("use_sliding_window"))
        or "sliding_attention" in (hf.get("layer_types") or ())
    )
    if uses_window and window is not None and window < max_positions:
        raise _unsupported(model_type, f"sliding-window attention ({window} tokens)")
    # pretraining_tp only changes how HF splits its matmuls, not the result: ignored.

    rope_theta, rope_scaling = _rope_from_hf(hf, max_positions)
    if model_type == "qwen2":  # Qwen2 hard-codes q/k/v biases and an unbiased o_proj
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    return DecoderConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        # LlamaConfig's default is untied; a config.json from save_pretrained always says.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
    )


def _rope_from_hf(hf: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta` +
    `rope_scaling`."""
    model_type = hf["model_type"]
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _unsupported(model_type, f"partial rotary embeddings (factor {partial})")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    if rope_type == "llama3":
        return theta, {
            "rope_type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(
                params.get("original_max_position_embeddings", max_positions)
            ),
        }
    raise _unsupported(model_type, f"rope_type {rope_type!r} (only default, linear, llama3)")


def _gpt2_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise _unsupported("gpt2", f"activation_function {activation!r}")
    if not hf.get("scale_attn_weights", True):
        raise _unsupported("gpt2", "unscaled attention (scale_attn_weights: false)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _unsupported("gpt2", "scale_attn_by_inverse_layer_idx")
    if hf.get("add_cross_attention", False):
        raise _unsupported("gpt2", "cross-attention")
    hidden = hf["n_embd"]
    return DecoderConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=float(hf.get("resid_pdrop", 0.1)),
    )


def hf_config_from_decoder(cfg: DecoderConfig) -> dict[str, Any]:
    """A config.json dict that transformers (4.46 .. 5.x) opens as the same model.

    llama family is written as `llama`, or as `qwen2` for q/k/v biases without an o_proj bias
    (a shape LlamaConfig cannot express).
    """
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    if not (cfg.qkv_bias == cfg.out_bias or (cfg.qkv_bias and not cfg.mlp_bias)):
        raise CheckpointError(
            "no transformers model has a q/k/v bias different from the o_proj bias together "
            "with MLP biases; this decoder cannot be saved in HF format"
        )
    qwen2 = bool(cfg.qkv_bias and not cfg.out_bias)
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope_parameters = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    config: dict[str, Any] = {
        "model_type": "qwen2" if qwen2 else "llama",
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = dict(cfg.rope_scaling)
    if qwen2:
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config.update(attention_bias=bool(cfg.qkv_bias), mlp_bias=bool(cfg.mlp_bias))
    return config


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder; CheckpointError when the folder or the file is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {CONFIG_NAME}; is it a model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None


def is_native(folder_or_config: str | Path | dict[str, Any]) -> bool:
    """Whether a HF folder (or its config dict) maps onto the native decoder, every feature
    included; False sends it to transformers instead."""
    hf = folder_or_config
    if not isinstance(hf, dict):
        hf = read_hf_config(Path(hf))
    try:
        decoder_config_from_hf(hf)
    except (CheckpointError, ConfigError, KeyError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Weight maps


def _maps(cfg: DecoderConfig) -> tuple[dict[str, Any], dict[str, Any], str]:
    if cfg.family == "gpt2":
        return GPT2_MODEL_MAP, GPT2_LAYER_MAP, GPT2_LAYER_PREFIX
    return LLAMA_MODEL_MAP, LLAMA_LAYER_MAP, LLAMA_LAYER_PREFIX


def weight_map(cfg: DecoderConfig, names: list[str]) -> dict[str, str | tuple[str, ...]]:
    """Our parameter name -> HF name(s), for the given names of our state dict."""
    model_map, layer_map, layer_prefix = _maps(cfg)
    mapping: dict[str, str | tuple[str, ...]] = {}
    for name in names:
        if name in model_map:
            mapping[name] = model_map[name]
            continue
        _, index, local = name.split(".", 2)  # layers.N.rest
        hf = layer_map[local]
        prefix = layer_prefix.format(index)
        mapping[name] = tuple(prefix + h for h in hf) if isinstance(hf, tuple) else prefix + hf
    return mapping


def _is_transposed(cfg: DecoderConfig, hf_name: str) -> bool:
    return cfg.family == "gpt2" and hf_name.endswith(GPT2_TRANSPOSED)


def to_hf_state(model: Decoder) -> dict[str, Tensor]:
    """Our weights under HF names, as contiguous CPU copies that safetensors can write (views of
    one fused tensor would share memory, which it refuses). A tied head is omitted, as HF does."""
    cfg = model.config
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    out: dict[str, Tensor] = {}
    for name, hf in weight_map(cfg, list(state)).items():
        tensor = state[name].detach()
        if isinstance(hf, tuple):  # fused q, k, v rows
            q_rows = cfg.num_heads * cfg.head_dim
            kv_rows = cfg.num_kv_heads * cfg.head_dim
            parts = tensor.split((q_rows, kv_rows, kv_rows), dim=0)
            for hf_name, part in zip(hf, parts, strict=True):
                out[hf_name] = part.to("cpu", copy=True).contiguous()
        else:
            tensor = tensor.t() if _is_transposed(cfg, hf) else tensor
            out[hf] = tensor.to("cpu", copy=True).contiguous()
    return out


def from_hf_state(cfg: DecoderConfig, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF-named weights -> our state dict, strictly: CheckpointError naming every missing and
    every unexpected weight (known mask / rotary buffers are skipped)."""
    hf_state = {_canonical_name(cfg, name): t for name, t in hf_state.items()}
    with torch.device("meta"):
        names = list(Decoder(cfg).state_dict())
    if cfg.tie_embeddings:
        names.remove("lm_head.weight")
        hf_state.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    mapping = weight_map(cfg, names)
    expected = {h for hf in mapping.values() for h in (hf if isinstance(hf, tuple) else (hf,))}
    missing = sorted(expected - hf_state.keys())
    unexpected = sorted(n for n in hf_state.keys() - expected if not n.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        lines = ["checkpoint does not match the model's shape:"]
        if missing:
            lines.append(f"  missing weights: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected weights: {', '.join(unexpected)}")
        raise CheckpointError("\n".join(lines))

    state: dict[str, Tensor] = {}
    for name, hf in mapping.items():
        if isinstance(hf, tuple):
            state[name] = torch.cat([hf_state[h] for h in hf], dim=0)
        else:
            tensor = hf_state[hf]
            state[name] = tensor.t().contiguous() if _is_transposed(cfg, hf) else tensor
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _canonical_name(cfg: DecoderConfig, name: str) -> str:
    # Checkpoints saved from the bare GPT2Model / LlamaModel (the original "gpt2" on the hub is
    # one) lack the "transformer." / "model." prefix of the *ForCausalLM names.
    prefix = "transformer." if cfg.family == "gpt2" else "model."
    if name.startswith((prefix, "lm_head.")):
        return name
    return prefix + name


# ---------------------------------------------------------------------------------------------
# Folders


def save_hf(model: Decoder, folder: Path, extra_config: dict[str, Any] | None = None) -> None:
    """Write config.json and model.safetensors with HF names into `folder` (created if needed).

    extra_config is merged into config.json (e.g. bos_token_id, eos_token_id, pad_token_id).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(model)
    dtype = model.embed.weight.dtype
    config = hf_config_from_decoder(model.config)
    # "torch_dtype" is what 4.x reads; 5.x reads it too and calls it "dtype".
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.update(extra_config or {})
    # transformers refuses safetensors files without format metadata.
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_hf_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of model.safetensors, or of the shards its index file lists."""
    folder = Path(folder)
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).is_file():
        weight_files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(
            f"{str(folder)!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} "
            "(only safetensors weights are read)"
        )
    tensors: dict[str, Tensor] = {}
    for file_name in weight_files:
        path = folder / file_name
        if not path.is_file():
            raise CheckpointError(f"weight shard {str(path)!r} listed in the index is missing")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def load_hf(
    folder: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    dropout: float | None = None,
) -> Decoder:
    """A Decoder with the weights of a HF folder (config.json + safetensors).

    Returned in eval mode. dtype None keeps the checkpoint's dtype (that of its token
    embedding). dropout overrides the checkpoint's own: a training choice, not part of the shape.
    """
    folder = Path(folder)
    cfg = decoder_config_from_hf(read_hf_config(folder))
    if dropout is not None:
        cfg = replace(cfg, dropout=dropout)
    try:
        model = decoder_from_hf_state(cfg, read_hf_weights(folder, device), dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    return model.to(device)


def decoder_from_hf_state(
    cfg: DecoderConfig, hf_state: dict[str, Tensor], dtype: torch.dtype | None = None
) -> Decoder:
    """A Decoder (eval mode) holding HF-named weights, on their device; CheckpointError when
    they do not fit `cfg`. dtype None keeps the weights' dtype (that of the token embedding)."""
    state = from_hf_state(cfg, hf_state)
    dtype = dtype or state["embed.weight"].dtype
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    # Built on the meta device: no memory and no random init for weights about to be replaced.
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a shape mismatch between config.json and the weights
        raise CheckpointError(f"weights do not fit config.json: {exc}") from None
    if cfg.tie_embeddings:  # assign=True made two Parameters; tie them back into one
        model.lm_head.weight = model.embed.weight
    # eval mode, as transformers' from_pretrained returns; the trainer switches to train().
    return model.eval()

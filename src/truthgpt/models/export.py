"""Export a checkpoint as a plain Hugging Face folder that `transformers` opens on its own.

The folder holds config.json + model.safetensors (+ the tokenizer files of the checkpoint). A
LoRA checkpoint is either merged into the weights (`merge_and_unload`) or written as the base
model plus `adapter/` in peft format, under the module names of the transformers model, so that
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")` works.

Our adapters use our module names; the weight maps of hf_io.py give the HF ones. The fused
attention projection splits exactly: a LoRA on qkv adds (alpha/r) B A, and the rows of B A
belonging to q, k and v are B_q A, B_k A, B_v A, so q_proj, k_proj and v_proj each get a LoRA
with the shared A and their row slice of B. GPT-2's `c_attn` is fused in our row order already;
it is a Conv1D ([in, out] weight), for which peft keeps A and B in Linear layout and transposes
only when merging (`fan_in_fan_out`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoTokenizer

from truthgpt.atomic import publish_folder
from truthgpt.errors import CheckpointError
from truthgpt.guard import check_output, mark
from truthgpt.local_paths import TOKENIZER_PATTERNS
from truthgpt.models.build import load_model, resolve_model_folder, save_model
from truthgpt.models.decoder import Decoder
from truthgpt.models.hf_io import save_hf, weight_map
from truthgpt.models.lora import ADAPTER_DIR, is_peft_model, plain_decoder

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # peft's prefix for adapter weights in a saved state dict


def export_hf(
    source: str | Path, out_dir: str | Path, merge_lora: bool = True, overwrite: bool = False
) -> Path:
    """Write the model of `source` (a run folder, a checkpoint or a model folder) as a
    transformers folder `out_dir`.

    merge_lora: fold LoRA adapters into the weights; else keep them in `out_dir/adapter` (peft
    format, HF module names). The folder appears whole or not at all (written beside it, then
    renamed). `out_dir` must not be, hold or lie inside a run, a checkpoint or `source`;
    overwrite=True replaces only an earlier export (guard.py).
    """
    source = Path(source).expanduser()
    folder = resolve_model_folder(source)
    out_dir = check_output(out_dir, "export", overwrite, sources=[source, folder])
    model = load_model(folder)

    def fill(tmp: Path) -> None:
        write_export_model(model, tmp, merge_lora)
        if copy_tokenizer_files(folder, tmp):
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
            write_generation_defaults(tmp, tokenizer)  # transformers' generate stops at its eos
        else:
            print(
                f"note: {folder} has no tokenizer files; the export holds the model alone",
                file=sys.stderr,
                flush=True,
            )
        mark(tmp, "export")

    publish_folder(out_dir, fill)
    return out_dir


def write_export_model(model: nn.Module, folder: Path, merge_lora: bool) -> None:
    """The weights of `model` as an export holds them: LoRA merged, or base + adapter/ under
    transformers' module names."""
    if is_peft_model(model):
        if merge_lora:
            model = model.merge_and_unload()
        elif isinstance(model.get_base_model(), Decoder):
            save_hf(plain_decoder(model), folder)
            save_hf_adapter(model, folder / ADAPTER_DIR)
            return
    # A transformers model (its adapter already has HF names) or a merged / plain model.
    save_model(model, folder)


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG_NAME = "generation_config.json"


def write_generation_defaults(folder: Path, tokenizer: Any) -> None:
    """The tokenizer's bos/eos/pad ids into the model folder's config.json where it has none,
    and into generation_config.json: transformers' `generate` stops at eos only when one of
    the two names it. Ids the folder already names are kept. generation_config's eos also
    lists the token the chat template ends a turn with, where that is another (ChatML's
    <|im_end|>): transformers, vLLM and our engine stop at every id listed."""
    from transformers import GenerationConfig

    from truthgpt.data.sft import turn_end_token_id

    folder = Path(folder)
    ids = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_IDS}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for name, value in ids.items():
        if config.get(name) is None and value is not None:
            config[name] = value
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (folder / GENERATION_CONFIG_NAME).is_file():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        generation = GenerationConfig()
    for name, value in ids.items():
        if getattr(generation, name, None) is None and value is not None:
            setattr(generation, name, value)
    turn_end = turn_end_token_id(tokenizer)
    eos = generation.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if turn_end is not None and turn_end not in eos:
        generation.eos_token_id = [*eos, turn_end]
    generation.save_pretrained(folder)


def copy_tokenizer_files(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer files of `source` into `folder`; returns their names."""
    names = sorted({path.name for pattern in TOKENIZER_PATTERNS for path in source.glob(pattern)})
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    return names


def save_hf_adapter(model: PeftModel, folder: Path) -> None:
    """Write the LoRA adapter of a wrapped Decoder in peft format with transformers' module
    names (see the module docstring), for `PeftModel.from_pretrained` on the HF model."""
    state, modules = hf_adapter_state(model)
    decoder = model.get_base_model()
    lora_config = model.peft_config[model.active_adapter]
    hf_config = dataclasses.replace(
        lora_config,
        target_modules=modules,  # exact module names: no suffix can match one we did not adapt
        task_type="CAUSAL_LM",
        fan_in_fan_out=decoder.config.family == "gpt2",  # GPT-2's Conv1D layers
        base_model_name_or_path=None,
        auto_mapping=None,
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(folder))
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def hf_adapter_state(model: PeftModel) -> tuple[dict[str, Tensor], list[str]]:
    """(adapter weights under transformers' names, the HF modules they adapt) for a Decoder."""
    from peft import get_peft_model_state_dict

    decoder = model.get_base_model()
    cfg = decoder.config
    lora_config = model.peft_config[model.active_adapter]
    if lora_config.use_dora or lora_config.bias != "none" or lora_config.modules_to_save:
        raise CheckpointError(
            "only plain LoRA adapters (no DoRA, no trained biases or extra modules) can be "
            "converted to transformers' module names; export with merge_lora instead"
        )
    q_rows = cfg.num_heads * cfg.head_dim
    kv_rows = cfg.num_kv_heads * cfg.head_dim
    state: dict[str, Tensor] = {}
    modules: list[str] = []
    for key, tensor in get_peft_model_state_dict(model).items():
        # e.g. base_model.model.layers.0.attn.qkv.lora_A.weight
        module, _, kind = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise CheckpointError(f"adapter weight {key!r} has no transformers equivalent")
        try:
            hf = weight_map(cfg, [f"{module}.weight"])[f"{module}.weight"]
        except (KeyError, ValueError):
            raise CheckpointError(
                f"adapted module {module!r} has no transformers equivalent"
            ) from None
        hf_modules = [
            name.removesuffix(".weight") for name in (hf if isinstance(hf, tuple) else (hf,))
        ]
        if len(hf_modules) == 1:
            parts: tuple[Tensor, ...] = (tensor,)
        elif kind == "A.weight":  # q, k and v share the input projection A
            parts = (tensor,) * len(hf_modules)
        else:  # B's rows are [q; k; v], as the fused weight's
            parts = tensor.split((q_rows, kv_rows, kv_rows), dim=0)
        for hf_module, part in zip(hf_modules, parts, strict=True):
            # Own contiguous copies: safetensors refuses tensors that share memory.
            state[f"{_PEFT_PREFIX}{hf_module}.lora_{kind}"] = part.detach().cpu().clone()
            if hf_module not in modules:
                modules.append(hf_module)
    return state, modules

"""The model layer: the native decoder (Llama and GPT-2 families), its Hugging Face weight maps,
and the builders behind `model.arch` (`llama`, `gpt2`, `hf`).

`load_model(folder)` opens any model folder (native when the shape maps onto the Decoder, else
through transformers); `save_model(model, folder)` writes one that both sides open.
"""

from __future__ import annotations

from truthgpt.models.build import load_model, resolve_model_folder, save_model
from truthgpt.models.decoder import Decoder, DecoderConfig, DecoderOutput, KVCache

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderOutput",
    "KVCache",
    "load_model",
    "resolve_model_folder",
    "save_model",
]

"""truthgpt: train, fine-tune and sample language models from one YAML file.

import truthgpt
config = truthgpt.load_config("configs/quickstart.yaml", ["training.max_steps=50"])
result = truthgpt.train(config)
print(truthgpt.generate(result.run_dir, "def ", max_new_tokens=64))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from truthgpt.errors import CheckpointError, ConfigError, DataError, RequestError, TruthGPTError

if TYPE_CHECKING:
    from truthgpt.config import Config

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "LLM",
    "RequestError",
    "SamplingParams",
    "TruthGPTError",
    "evaluate",
    "export",
    "generate",
    "image",
    "load_config",
    "load_model",
    "train",
]


def train(config: Config | str | Path, overwrite: bool = False, resume: bool | str | None = None):
    """Train from a Config (or a YAML path); returns a TrainResult with the run folder.

    As the CLI's --overwrite and --resume: a run folder that already holds a run is refused
    unless `overwrite` (start over) or `resume` (True: continue from the newest complete
    checkpoint; "auto": continue if there is one). None: the config's `training.resume`.
    """
    from truthgpt.config import Config, load
    from truthgpt.training.run import train as run_training

    if not isinstance(config, Config):
        config = load(config)
    return run_training(config, overwrite=overwrite, resume=resume)


def load_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a run folder, a checkpoint folder or any local HF model folder.
    device: cpu, cuda, cuda:N, mps or auto."""
    from truthgpt.hardware import resolve_device
    from truthgpt.inference.llm import load_for_generation

    # Checked first: torch's own errors come from deep in the load ("pin_memory=True requires
    # a CUDA...", "cannot read the weights: device gpu is invalid").
    model, tokenizer, _ = load_for_generation(path, device=resolve_device(device, "device"))
    return model, tokenizer


def evaluate(
    model: str | Path,
    data: str | list[str] | None = None,
    split: str = "val",
    max_batches: int | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
) -> dict:
    """`truthgpt eval`: the loss (and perplexity) of a run's best (else last) checkpoint on its
    own `split` ("val" or "train") or on `data` files/globs; a model folder takes `data`.
    Returns {"loss", "ppl", "checkpoint", "split", "batches", and the count of its unit}."""
    from truthgpt.training.evaluate import evaluate_run

    if split not in ("val", "train"):
        raise ConfigError(f"split must be 'val' or 'train', got {split!r}")
    paths = [data] if isinstance(data, str | Path) else data
    if not (paths is None or isinstance(paths, list | tuple)):
        raise ConfigError(f"data must be a path, a glob or a list of them, got {data!r}")
    overrides = [overrides] if isinstance(overrides, str) else overrides
    paths = [str(path) for path in paths or []]
    return evaluate_run(model, paths, split, max_batches, device, overrides or [])


def export(
    model: str | Path, out: str | Path, merge_lora: bool = True, overwrite: bool = False
) -> Path:
    """`truthgpt export`: the model of a run or checkpoint folder (FSDP shards merged) as a
    Hugging Face folder `out`; returns it. `merge_lora=False` keeps a LoRA adapter in
    `out/adapter` for peft."""
    from truthgpt.training.sharded import export_checkpoint

    return export_checkpoint(model, out, merge_lora=merge_lora, overwrite=overwrite)


def generate(
    model: str | Path,
    prompt: str,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> str:
    """Continue `prompt` with the model in a run or model folder; returns the new text.
    max_new_tokens, temperature (0: greedy), top_k (0 or -1: off) and top_p default, as in
    `truthgpt generate`, to the run folder's `inference:` section (else the config defaults).
    threads: CPU threads for torch (None: OMP_NUM_THREADS, else the usable cores).
    For many prompts, or to keep the model loaded, use `truthgpt.LLM`."""
    import dataclasses

    from truthgpt.hardware import apply_threads
    from truthgpt.inference.llm import LLM

    if not isinstance(prompt, str):
        raise RequestError(
            f"prompt must be a string, got {type(prompt).__name__}; for token ids use "
            "truthgpt.LLM(model).generate([ids])"
        )
    apply_threads(threads)
    llm = LLM(model, device=device)
    given = dict(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    chosen = {key: value for key, value in given.items() if value is not None}
    params = dataclasses.replace(llm.default_params(), seed=seed, **chosen)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text


def __getattr__(name: str):
    # Loaded on first use, not with the package: LLM and SamplingParams import torch, and
    # Config and load_config pydantic, which `python -m truthgpt` would otherwise import
    # before its Ctrl-C handler exists (__main__.py).
    if name == "Config":
        from truthgpt.config import Config

        return Config
    if name == "load_config":
        from truthgpt.config import load

        return load
    if name == "LLM":
        from truthgpt.inference.llm import LLM

        return LLM
    if name == "SamplingParams":
        from truthgpt.inference.sampling_params import SamplingParams

        return SamplingParams
    if name == "registry":  # `@truthgpt.registry.CALLBACKS.register(...)`, as the README shows
        import importlib

        return importlib.import_module("truthgpt.registry")
    raise AttributeError(f"module 'truthgpt' has no attribute {name!r}")


def image(model: str | Path, prompt: str, **settings):
    """Draw images with a local diffusers pipeline; settings are `diffusion:` config keys
    (steps, guidance, width, height, seed, batch, scheduler, memory, loras, speed, output_dir...).
    Returns an ImageResult (images, paths, peak memory, latency)."""
    from truthgpt.config import load
    from truthgpt.diffusion.generate import generate_images
    from truthgpt.hardware import apply_threads

    config = load({"diffusion": {"model": str(model), "prompt": prompt, **settings}})
    apply_threads(config.hardware.threads)
    return generate_images(config.diffusion)

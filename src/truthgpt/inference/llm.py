"""`truthgpt.LLM`: offline batch generation on the engine, in three lines.

    llm = truthgpt.LLM("runs/quickstart", max_num_seqs=64)
    params = truthgpt.SamplingParams(temperature=0, max_tokens=32)
    outputs = llm.generate(["def ", "import "], params)
    print(outputs[0].outputs[0].text)

Models the engine does not run natively go through `transformers` `generate` (one request at
a time), with a log line that says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from truthgpt.config import InferenceConfig
from truthgpt.errors import CheckpointError, ConfigError, RequestError
from truthgpt.inference.detokenizer import end_token_ids_of
from truthgpt.inference.request import RequestOutput
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.models import load_model, resolve_model_folder
from truthgpt.models.decoder import Decoder
from truthgpt.models.export import GENERATION_CONFIG_NAME
from truthgpt.models.hf_io import (
    decoder_config_from_hf,
    decoder_from_hf_state,
    is_native,
    read_hf_config,
)

log = logging.getLogger(__name__)

Prompt = str | Seq[int]


def inference_options(
    options: InferenceConfig | dict[str, Any] | None, model: str | Path | None = None
) -> InferenceConfig:
    """Validate engine options the way the YAML `inference:` section is validated. A run
    folder `model` brings its own `inference:` section, which `options` override (as the CLI's
    flags do); any other folder starts from the defaults."""
    if isinstance(options, InferenceConfig):
        return options
    from truthgpt.config import load, load_for_model

    # JSON is YAML: each value reads back as given (a string stays a string).
    overrides = [f"inference.{key}={json.dumps(value)}" for key, value in (options or {}).items()]
    if model is None:
        return load(None, overrides).inference
    return load_for_model(model, None, overrides).inference


def inference_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    end_token_ids: tuple[int, ...]  # what ends an answer: eos, and any more the folder names


def load_for_generation(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Loaded:
    """A run, checkpoint or HF folder -> the model in eval mode (LoRA merged), its tokenizer,
    and the tokens that end an answer."""
    folder = resolve_model_folder(path)
    model = load_model(folder, device=device, dtype=dtype)
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters in, generate at full speed
        model = model.merge_and_unload()
    if not isinstance(model, Decoder):
        hf_config = read_hf_config(folder)
        if is_native(hf_config):
            # An adapter in transformers' module names (`export --no-merge-lora`, any peft
            # adapter) is merged on transformers' model; the merged weights fit our Decoder as
            # any Llama's or GPT-2's do, so the engine (and `serve`) runs them rather than
            # transformers' generate.
            model = decoder_from_hf_state(decoder_config_from_hf(hf_config), model.state_dict())
    tokenizer = load_tokenizer(folder)
    return Loaded(model.eval(), tokenizer, end_token_ids_of(tokenizer, _generation_eos(folder)))


def _generation_eos(folder: Path) -> Any:
    """eos_token_id of `folder`'s generation_config.json (None when it has none)."""
    path = folder / GENERATION_CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError, OSError):
        log.warning("%s is unreadable; answers end at the tokenizer's eos alone", path)
        return None


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model (a run's checkpoint or an HF folder). A folder
    without tokenizer files is an error: transformers would build an empty tokenizer from the
    model's config alone, and every prompt would tokenize to nothing."""
    from truthgpt.local_paths import TOKENIZER_PATTERNS, has_tokenizer_files

    if not has_tokenizer_files(folder):
        raise CheckpointError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_PATTERNS)}): save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} has no usable tokenizer: {exc}") from None
    if len(tokenizer) <= 1:
        raise CheckpointError(f"{folder}: its tokenizer files hold an empty vocabulary")
    return tokenizer


class LLM:
    """A model loaded for generation, with the engine (native models) behind `generate`."""

    def __init__(
        self,
        model: str | Path | nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        inference: InferenceConfig | None = None,
        **options: Any,
    ) -> None:
        """model: a run, checkpoint or HF folder (or a loaded module with `tokenizer`);
        options: `inference:` config keys (block_size, max_num_seqs, device, dtype, ...) over
        a run folder's own `inference:` section (else the defaults), or a whole validated
        `inference` section."""
        from truthgpt.hardware import resolve_device

        if inference is not None and options:
            raise ConfigError("give either inference= or keyword options, not both")
        if inference is None:
            inference = inference_options(options, None if isinstance(model, nn.Module) else model)
        self.options = inference
        device = resolve_device(self.options.device, "inference.device")
        dtype = inference_dtype(self.options.dtype, device)
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise ConfigError("LLM(model_object) needs tokenizer= as well")
            self.model = model.to(device=device, dtype=dtype).eval()
            self.tokenizer = tokenizer
            generation = getattr(model, "generation_config", None)
            self.end_token_ids = end_token_ids_of(
                tokenizer, getattr(generation, "eos_token_id", None)
            )
        else:
            self.model, self.tokenizer, self.end_token_ids = load_for_generation(
                model, device=device, dtype=dtype
            )
            if isinstance(self.model, Decoder):  # our own copy: its weights may be re-laid
                self.model.fuse_for_inference()
            if tokenizer is not None:
                self.tokenizer = tokenizer
                self.end_token_ids = end_token_ids_of(tokenizer)
        self.engine = None
        if isinstance(self.model, Decoder):
            from truthgpt.inference.engine import Engine

            self.engine = Engine(self.model, self.tokenizer, self.options, self.end_token_ids)
        else:
            log.warning(
                "%s is not a native truthgpt decoder: generating with transformers' generate, "
                "one request at a time (no paged KV cache or continuous batching)",
                type(self.model).__name__,
            )
        self._counter = 0

    @property
    def context_length(self) -> int | None:
        """Tokens a sequence may hold, prompt and output together."""
        if self.engine is not None:
            return self.engine.max_model_len
        from truthgpt.inference.hf_fallback import max_positions

        return max_positions(self.model)

    def default_params(self) -> SamplingParams:
        """Sampling as the `inference:` section says (the CLI's defaults too)."""
        o = self.options
        return SamplingParams(
            max_tokens=o.max_new_tokens,
            temperature=o.temperature,
            top_k=o.top_k or 0,
            top_p=o.top_p,
        )

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs in prompt order.
        Every prompt is checked before any runs, so one bad prompt costs no work."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if not prompts:
            return []
        for position, prompt in enumerate(prompts):
            if not (isinstance(prompt, str) or _token_ids(prompt)):
                raise RequestError(
                    f"prompt {position} must be a string or a list of token ids (ints), got "
                    f"{type(prompt).__name__}"
                )
        if params is None:
            params = self.default_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif isinstance(params, Seq) and all(isinstance(p, SamplingParams) for p in params):
            params = list(params)
        else:  # a dict of settings, say, whose keys would be taken for one SamplingParams each
            raise RequestError(
                "params must be a SamplingParams, or a list of them (one per prompt), got "
                f"{type(params).__name__}: truthgpt.SamplingParams(temperature=0, ...)"
            )
        if len(params) != len(prompts):
            raise RequestError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        if self.engine is None:
            return self._generate_hf(prompts, params, use_tqdm)
        return self._generate_engine(prompts, params, use_tqdm)

    def _generate_engine(self, prompts, params, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, sampling in zip(prompts, params):
                request_id = f"llm-{self._counter}"
                self._counter += 1
                engine.add_request(request_id, prompt, sampling, detokenize=False)
                ids.append(request_id)
        except RequestError as exc:
            for request_id in ids:
                engine.abort(request_id)
            raise RequestError(f"prompt {len(ids)}: {exc}") from None
        total = sum(p.max_tokens * p.n for p in params)
        bar = _progress(use_tqdm, len(prompts))
        finished: dict[str, RequestOutput] = {}
        start = time.perf_counter()
        try:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    made = engine.generated_tokens
                    rate = made / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s, <={total:,} tokens", refresh=False)
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[request_id] for request_id in ids]

    def _generate_hf(self, prompts, params, use_tqdm: bool) -> list[RequestOutput]:
        from truthgpt.inference.hf_fallback import hf_generate

        bar = _progress(use_tqdm, len(prompts))
        outputs = []
        from truthgpt.inference.engine import check_prompt_text

        for position, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                check_prompt_text(prompt, f"prompt {position}")
        encoded = [list(p) if not isinstance(p, str) else self.tokenizer.encode(p) for p in prompts]
        for position, prompt_ids in enumerate(encoded):
            if not prompt_ids:
                raise RequestError(f"prompt {position} is empty")
        for prompt, prompt_ids, sampling in zip(prompts, encoded, params):
            request_id = f"llm-{self._counter}"
            self._counter += 1
            text = prompt if isinstance(prompt, str) else None
            outputs.append(
                hf_generate(
                    self.model,
                    self.tokenizer,
                    request_id,
                    prompt_ids,
                    sampling,
                    text,
                    self.end_token_ids,
                )
            )
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return outputs


def _token_ids(prompt: Any) -> bool:
    """Whether `prompt` is a list (or tuple) of token ids."""
    return isinstance(prompt, Seq) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in prompt
    )


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)

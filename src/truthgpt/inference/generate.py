"""Loading a model folder for generation, the chat template, and one-prompt streaming.

Everything runs on the engine (`llm.LLM`); this room holds what the CLI and `truthgpt.generate`
need around it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from truthgpt.errors import RequestError
from truthgpt.inference.chat_template import chat_ids, chat_text, uses_plain_template
from truthgpt.inference.llm import load_for_generation  # noqa: F401  (re-exported)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> tuple[str, list[int]]:
    """The text a chat model expects for one user turn, ending where the answer begins (the
    server's plain template when the tokenizer has none: see `chat_note`), and the token ids
    to generate from (no special tokens beyond the template's: see `chat_ids`)."""
    messages = [{"role": "user", "content": user_message}]
    return chat_text(tokenizer, messages), chat_ids(tokenizer, messages)


def chat_note(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A sentence when --chat formats with the plain template (the tokenizer has none)."""
    if not uses_plain_template(tokenizer):
        return None
    return (
        "note: this model's tokenizer has no chat template; --chat uses the server's plain "
        "role headers (<|user|>, <|assistant|>)"
    )


def unescape(text: str) -> str:
    """`\\n` typed in a shell argument or a prompts file line means a newline."""
    return text.replace("\\n", "\n")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: .jsonl rows with a "prompt" field, else one prompt per line."""
    import json

    file = Path(path).expanduser()
    if not file.is_file():
        raise RequestError(f"prompt file {str(file)!r} does not exist")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        raise RequestError(
            f"{file}:{number}: not UTF-8 text (byte 0x{data[exc.start]:02x} at position {column})"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise RequestError(f"prompt file {str(file)!r} holds no prompts")
    if file.suffix != ".jsonl":
        return [unescape(line) for line in lines]
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{file}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RequestError(f'{file}:{number}: each row needs a "prompt" string')
        prompts.append(row["prompt"])
    if not prompts:
        raise RequestError(f"prompt file {str(file)!r} holds no prompts")
    return prompts


def stream_text(llm, prompt: str | list[int], params) -> Iterator[str]:
    """The new text of one prompt, piece by piece as the engine produces it."""
    engine = llm.engine
    if engine is None:  # transformers fallback: one piece at the end
        yield llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        return
    request_id = f"stream-{engine.prompt_tokens}-{engine.generated_tokens}"
    engine.add_request(request_id, prompt, params)
    finished = False
    try:
        while not finished:
            for output in engine.step():
                if output.request_id == request_id:
                    finished = output.finished
                    if output.outputs[0].delta_text:
                        yield output.outputs[0].delta_text
    finally:
        engine.abort(request_id)


def length_note(llm, prompt: str | list[int], max_tokens: int) -> str | None:
    """A sentence when the context cannot hold prompt + max_tokens (generation stops early);
    a RequestError when it cannot hold the prompt, before anything is printed."""
    from truthgpt.inference.engine import check_prompt_length

    context = llm.context_length
    if context is None:
        return None
    prompt_len = len(prompt if isinstance(prompt, list) else llm.tokenizer.encode(prompt))
    check_prompt_length(prompt_len, context)
    if prompt_len + max_tokens > context:
        return (
            f"note: --max-new-tokens {max_tokens} capped at {context - prompt_len}: the model's "
            f"context is {context} tokens and the prompt takes {prompt_len}"
        )
    return None


def open_llm(model: str, config, given: dict, overrides: list[str], n: int, seed, stop):
    """(LLM, SamplingParams) for the CLI: defaults from `inference:` of --config, else of the
    run folder's own config, else the schema's; flags and --set override them."""
    from truthgpt.config import flag_overrides, load_for_model
    from truthgpt.inference.llm import LLM
    from truthgpt.inference.sampling_params import SamplingParams

    # An error in a value given as a flag names the flag (--top-p), not the key it sets.
    flagged, flags = flag_overrides(
        {f"inference.{key}": value for key, value in given.items()}, overrides
    )
    loaded = load_for_model(model, config, flagged + list(overrides), flags)
    from truthgpt.hardware import apply_threads

    apply_threads(loaded.hardware.threads)
    inference = loaded.inference
    params = SamplingParams(
        max_tokens=inference.max_new_tokens,
        temperature=inference.temperature,
        top_k=inference.top_k or 0,
        top_p=inference.top_p,
        seed=seed,
        n=n,
        stop=tuple(stop),
    )
    return LLM(model, inference=inference), params


def nth_sample(params, index: int):
    """One of n samples as its own single-sample request (seed + index when seeded)."""
    import dataclasses

    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


def write_results(
    llm,
    prompts: list[str] | list[list[int]],
    params,
    out: Path | None,
    shown: list[str] | None = None,
) -> int:
    """Generate for every prompt; one JSON row per prompt to `out` (atomically) or stdout.
    `shown`: the prompts' texts for the rows, when `prompts` are token ids."""
    import json
    import sys

    from truthgpt.atomic import atomic_write_text

    rows = []
    for index, output in enumerate(llm.generate(prompts, params)):
        rows.append(
            json.dumps(
                {
                    "prompt": shown[index] if shown is not None else output.prompt,
                    "completions": [c.text for c in output.outputs],
                    "finish_reasons": [c.finish_reason for c in output.outputs],
                    "prompt_tokens": len(output.prompt_token_ids),
                    "completion_tokens": [len(c.token_ids) for c in output.outputs],
                },
                ensure_ascii=False,
            )
        )
    text = "".join(row + "\n" for row in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(out), text)
    return len(rows)

"""The `truthgpt` command: parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from truthgpt.errors import ConfigError, TruthGPTError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train, fine-tune, sample and serve (OpenAI-compatible HTTP) language models, and "
    "train and draw text-to-image diffusion models, from one YAML file.",
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: key.path=value (repeatable)."),
]


def _fail(exc: Exception) -> None:
    # Under --nproc / torchrun most user errors are met by every process: rank 0 says it, and
    # each leaves it for the launcher, which says one that rank 0 did not meet.
    if os.environ.get("RANK", "0") == "0":
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from truthgpt.training.launcher import record_error

        record_error(str(exc))
    raise typer.Exit(code=1)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML file or run folder.")],
    set_: SetOption = None,
) -> None:
    """Print the resolved config (the sections its task reads), or every error in it (exit 1)."""
    from truthgpt.config import load
    from truthgpt.local_paths import path_problems

    try:
        resolved = load(config, set_ or [])
    except TruthGPTError as exc:
        _fail(exc)
    problems = path_problems(resolved)
    if problems:
        lines = "".join(f"\n  {problem}" for problem in problems)
        _fail(ConfigError(f"{len(problems)} missing or wrong path(s):{lines}"))
    typer.echo(resolved.to_yaml(relevant_only=True), nl=False)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML file or run folder.")],
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over in a run folder that already holds a run.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from the newest complete checkpoint of the run folder."),
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train on N processes (GPUs) of this machine: runs this command under torchrun."
        ),
    ] = None,
) -> None:
    """Train the model a YAML config describes; writes the run folder."""
    from truthgpt.training.signals import Interrupted, catch_early_interrupts, interrupted_early

    catch_early_interrupts()  # first: the imports below take seconds
    try:
        code = _train(config, set_ or [], overwrite, resume, nproc)
    except Exception as exc:
        # A Ctrl-C that a library's import swallowed leaves that library half imported, and
        # the error it causes later is the Ctrl-C's, not a bug to report.
        if interrupted_early():
            _say_interrupted_early()
        from truthgpt.training.distributed import peer_lost

        if not peer_lost(exc):
            raise
        # Another process failed (it says why, through the launcher) or was killed: this
        # one's traceback of a broken connection would bury that. Said by rank 0 alone and
        # not recorded for the launcher: it is the other process's error that counts.
        if os.environ.get("RANK", "0") == "0":
            typer.secho("error: another process of this run stopped; see its error", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt as exc:
        # Once the loop runs, a Ctrl-C that stops at once says what was saved (Interrupted);
        # any other came during start-up (imports, data, model), before anything was.
        if not isinstance(exc, Interrupted):
            _say_interrupted_early()
        if os.environ.get("RANK", "0") == "0":
            typer.secho(str(exc), err=True)
        raise typer.Exit(code=130) from None
    if code:
        raise typer.Exit(code=code)


def _say_interrupted_early() -> None:
    if os.environ.get("RANK", "0") == "0":
        typer.secho("interrupted before training began; nothing was saved", err=True)
    raise typer.Exit(code=130)


def _train(config: Path, set_: list[str], overwrite: bool, resume: bool, nproc: int | None) -> int:
    """`truthgpt train`'s work; returns its exit code (130: stopped by a signal and saved)."""
    from truthgpt.training.launcher import stop_with_launcher

    stop_with_launcher()
    from truthgpt.config import load

    try:
        if overwrite and resume:
            raise ConfigError(
                "--overwrite starts the run over and --resume continues it: give one of them"
            )
        if nproc is not None:
            from truthgpt.training.launcher import check_nproc

            check_nproc(nproc)
        resolved = load(config, set_)
        if nproc is not None:
            from truthgpt.hardware import resolve_device
            from truthgpt.training.distributed import check_gpu_count, resolve_parallel
            from truthgpt.training.launcher import launch_on_ranks

            # What every process would refuse, refused once.
            resolve_parallel(resolved, nproc)
            if resolve_device(resolved.hardware.device).type == "cuda":
                check_gpu_count(nproc)
            args = ["train", str(config), *[f"--set={item}" for item in set_]]
            args += ["--overwrite"] * overwrite + ["--resume"] * resume
            sys.stdout.flush()
            try:
                return launch_on_ranks(nproc, args)  # the processes say what they saved
            except KeyboardInterrupt:  # before torch's launcher took the signals over
                return 130
        from truthgpt.training.distributed import exit_without_teardown as distributed_exit
        from truthgpt.training.run import train as run_training
        from truthgpt.training.signals import interrupted_early

        if interrupted_early():  # swallowed by an import above: stop before anything is built
            raise KeyboardInterrupt
        result = run_training(resolved, overwrite=overwrite, resume=resume or None)
    except TruthGPTError as exc:
        _fail(exc)
    # 130: not a finished run; a `train ... && generate ...` chain must not go on as if it were.
    code = 130 if result.interrupted else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker, its run saved
        distributed_exit(code)
    return code


@app.command(name="eval")
def evaluate(
    run: Annotated[
        Path,
        typer.Argument(help="Run folder, one of its checkpoint folders, or a model folder."),
    ],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="Text or .jsonl files/globs to evaluate instead (repeatable)."),
    ] = None,
    split: Annotated[str, typer.Option(help="The run's own split: val or train.")] = "val",
    max_batches: Annotated[
        int | None, typer.Option(min=1, help="Evaluate at most this many.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "auto",
    set_: SetOption = None,
) -> None:
    """Print the validation loss (and perplexity) of a run's best (else last) checkpoint on a
    split or files, as its training evaluates it; a model folder (HF, an export) on --data."""
    from truthgpt.training.evaluate import evaluate_run

    if split not in ("val", "train"):
        _fail(ConfigError(f"--split must be val or train, got {split!r}"))
    try:
        result = evaluate_run(run, data, split, max_batches, device, set_ or [], progress=True)
    except TruthGPTError as exc:
        _fail(exc)
    ppl = f"perplexity {result['ppl']:.2f}  " if result["ppl"] is not None else ""
    unit = result["unit"]
    typer.echo(
        f"{result['checkpoint']} on {result['split']}: loss {result['loss']:.4f}  {ppl}"
        f"({result[unit]:,} {unit}, {result['batches']} batches)"
    )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    format: Annotated[str, typer.Option("--format", help="Only hf for now.")] = "hf",
    merge_lora: Annotated[
        bool, typer.Option(help="Fold LoRA adapters into the weights (else keep adapter/).")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier export in --out (never a run or checkpoint).")
    ] = False,
) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer) from a run."""
    from truthgpt.training.sharded import export_checkpoint

    if format != "hf":
        _fail(ConfigError(f"--format {format!r} is not supported; use hf"))
    try:
        folder = export_checkpoint(run, out, merge_lora=merge_lora, overwrite=overwrite)
    except TruthGPTError as exc:
        _fail(exc)
    typer.echo(f"wrote {folder}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Run folder, checkpoint folder or HF model folder.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts-file", help="One prompt per line, or .jsonl rows with a prompt."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="With --prompts-file: JSONL results here.")
    ] = None,
    # The ranges of these four are the inference: section's (config.py), checked there.
    # Their defaults are the inference: section's (the run's own, or --config's): not repeated.
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="New tokens at most (>= 1). Default: from inference:."),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 is greedy. Default: from inference:.")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="Sample among the k likeliest; 0 or -1: off. Default: from inference:."),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus mass in (0, 1]. Default: from inference:.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Fix the sampling RNG (any 64-bit integer).")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples per prompt.")] = 1,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop at this string (repeatable); \\n is a newline."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Let --out replace an existing file.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = None,
    chat: Annotated[
        bool, typer.Option(help="Send the prompt as a user message through the chat template.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with an inference: section.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Continue a prompt (streamed) or a file of prompts (batched on the engine).

    --max-new-tokens, --temperature, --top-k and --top-p default to the inference: section of
    the run folder's config (or of --config); see README's config table."""
    from truthgpt.inference import generate as gen

    given = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "device": device,
    }
    try:
        if (prompt is None) == (prompts_file is None):
            raise ValueError("give exactly one of --prompt and --prompts-file")
        if out is not None and prompts_file is None:
            raise ValueError("--out goes with --prompts-file (a --prompt streams to the terminal)")
        if prompt is not None:  # before the model loads, not as a tokenizer's TypeError
            from truthgpt.inference.engine import check_prompt_text

            check_prompt_text(prompt, "--prompt")
        if out is not None:
            from truthgpt.guard import check_output_file

            check_output_file(out, "generate", overwrite, sources=[model, prompts_file])
        prompts = gen.read_prompts(prompts_file) if prompts_file is not None else None
        stop = [gen.unescape(item) for item in stop or []]
        llm, params = gen.open_llm(model, config, given, set_ or [], n, seed, stop)
        note = gen.chat_note(llm.tokenizer) if chat else None
        if note:
            typer.echo(note, err=True)
        if prompts is not None:
            shown = None
            if chat:
                shown, prompts = map(
                    list, zip(*(gen.chat_prompt(llm.tokenizer, p) for p in prompts))
                )
            written = gen.write_results(llm, prompts, params, out, shown)
            if out is not None:
                typer.echo(f"wrote {written} results to {out}", err=True)
            return
        source: str | list[int] = prompt
        if chat:
            prompt, source = gen.chat_prompt(llm.tokenizer, prompt)
        note = gen.length_note(llm, source, params.max_tokens)
        if note:
            typer.echo(note, err=True)
        for index in range(n):
            if n > 1:
                sys.stdout.write(f"--- sample {index}\n")
            sys.stdout.write(prompt)
            sys.stdout.flush()
            one = gen.nth_sample(params, index)
            for piece in gen.stream_text(llm, source, one):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except BrokenPipeError:
        # `truthgpt generate ... | head -1`: the reader left, which is no error. Point stdout at
        # devnull so the interpreter's final flush does not raise again, and exit as SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(code=141) from None
    except (TruthGPTError, ValueError) as exc:
        _fail(exc)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Run folder, checkpoint folder or HF model folder.")],
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default 127.0.0.1: this machine only).")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="TCP port (8000).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this Bearer key (or set TRUTHGPT_API_KEY).", show_default=False),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the folder's name).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with serve: and inference: sections.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Serve a model behind an OpenAI-compatible HTTP API (completions, chat, streaming)."""
    from truthgpt.config import flag_overrides
    from truthgpt.serving.server import run_server, serve_config

    given = {
        "serve.host": host,
        "serve.port": port,
        "serve.api_key": api_key,
        "serve.served_model_name": served_model_name,
        "inference.device": device,
    }
    overrides, flags = flag_overrides(given, set_ or [])
    try:
        status = run_server(model, serve_config(model, config, overrides + (set_ or []), flags))
    except (TruthGPTError, ValueError, OSError) as exc:
        _fail(exc)
    # The server, its engine and the result cache are shut down: skip the interpreter's teardown
    # of torch and transformers, a second or more (on 2 cores) of freeing what the exit frees.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _parse_size(size: str) -> tuple[int, int]:
    """`768x512` -> (768, 512), `512` -> (512, 512); anything else (`16x`, `16 x 16`) is an
    error rather than a guess."""
    import re

    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", size)
    if match is None:
        raise ValueError(
            f"--size: {size!r} is not WIDTHxHEIGHT or one number (e.g. 768x512, or 512 for 512x512)"
        )
    width, height = match.groups()
    return int(width), int(height or width)


@app.command()
def image(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A run folder of task image-generation, a local diffusers pipeline folder, or a "
            "hub id with diffusion.allow_download=true. Default: diffusion.model."
        ),
    ] = None,
    # Defaults are the diffusion: section's (README's config table), or a run's samples: ones.
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="What to draw. Default: empty.")
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="What to steer away from. Default: none.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Denoising steps. Default: the run's, else diffusion.steps (25)."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Classifier-free guidance scale. Default: the run's, else diffusion.guidance "
            "(7.5).",
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="WIDTHxHEIGHT, or one number for a square. Default: the model's."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Image i is drawn with seed + i. Default: 0.")
    ] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Images per prompt. Default: 1.")] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="ddim, euler_a, dpm++_2m_karras, ... Default: the pipeline's own."),
    ] = None,
    memory: Annotated[
        str | None, typer.Option(help="none, balanced, aggressive, ultra or auto. Default: auto.")
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="Adapter folder, DIR:weight (repeatable).")
    ] = None,
    speed: Annotated[
        bool | None,
        typer.Option(
            "--speed/--no-speed",
            help="SDPA, channels_last, fused QKV and torch.compile of the denoiser. Default: off.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (fp16 on a GPU, fp32 on a CPU), fp16, bf16 or fp32.")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Folder for the PNGs. Default: images.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with a diffusion: section.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Draw images with a diffusers pipeline under a memory level; writes PNGs with metadata."""
    from truthgpt.config import load, override_value

    given = {
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "batch": batch,
        "scheduler": scheduler,
        "memory": memory,
        "loras": lora,
        "speed": speed,
        "dtype": dtype,
        "output_dir": out,
    }
    try:
        if size is not None:
            given["width"], given["height"] = _parse_size(size)
        overrides = [
            f"diffusion.{k}={override_value(v)}" for k, v in given.items() if v is not None
        ]
        resolved = load(config, overrides + list(set_ or []))
        from truthgpt.diffusion.generate import generate_images
        from truthgpt.hardware import apply_threads

        apply_threads(resolved.hardware.threads)
        result = generate_images(resolved.diffusion, log=typer.echo)
    except (TruthGPTError, ValueError) as exc:
        _fail(exc)
    for path in result.paths:
        typer.echo(str(path))
    if result.grid_path is not None:
        typer.echo(f"grid: {result.grid_path}")
    stats = result.stats
    if stats.device.startswith("cuda"):
        used = (
            f"peak {stats.peak_allocated_gib:.2f} GiB allocated, "
            f"{stats.peak_reserved_gib:.2f} GiB reserved"
        )
    else:  # no device allocator to ask: what the process holds in host memory
        used = f"host RSS {stats.host_rss_gib:.2f} GiB"
    typer.echo(f"memory level {result.memory_level}: {used}, {stats.latency_s:.2f} s")


if __name__ == "__main__":
    app()

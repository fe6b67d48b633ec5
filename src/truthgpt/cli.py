"""The `truthgpt` command: parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from truthgpt.errors import TruthGPTError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train, fine-tune and sample language models from one YAML file.",
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: key.path=value (repeatable)."),
]


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML file or run folder.")],
    set_: SetOption = None,
) -> None:
    """Print the resolved config, or every error in it (exit code 1)."""
    from truthgpt.config import load

    try:
        resolved = load(config, set_ or [])
    except TruthGPTError as exc:
        _fail(exc)
    typer.echo(resolved.to_yaml(), nl=False)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML file or run folder.")],
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over in a run folder that already holds a run.")
    ] = False,
) -> None:
    """Train the model a YAML config describes; writes the run folder."""
    from truthgpt.config import load
    from truthgpt.training.trainer import train as run_training

    try:
        run_training(load(config, set_ or []), overwrite=overwrite)
    except TruthGPTError as exc:
        _fail(exc)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Run folder, checkpoint folder or HF model folder.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1)] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Fix the sampling RNG.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "auto",
) -> None:
    """Continue a prompt with a trained run or any local HF causal LM, streaming the text."""
    from truthgpt.inference.generate import generate as generate_text
    from truthgpt.inference.generate import load_for_generation
    from truthgpt.inference.sampling import SamplingParams
    from truthgpt.training.trainer import resolve_device

    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        loaded, tokenizer = load_for_generation(model, device=resolve_device(device))
        sys.stdout.write(prompt)
        sys.stdout.flush()

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        generate_text(loaded, tokenizer, prompt, params, on_text=show)
        sys.stdout.write("\n")
    except TruthGPTError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()

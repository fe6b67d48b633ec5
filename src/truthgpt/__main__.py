"""`python -m truthgpt ...`: the `truthgpt` command (what torchrun runs on every rank)."""

from truthgpt.cli import app

if __name__ == "__main__":
    app(prog_name="truthgpt")

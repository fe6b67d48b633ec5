"""`python -m truthgpt ...` and the `truthgpt` command (what torchrun runs on every rank)."""

import sys


def main() -> None:
    """Run the CLI. A Ctrl-C while its modules import (pydantic, typer: the first ~0.2 s) ends
    it as one later does (typer's exit 130), not with an import traceback."""
    try:
        from truthgpt.cli import app
    except KeyboardInterrupt:
        sys.exit(130)
    app(prog_name="truthgpt")


if __name__ == "__main__":
    main()

"""`python -m truthgpt ...` and the `truthgpt` command (what torchrun runs on every rank)."""

import sys


def main() -> None:
    """Run the CLI. A Ctrl-C while its modules import or typer reads the commands (the first
    ~0.3 s) ends it as one later does (typer's exit 130), not with a traceback."""
    try:
        from truthgpt.cli import app

        app(prog_name="truthgpt")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

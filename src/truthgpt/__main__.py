"""`python -m truthgpt ...` and the `truthgpt` command (what torchrun runs on every rank)."""

import errno
import os
import sys

# What the machine refused (a full disk, a read-only folder), not a bug: one line, no traceback.
MACHINE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main() -> None:
    """Run the CLI. A Ctrl-C while its modules import or typer reads the commands (the first
    ~0.3 s) ends it as one later does (typer's exit 130), not with a traceback."""
    try:
        from truthgpt.cli import app

        app(prog_name="truthgpt")
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in MACHINE_ERRORS:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets it
            where = f": {exc.filename}" if exc.filename else ""
            print(f"error: {exc.strerror}{where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`truthgpt train --nproc N`: torch's elastic launcher run from this process, as `torchrun
--standalone --nproc-per-node N` would, and what its processes need from it: to stop (and
save) when it dies, and to have an error only one of them met said.

The processes themselves join their group through distributed.py, as under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING

from truthgpt.errors import ConfigError
from truthgpt.training.distributed import env_world_size

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

LAUNCHER_PID = "TRUTHGPT_LAUNCHER_PID"


def stop_with_launcher() -> None:
    """In a process `launch_on_ranks` started: have the kernel send this process
    LAUNCHER_GONE (SIGHUP) if the launcher dies (even by kill -9), so no rank trains on,
    orphaned, beside a later resume. In the loop it asks for a checkpoint at the next step, as
    Ctrl-C does (the ranks talk to each other without the launcher's rendezvous store); before
    the loop it ends the process. Linux only (prctl)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    from truthgpt.training.signals import LAUNCHER_GONE

    signal.signal(LAUNCHER_GONE, signal.SIG_DFL)  # under nohup it came ignored
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, LAUNCHER_GONE, 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the request was in place
        os.kill(os.getpid(), LAUNCHER_GONE)


def check_nproc(nproc: int) -> None:
    """ConfigError unless `--nproc` can start `nproc` processes from here."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}")
    if env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc given inside a torchrun launch: drop --nproc (or torchrun)")


def record_error(message: str) -> None:
    """In a process torchrun (or `--nproc`) started: leave the user error `message` where its
    launcher looks when the process fails (torch elastic's TORCHELASTIC_ERROR_FILE), so an
    error that only a rank past 0 met, which prints none, is still said (`launch_on_ranks`;
    torchrun's failure summary)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)


def _said_by_other_ranks(failure: ChildFailedError) -> list[tuple[int, str]]:
    """(rank, message) of the errors ranks past 0 recorded (`record_error`) that rank 0,
    which printed its own, did not meet."""
    recorded = {
        rank: failed.message
        for rank, failed in sorted(failure.failures.items())
        # ours is a string (torch's own record is a dict); no file: a death by signal
        if os.path.isfile(failed.error_file)
        and isinstance(failed.error_file_data.get("message"), str)
    }
    said = {recorded.get(0)}
    unsaid = []
    for rank, message in recorded.items():
        if message not in said:
            said.add(message)
            unsaid.append((rank, message))
    return unsaid


# How long `--nproc` lets its processes save after a Ctrl-C before it kills them.
SAVE_GRACE_S = 600


def _has_field(cls: type, name: str) -> bool:
    return name in getattr(cls, "__dataclass_fields__", {})


def launch_on_ranks(nproc: int, cli_args: list[str]) -> int:
    """`truthgpt train --nproc N`: run `python -m truthgpt *cli_args` on N processes of this
    machine, as `torchrun --standalone --nproc-per-node N` would, from this process. Returns
    the exit code: 0, that of the first rank that failed (whose own message it printed: no
    launcher traceback on top), or 130 after Ctrl-C (the ranks save and stop first)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    # What the processes inherit, for the launch only (this process may go on to train itself).
    inherited = {LAUNCHER_PID: str(os.getpid())}  # they stop if this one is killed
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        inherited["OMP_NUM_THREADS"] = "1"  # as torchrun: N x all-core thread pools would fight
    # After a Ctrl-C the processes finish their step and save: torch's 30 s before it kills
    # them cuts a large checkpoint off (the previous one stays whole, the work since is lost).
    # An older torch has no such field and waits its 30 s.
    known = _has_field(LaunchConfig, "shutdown_timeout")
    grace = {"shutdown_timeout": SAVE_GRACE_S} if known else {}
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        **grace,
    )
    # The launcher's own log lines repeat what the failing process said; a death by signal,
    # which says nothing itself, is reported below.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.update(inherited)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "truthgpt", *cli_args)
    except ChildFailedError as exc:
        unsaid = _said_by_other_ranks(exc)
        for rank, message in unsaid:
            print(f"error: (process {rank}) {message}", file=sys.stderr)
        if unsaid:
            return 1
        _, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(
            f"error: process {failure.local_rank} was ended by {failure.signal_name()}; the "
            "others were stopped. --resume continues from the last complete checkpoint.",
            file=sys.stderr,
        )
        return 1
    except SignalException:
        return 130
    finally:
        for name in inherited:
            del os.environ[name]
    return 0

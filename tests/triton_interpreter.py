"""Triton kernels on the CPU, in Triton's interpreter: it must be switched on (TRITON_INTERPRET=1)
before triton is imported, so the checks run in a subprocess and the pytest process never sets
it. One subprocess runs the checks of every test module that asks (the `triton_interpreter`
fixture): importing torch, triton and the models is seconds of each.

A test module lists its checks in INTERPRETER_CHECKS and runs one with run_in_interpreter(name).
By hand, a module's checks or one of them:
    TRITON_INTERPRET=1 python tests/triton_interpreter.py test_paged_kernels test_fused_loss:rows
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback

MARK = "=== "


def run_checks(modules: list[str], timeout_s: float = 900) -> dict[str, tuple[bool, str]]:
    """{module: (passed, what its checks printed)} from one interpreter subprocess."""
    if not modules:
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "triton_interpreter.py"), *modules],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    sections: dict[str, list[str]] = {}
    passed: set[str] = set()
    current = None
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            name, _, verdict = line[len(MARK) :].partition(" ")
            current = name
            sections.setdefault(name, [])
            if verdict == "passed":
                passed.add(name)
            continue
        if current is not None:
            sections[current].append(line)
    # A failed module, or one the subprocess never finished (a crash), gets all there is.
    whole = f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    return {
        module: (True, "\n".join(sections[module])) if module in passed else (False, whole)
        for module in modules
    }


def main(names: list[str]) -> int:
    import torch

    from truthgpt.models import paged_kernels

    torch.set_num_threads(1)  # pytest may run beside it on a 2-core machine
    if not paged_kernels.triton_available(torch.device("cpu")):
        print("TRITON_INTERPRET=1 must be set (and triton installed) for the CPU run")
        return 1
    failed = 0
    for name in names:
        name, _, only = name.partition(":")
        print(f"{MARK}{name}", flush=True)
        try:
            module = importlib.import_module(name)
            for check in [only] if only else module.INTERPRETER_CHECKS:
                started = time.perf_counter()
                module.run_in_interpreter(check)
                print(f"{check}: ok in {time.perf_counter() - started:.1f} s", flush=True)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            print(f"{MARK}{name} failed", flush=True)
            failed += 1
        else:
            print(f"{MARK}{name} passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

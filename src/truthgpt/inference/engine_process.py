"""The engine loop in a process of its own, so the HTTP server never shares a GIL with it.

In one process, every JSON body and SSE event the server writes holds the GIL that the engine
thread needs between GPU kernels, and the engine slows down as the clients multiply (measured
in benchmarks/RESULTS.md: the HTTP layer cost 40% of throughput at 64 clients). vLLM's V1
engine moved its core into a process for the same reason. Here the child process builds the
engine itself (from a picklable `factory`, so the server process never loads the weights or
touches CUDA), runs `EngineLoop`, and sends each step's outputs back as one message: deltas
only (new token ids, new text, new logprobs), so a message's size does not grow with the
length of the outputs. The server side rebuilds whole `RequestOutput`s (token lists grow in
place) and hands them to the requests' callbacks on their event loops, as `AsyncEngine` does.

The child ignores SIGINT and SIGTERM (a Ctrl-C or a `kill` of the process group must not end
generations the server is draining) and exits when its pipe closes, so it never outlives the
server, even one killed with -9. If the child dies, the requests it held get an
EngineDeadError, and `restart()` starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from truthgpt.errors import TruthGPTError
from truthgpt.inference.async_engine import (
    Abort,
    Add,
    EngineDeadError,
    EngineLoop,
    EngineStartingError,
    FrontEnd,
    Published,
)
from truthgpt.inference.engine import Engine, EngineStats
from truthgpt.inference.request import CompletionOutput, RequestOutput

log = logging.getLogger(__name__)

_STATS_EVERY_S = 0.25  # how stale /metrics and the heartbeat may be while the engine works


class EngineProcess(FrontEnd):
    """`factory()` builds the Engine in the child; the constructor returns once it is ready
    and raises the child's error (a ConfigError, a CheckpointError) if loading failed."""

    def __init__(self, factory: Callable[[], Engine], start_timeout_s: float = 1800) -> None:
        super().__init__()
        self._factory = factory
        self._start_timeout_s = start_timeout_s
        self._send_lock = threading.Lock()
        self._stopping = False
        self.errors = 0
        self.heartbeat = time.monotonic()
        self._stats: EngineStats | None = None
        self._outputs: dict[str, _Outputs] = {}
        self._start()
        self._wait_ready()

    # -- lifecycle ----------------------------------------------------------------------------

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy threads and CUDA state
        self._conn, child_conn = context.Pipe(duplex=True)
        self.ready = False
        self._failure: BaseException | None = None
        self._ready_event = threading.Event()
        self._process = context.Process(
            target=_child_main, args=(self._factory, child_conn), name="truthgpt-engine",
            daemon=True,
        )  # fmt: skip
        # The child ignores SIGINT from its first instruction (an ignored signal stays ignored
        # across exec, and Python then installs no KeyboardInterrupt handler): a Ctrl-C while
        # it imports torch and loads the model would otherwise print its traceback. The
        # server stops it; the user's Ctrl-C is the parent's.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._process.start()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        child_conn.close()
        self._reader = threading.Thread(
            target=self._read, args=(self._conn,), name="truthgpt-engine-reader", daemon=True
        )
        self._reader.start()

    def _wait_ready(self) -> None:
        if not self._ready_event.wait(self._start_timeout_s):
            self.shutdown()
            raise EngineDeadError(f"the engine process did not start in {self._start_timeout_s} s")
        if self._failure is not None:
            raise self._failure
        if not self.ready:
            code = self._process.exitcode
            raise EngineDeadError(f"the engine process exited (code {code}) before it was ready")

    @property
    def is_alive(self) -> bool:
        """The process runs (it may still be loading: see `ready`)."""
        return self._process.is_alive() and self._reader.is_alive()

    def stalled(self, after_s: float) -> bool:
        """True when requests are in flight but the child has been silent for `after_s`."""
        return bool(self._sinks) and time.monotonic() - self.heartbeat > after_s

    def stats(self) -> EngineStats:
        assert self._stats is not None  # set by the ready message, before __init__ returns
        return self._stats

    def restart(self) -> bool:
        """Start a new engine process after the old one died; returns at once (the new one
        loads in the background, `ready` turns true when it can serve). False while the old
        process lives or after `shutdown`."""
        if self._stopping or self.is_alive:
            return False
        self._conn.close()
        self.restarts += 1
        self.heartbeat = time.monotonic()
        self._start()
        return True

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the child: it ends the requests it holds and exits; killed if it does not."""
        self._stopping = True
        try:
            with self._send_lock:
                self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # -- the server side of the pipe ------------------------------------------------------------

    def submit(self, request_id, prompt, params, deliver, loop) -> None:
        if not self.ready:
            loop.call_soon(deliver, EngineStartingError("the engine is loading; retry shortly"))
            return
        super().submit(request_id, prompt, params, deliver, loop)

    def _send(self, command: Add | Abort) -> None:
        if isinstance(command, Add):
            self._outputs[command.request_id] = _Outputs(command.prompt)
            message: tuple = ("add", command.request_id, command.prompt, command.params)
        else:
            self._outputs.pop(command.request_id, None)
            message = ("abort", command.request_id)
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the child is gone (its reader may have failed the rest)
            if isinstance(command, Add):
                self._deliver_all([(command.request_id, EngineDeadError("the engine is down"))])

    def _read(self, conn) -> None:
        """The reader thread: every message from the child, until its pipe closes."""
        try:
            while True:
                message = conn.recv()
                self.heartbeat = time.monotonic()
                kind = message[0]
                if kind == "out":
                    self._deliver_all(self._rebuild(message[1]))
                    if message[2] is not None:
                        self._stats, self.errors = message[2]
                elif kind == "stats":
                    self._stats, self.errors = message[1]
                elif kind == "ready":
                    self.max_model_len, self.max_num_seqs = message[1]
                    self._stats = message[2]
                    self.ready = True
                    self._ready_event.set()
                elif kind == "failed":
                    self._failure = message[1]
                    self._ready_event.set()
                    return
        except (EOFError, OSError):
            pass
        finally:
            self.ready = False
            self._ready_event.set()
            self._process.join(5)
            code = self._process.exitcode
            if self._failure is not None and not self.restarts:
                pass  # the constructor raises the child's error: the user sees that, not this
            elif not self._stopping:
                why = f": {self._failure}" if self._failure is not None else ""
                log.error("the engine process exited (code %s)%s", code, why)
            self._outputs.clear()
            self._fail_sinks(EngineDeadError(f"the engine process exited (code {code})"))

    def _rebuild(self, items: list[tuple[str, Any]]) -> Published:
        """Wire items -> whole RequestOutputs (token ids and logprobs accumulate per request)."""
        published: Published = []
        for request_id, item in items:
            if isinstance(item, BaseException):
                self._outputs.pop(request_id, None)
                published.append((request_id, item))
                continue
            state = self._outputs.get(request_id)
            if state is None:  # aborted while the message was on its way
                continue
            finished, prompt_ids, num_cached, arrival, first_time, finished_time, outs, scores = (
                item
            )
            if prompt_ids is not None:
                state.prompt_ids = prompt_ids
            if scores is not None:
                state.prompt_logprobs = scores
            outputs = []
            for index, text, delta_text, delta_ids, reason, stop_reason, logprobs in outs:
                ids, logprob_list = state.sample(index, logprobs is not None)
                ids.extend(delta_ids)
                if logprobs is not None:
                    logprob_list.extend(logprobs)
                outputs.append(
                    CompletionOutput(
                        index=index,
                        text=text,
                        token_ids=ids,
                        delta_text=delta_text,
                        delta_token_ids=delta_ids,
                        finish_reason=reason,
                        stop_reason=stop_reason,
                        logprobs=logprob_list,
                    )
                )
            if finished:
                self._outputs.pop(request_id, None)
            published.append(
                (
                    request_id,
                    RequestOutput(
                        request_id=request_id,
                        prompt_token_ids=state.prompt_ids,
                        outputs=outputs,
                        finished=finished,
                        num_cached_tokens=num_cached,
                        arrival_time=arrival,
                        first_token_time=first_time,
                        finished_time=finished_time,
                        prompt=state.prompt if isinstance(state.prompt, str) else None,
                        prompt_logprobs=state.prompt_logprobs,
                    ),
                )
            )
        return published


class _Outputs:
    """What the server side keeps of one request to rebuild its outputs."""

    def __init__(self, prompt: str | list[int]) -> None:
        self.prompt = prompt
        self.prompt_ids: list[int] = list(prompt) if not isinstance(prompt, str) else []
        self.samples: dict[int, tuple[list[int], list[dict] | None]] = {}
        self.prompt_logprobs: list[dict | None] | None = None

    def sample(self, index: int, with_logprobs: bool) -> tuple[list[int], list[dict] | None]:
        sample = self.samples.get(index)
        if sample is None:
            sample = self.samples[index] = ([], [] if with_logprobs else None)
        return sample


# -- the child ------------------------------------------------------------------------------------


def _child_main(factory: Callable[[], Engine], conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # tqdm's first bar (peft's merge of a LoRA adapter makes one, even disabled) creates a
    # multiprocessing lock, a named semaphore that only an orderly exit releases; the os._exit
    # below left it to the resource tracker, which printed "leaked semaphore objects" each time
    # the server stopped. No other process writes this one's bars: a thread lock does.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        engine = factory()
    except BaseException as exc:  # the server shows the user why, then exits
        conn.send(("failed", _picklable(exc)))
        conn.close()
        return
    link = _ChildLink(engine, conn)
    conn.send(("ready", (engine.max_model_len, engine.options.max_num_seqs), engine.stats()))
    reader = threading.Thread(target=link.read_commands, name="commands", daemon=True)
    reader.start()
    link.loop.run()
    # Stopped (the server shut down or went away): end what is left so nothing waits on it.
    for request_id in list(engine.requests):
        engine.abort(request_id)
    conn.close()
    # Nothing is left to save, and the server joins this process: skip the interpreter's
    # teardown of torch and the model (about a second on 2 cores, for memory the exit frees).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _ChildLink:
    """The child's end of the pipe: commands into the loop, outputs and stats out."""

    def __init__(self, engine: Engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.loop = EngineLoop(engine, self.publish, tick=self.tick)
        self.announced: set[str] = set()  # requests whose prompt ids were sent
        self.last_stats = 0.0  # when stats last went out (every message is a heartbeat)
        self.was_busy = False

    def read_commands(self) -> None:
        commands = self.loop.commands
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "add":
                    commands.put(Add(*message[1:]))
                elif message[0] == "abort":
                    self.announced.discard(message[1])
                    commands.put(Abort(message[1]))
                else:
                    break
        except (EOFError, OSError):
            pass
        self.loop.stop.set()
        commands.put(None)

    def publish(self, items: Published) -> None:
        wire = []
        for request_id, item in items:
            if isinstance(item, BaseException):
                self.announced.discard(request_id)
                wire.append((request_id, _picklable(item)))
            else:
                wire.append((request_id, self._compact(item)))
        self._send(("out", wire, self._stats_due()))

    def _compact(self, output: RequestOutput) -> tuple:
        prompt_ids = None
        if output.request_id not in self.announced:
            self.announced.add(output.request_id)
            prompt_ids = output.prompt_token_ids
        if output.finished:
            self.announced.discard(output.request_id)
        # The engine puts them in a request's first and last outputs: the first one is sent.
        prompt_logprobs = output.prompt_logprobs if prompt_ids is not None else None
        outs = []
        for out in output.outputs:
            count = len(out.delta_token_ids)
            logprobs = None
            if out.logprobs is not None:
                logprobs = out.logprobs[len(out.logprobs) - count :] if count else []
            outs.append(
                (
                    out.index,
                    out.text,
                    out.delta_text,
                    out.delta_token_ids,
                    out.finish_reason,
                    out.stop_reason,
                    logprobs,
                )
            )
        return (
            output.finished,
            prompt_ids,
            output.num_cached_tokens,
            output.arrival_time,
            output.first_token_time,
            output.finished_time,
            outs,
            prompt_logprobs,
        )

    def tick(self) -> None:
        """Stats and a heartbeat while idle, and once more when the engine goes idle, so
        /metrics shows the freed blocks."""
        busy = self.engine.has_unfinished_requests()
        stats = self._stats_due(now=self.was_busy and not busy)
        if stats is not None:
            self._send(("stats", stats))
        self.was_busy = busy

    def _stats_due(self, now: bool = False) -> tuple | None:
        """The stats, when those last sent are _STATS_EVERY_S old (or `now`), else None. Timed
        from the last stats, not the last message: a busy engine sends outputs every step, and
        /metrics then froze at the stats of the step that woke it."""
        at = time.monotonic()
        if not now and at - self.last_stats < _STATS_EVERY_S:
            return None
        self.last_stats = at
        return (self.engine.stats(), self.loop.errors)

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # the server is gone
            self.loop.stop.set()


def _picklable(exc: BaseException) -> BaseException:
    """The exception itself when it crosses a pipe intact (ours do), else its text."""
    if isinstance(exc, TruthGPTError):
        return exc
    return EngineDeadError(f"{type(exc).__name__}: {exc}")

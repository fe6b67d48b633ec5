"""An asyncio front end over the engine: many coroutines stream their own outputs.

The engine is not thread-safe and its steps block, so one loop owns it (`EngineLoop`): it drains
a command queue (add / abort), runs `step()` while there is work, and publishes each step's
outputs. `AsyncEngine` runs that loop in a thread of this process; `engine_process.py` runs it
in a process of its own and sends the outputs back over a pipe. Both front ends hand each output
to its request's callback on the caller's event loop, one wake-up per step, and both have the
same surface (`generate`, `submit`, `abort`, `is_alive`, `stalled`, `restart`, `stats`).

A coroutine that stops listening (client gone, task cancelled) aborts its request, which frees
its KV blocks at once. If a step raises, every request in flight gets the error, the engine
drops their state and its prefix cache, and the loop goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from truthgpt.errors import TruthGPTError
from truthgpt.inference.engine import Engine, EngineStats
from truthgpt.inference.request import RequestOutput
from truthgpt.inference.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_SWITCH_INTERVAL_S = 0.0005

Deliver = Callable[[RequestOutput | BaseException], None]
Published = list[tuple[str, RequestOutput | BaseException]]


class EngineDeadError(TruthGPTError):
    """The engine loop failed while this request was in flight."""


class EngineStartingError(EngineDeadError):
    """The engine is loading again after a failure; the request may be retried shortly."""


@dataclass
class Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams


@dataclass
class Abort:
    request_id: str


class EngineLoop:
    """The loop that owns an engine: commands in, `publish(outputs)` out, until `stop` is set.

    `publish` gets each step's outputs as (request_id, output) pairs, and (request_id, error)
    for a request the engine refused or a step that failed. `tick` runs once per turn (the
    process front end sends its heartbeat and stats from it)."""

    def __init__(
        self, engine: Engine, publish: Callable[[Published], None], tick: Callable | None = None
    ) -> None:
        self.engine = engine
        self.publish = publish
        self.tick = tick
        self.commands: queue.SimpleQueue = queue.SimpleQueue()  # Add | Abort | None (wake up)
        self.stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.errors = 0

    def run(self) -> None:
        engine = self.engine
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            if self.tick is not None:
                self.tick()
            idle = not engine.has_unfinished_requests()
            try:
                # Block while idle; otherwise take whatever arrived and go on stepping.
                command = self.commands.get(timeout=0.5) if idle else self.commands.get_nowait()
                while command is not None:
                    self._handle(command)
                    command = self.commands.get_nowait()
            except queue.Empty:
                pass
            if self.stop.is_set() or not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a failed step must not kill the server: fail its requests
                self.fail_in_flight(exc)
                continue
            self.publish([(output.request_id, output) for output in outputs])

    def _handle(self, command: Add | Abort) -> None:
        if isinstance(command, Add):
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except TruthGPTError as exc:
                self.publish([(command.request_id, exc)])
        else:
            self.engine.abort(command.request_id)

    def fail_in_flight(self, exc: BaseException) -> None:
        """Fail every request the engine holds with an EngineDeadError; drop its prefix cache
        (a failed step may have left blocks half-written)."""
        self.errors += 1
        request_ids = list(self.engine.requests)
        log.error("engine step failed (%s); failing %d requests in flight", exc, len(request_ids))
        error = EngineDeadError(f"the engine failed while generating: {exc}")
        for request_id in request_ids:
            self.engine.abort(request_id)
        self.publish([(request_id, error) for request_id in request_ids])
        self.engine.blocks.reset_prefix_cache()


class FrontEnd(ABC):
    """What both front ends share: the request callbacks and their delivery on event loops.
    Each says how a command reaches its loop (`_send`): a queue in this process, or a pipe."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self) -> None:
        # The thread that delivers outputs gives up the GIL while the engine works; when it has
        # outputs it must get it back from the event loop's thread, which by default keeps it
        # up to 5 ms. A busy server (many streams to feed) would stretch every step by that.
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._sinks: dict[str, tuple[Deliver, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self.restarts = 0

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each carries the step's deltas); the last has finished.
        Bad input raises RequestError at the first iteration; leaving early aborts."""
        request_id = request_id or f"req-{next(self._ids)}"
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.submit(request_id, prompt, params or SamplingParams(), sink.put_nowait, loop)
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def submit(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        deliver: Deliver,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The callback form under `generate` (the server's, which merges many requests into
        one queue): `deliver` runs on `loop` with each output, or with the error that ends the
        request (a RequestError for bad input, an EngineDeadError). The caller aborts."""
        self._sinks[request_id] = (deliver, loop)
        self._send(Add(request_id, prompt, params))

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self._send(Abort(request_id))

    @abstractmethod
    def _send(self, command: Add | Abort) -> None: ...

    def _deliver_all(self, items: Published) -> None:
        """Hand a step's outputs over with one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._sinks.get(request_id)
            if target is None:  # aborted meanwhile
                continue
            deliver, loop = target
            if isinstance(item, BaseException) or item.finished:
                self._sinks.pop(request_id, None)
            if loop.is_closed():
                self._sinks.pop(request_id, None)
                continue
            batches.setdefault(loop, []).append((deliver, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_run_deliveries, batch)

    def _fail_sinks(self, error: BaseException) -> None:
        self._deliver_all([(request_id, error) for request_id in list(self._sinks)])

    @property
    def in_flight(self) -> int:
        return len(self._sinks)


class AsyncEngine(FrontEnd):
    """The engine loop in a thread of this process (`serve.engine: thread`, and the tests')."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.options.max_num_seqs
        self.ready = True
        self._loop = EngineLoop(engine, self._deliver_all)
        self._thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop.run, name="truthgpt-engine", daemon=True)
        thread.start()
        return thread

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def heartbeat(self) -> float:
        return self._loop.heartbeat

    @property
    def errors(self) -> int:
        return self._loop.errors

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def stalled(self, after_s: float) -> bool:
        """True when the loop has work but has not come round for `after_s` seconds."""
        busy = self.engine.has_unfinished_requests()
        return busy and time.monotonic() - self._loop.heartbeat > after_s

    def restart(self) -> bool:
        """Start a new loop after the old one died (a fault outside a step's error handling):
        the requests it held get an EngineDeadError, the engine's state is reset. Returns
        whether it restarted (False while the loop is alive or after `shutdown`)."""
        if self._thread.is_alive() or self._loop.stop.is_set():
            return False
        # What the engine held fails; requests still queued as commands wait for the new loop.
        self._loop.fail_in_flight(RuntimeError("the engine loop died"))
        self.restarts += 1
        self._loop.heartbeat = time.monotonic()
        self._thread = self._start_thread()
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._loop.stop.set()
        self._loop.commands.put(None)  # wake the loop
        self._thread.join(timeout_s)

    def _send(self, command: Add | Abort) -> None:
        self._loop.commands.put(command)


def _run_deliveries(batch: list[tuple[Deliver, RequestOutput | BaseException]]) -> None:
    for deliver, item in batch:
        deliver(item)

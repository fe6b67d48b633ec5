"""An asyncio front end over the engine: many coroutines stream their own outputs.

The engine is not thread-safe and its steps block, so one background thread owns it: it drains
a command queue (add / abort), runs `step()` while there is work, and hands each output to the
asyncio queue of its request with `call_soon_threadsafe`. A coroutine that stops listening
(client gone, task cancelled) aborts its request, which frees its KV blocks at once. If a step
raises, every request in flight gets the error, the engine drops their state and its prefix
cache, and the loop goes on serving new requests; `heartbeat` tells a health check the loop is
alive.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from truthgpt.errors import TruthGPTError
from truthgpt.inference.engine import Engine
from truthgpt.inference.request import RequestOutput
from truthgpt.inference.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_SWITCH_INTERVAL_S = 0.0005


class EngineDeadError(TruthGPTError):
    """The engine loop failed while this request was in flight."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    deliver: Callable[[RequestOutput | BaseException], None]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        # The engine thread gives up the GIL while the GPU runs a step; when the step ends it
        # must get it back from the event loop's thread, which by default keeps it up to 5 ms.
        # A busy server (many streams to feed) would stretch every step by that much.
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[Callable, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.errors = 0
        self.restarts = 0
        self._thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="truthgpt-engine", daemon=True)
        thread.start()
        return thread

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stalled(self, after_s: float) -> bool:
        """True when the loop has work but has not come round for `after_s` seconds."""
        return self.engine.has_unfinished_requests() and time.monotonic() - self.heartbeat > after_s

    def restart(self) -> bool:
        """Start a new loop after the old one died (a fault outside a step's error handling):
        the requests it held get an EngineDeadError, the engine's state is reset. Returns
        whether it restarted (False while the loop is alive or after `shutdown`)."""
        if self._thread.is_alive() or self._stop.is_set():
            return False
        self._fail_all(RuntimeError("the engine loop died"))
        self.restarts += 1
        self.heartbeat = time.monotonic()
        self._thread = self._start_thread()
        return True

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
        deliver: Callable[[RequestOutput | BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The callback form under `generate` (the server's, which merges many requests into
        one queue): `deliver` runs on `loop` with each output, or with the error that ends the
        request (a RequestError for bad input, an EngineDeadError). The caller aborts."""
        self._commands.put(_Add(request_id, prompt, params, deliver, loop))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake the loop
        self._thread.join(timeout_s)

    # -- the loop thread --------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs over with one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._sinks.get(request_id)
            if target is None:
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

    def _handle(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except TruthGPTError as exc:
                command.loop.call_soon_threadsafe(command.deliver, exc)
                return
            self._sinks[command.request_id] = (command.deliver, command.loop)
        elif isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._sinks.pop(command.request_id, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            idle = not self.engine.has_unfinished_requests()
            try:
                # Block while idle; otherwise take whatever arrived and go on stepping.
                command = self._commands.get(timeout=0.5) if idle else self._commands.get_nowait()
                while command is not None:
                    self._handle(command)
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            if self._stop.is_set() or not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not kill the server: fail its requests
                self._fail_all(exc)
                continue
            self._deliver_all([(output.request_id, output) for output in outputs])

    def _fail_all(self, exc: Exception) -> None:
        self.errors += 1
        log.exception("engine step failed; failing %d requests in flight", len(self._sinks))
        error = EngineDeadError(f"the engine failed while generating: {exc}")
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, error)
        for request_id in list(self._sinks):  # added but never reached the engine
            self._deliver(request_id, error)
        self.engine.blocks.reset_prefix_cache()


def _run_deliveries(batch: list[tuple[Callable, RequestOutput | BaseException]]) -> None:
    for deliver, item in batch:
        deliver(item)

"""`truthgpt serve`: load a model, start the engine, run the API under uvicorn until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from truthgpt.config import CONFIG_FILE, Config, load_for_model
from truthgpt.errors import ConfigError
from truthgpt.guard import CHECKPOINTS

log = logging.getLogger(__name__)

API_KEY_ENV = "TRUTHGPT_API_KEY"
# Seconds the requests ended at the end of the grace (or by a second Ctrl-C) get to send that end
# (an error event and [DONE], or a 503) before the connections still open are closed: a client
# that stopped reading never takes it, and uvicorn would wait on it until its own timeout.
CLOSE_AFTER_END_S = 1.0
# Seconds uvicorn waits, after the grace, before it cancels the request tasks still running.
SHUTDOWN_BACKSTOP_S = 5.0


def serve_config(
    model: str,
    config: str | Path | None,
    overrides: list[str],
    flags: dict[str, str] | None = None,
) -> Config:
    """--config, else the run folder's own config, else the defaults; then the overrides
    (`config.load_for_model`). flags: key path -> the command-line flag that set it."""
    return load_for_model(model, config, overrides, flags)


def load_engine(model: str, config: Config):
    """Load the model and build its Engine (in the engine process, or in this one)."""
    from truthgpt.hardware import apply_threads, default_threads, resolve_device
    from truthgpt.inference.engine import Engine
    from truthgpt.inference.llm import inference_dtype, load_for_generation
    from truthgpt.models.decoder import Decoder

    options = config.inference
    device = resolve_device(options.device, "inference.device")
    threads = config.hardware.threads
    if threads is None and config.serve.engine == "process" and device.type == "cpu":
        # The engine's torch threads meet at a barrier after every op; one of them waiting
        # for a core that the HTTP process holds stalls them all (measured on 2 cores: steps
        # 10-20x slower with every core given to torch). Leave the server one core.
        threads = max(1, default_threads() - 1)
    apply_threads(threads)
    loaded, tokenizer, end_ids = load_for_generation(
        model, device, inference_dtype(options.dtype, device)
    )
    if not isinstance(loaded, Decoder):
        raise ConfigError(
            f"serve runs native models (Llama, Mistral, Qwen2, GPT-2); {model} is a "
            f"{type(loaded).__name__}, which only transformers' generate runs, one request at a "
            "time: use `truthgpt generate` for it"
        )
    loaded.fuse_for_inference()
    return Engine(loaded, tokenizer, options, end_ids)


def start_engine(model: str, config: Config):
    """The engine's front end that `serve.engine` names: its own process, or a thread here."""
    import functools

    if config.serve.engine == "process":
        from truthgpt.inference.engine_process import EngineProcess

        return EngineProcess(functools.partial(load_engine, model, config))
    from truthgpt.inference.async_engine import AsyncEngine

    return AsyncEngine(load_engine(model, config))


def build_state(model: str, config: Config):
    """Start the engine (the model loads there) and the tokenizer; returns the ServerState."""
    from truthgpt.inference.llm import load_tokenizer
    from truthgpt.models import resolve_model_folder
    from truthgpt.models.build import check_language_model_folder
    from truthgpt.serving.openai_api import ServerState

    settings = config.serve
    folder = resolve_model_folder(model)
    check_language_model_folder(folder)  # shards or a pipeline: say so, not "no tokenizer"
    tokenizer = load_tokenizer(folder)
    engine = start_engine(model, config)
    cache = None
    if settings.result_cache:
        from truthgpt.serving.result_cache import ResultCache

        run_folder = Path(model).expanduser()
        on_disk = (run_folder / CONFIG_FILE).is_file()
        cache = ResultCache(
            run_folder / "result_cache.sqlite" if on_disk else None,
            max_entries=settings.result_cache_entries,
        )
    return ServerState(
        model_fingerprint=weights_fingerprint(model),
        engine=engine,
        tokenizer=tokenizer,
        model_id=settings.served_model_name or default_model_id(model),
        settings=settings,
        inference=config.inference,
        api_key=settings.api_key or os.environ.get(API_KEY_ENV) or None,
        cache=cache,
    )


def default_model_id(model: str) -> str:
    """The name /v1/models lists: the folder's, and a run's checkpoint as RUN/NAME (its own
    name alone would be `best` or `last`)."""
    path = Path(model).expanduser().resolve()
    if path.parent.name == CHECKPOINTS:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def weights_fingerprint(model: str) -> str:
    """Names, sizes and modification times of the weight files that `model` resolves to: cheap,
    and different whenever a checkpoint is rewritten."""
    import hashlib

    from truthgpt.models import resolve_model_folder

    folder = resolve_model_folder(model)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def check_can_listen(host: str, port: int) -> None:
    """A one-line error now for a port in use or a host that does not resolve, rather than
    uvicorn's log line after the model has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"serve.host: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"serve.port: cannot listen on {host}:{port} ({exc.strerror}); another server "
                "may hold it: pick another --port"
            ) from None


def run_server(model: str, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests get serve.shutdown_grace_s to finish.
    Returns the exit status: 130 after a Ctrl-C (the shell's convention), else 0."""
    import asyncio

    import uvicorn

    from truthgpt.serving.openai_api import build_app
    from truthgpt.serving.protocol import APIError
    from truthgpt.serving.running import end_runs

    settings = config.serve
    check_can_listen(settings.host, settings.port)  # before the model loads, not after
    state = build_state(model, config)
    key_note = "API key required" if state.api_key else "no API key"

    grace_s = settings.shutdown_grace_s
    shutting_down = APIError(503, "the server is shutting down", kind="server_error")

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started:  # the real port: with --port 0 the system picked it
                port = self.servers[0].sockets[0].getsockname()[1]
                print(
                    f"serving {state.model_id!r} on http://{settings.host}:{port}/v1 "
                    f"({key_note}); Ctrl-C or SIGTERM stops it",
                    flush=True,
                )

        def end_in_flight(self) -> None:
            """End every request in flight with a 503 (an error event and [DONE] in a stream);
            close the connections still open a moment later."""
            end_runs(state, shutting_down)
            asyncio.get_running_loop().call_later(CLOSE_AFTER_END_S, self.close_connections)

        def close_connections(self) -> None:
            # Aborted, not closed: close() waits to flush what a client that stopped reading
            # never takes. Its request task sees a disconnect and ends as for a client gone.
            for connection in list(self.server_state.connections):
                connection.transport.abort()

        def handle_exit(self, sig, frame) -> None:
            # A signal handler: it runs between two bytecodes of the event loop's thread, so
            # the loop is reached through call_soon_threadsafe only.
            if state.draining:  # the second Ctrl-C: end what is in flight now
                if self.loop is not None:
                    self.loop.call_soon_threadsafe(self.end_in_flight)
                self.should_exit = True
                return
            state.draining = True  # /health fails at once, new requests get a 503
            if state.in_flight:
                requests = "request" if state.in_flight == 1 else "requests"
                print(
                    f"stopping: waiting up to {grace_s:g} s for {state.in_flight} {requests}; "
                    "Ctrl-C again to stop now",
                    flush=True,
                )
            else:
                print("stopping: no requests in flight", flush=True)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.loop.call_later, grace_s, self.end_in_flight)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            build_app(state),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            # Past the grace, end_runs answers the requests left (a 503, or an error event and
            # [DONE]); uvicorn's own timeout, which cancels their tasks mid-write (a cut stream,
            # a plain-text 500, CancelledError tracebacks), is only a backstop behind it.
            timeout_graceful_shutdown=grace_s + SHUTDOWN_BACKSTOP_S,
        )
    )
    # uvicorn re-raises the signal it caught once it has drained; under SIGTERM's default action
    # that killed the process (exit -15) before the finally below. A handler makes it exit 0.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    interrupted = False
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on, once drained
        interrupted = True
    finally:
        state.engine.shutdown()
        if state.cache is not None:
            state.cache.close()
    print(f"stopped serving {state.model_id!r}", flush=True)
    return 130 if interrupted else 0

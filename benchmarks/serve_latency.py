"""Serving latency and throughput: streaming clients over loopback HTTP vs the engine directly.

Two servers answer the same load over HTTP: one with the engine in its own process (`serve.engine:
process`, the default of `truthgpt serve`), one with the engine in a thread of the server process
(`serve.engine: thread`). The HTTP clients run in a separate process (httpx, asyncio) so their
parsing does not compete with the server for the GIL, as a real client would not. The same load
also runs through the engine's asyncio front end directly, in this process: the difference is
what the HTTP layer costs (JSON, SSE, uvicorn, and for the process engine the pipe).

Per concurrency C: C requests at once, each a random 128-token prompt and 256 new tokens
(greedy, EOS ignored); time to first token (TTFT) and inter-token latency (ITL) per request,
p50/p99 over all requests of the repeats; output tokens/s over the wall time.

    python benchmarks/serve_latency.py                       # GPU: TinyLlama shape, bf16
    python benchmarks/serve_latency.py --tiny                # CPU smoke test (used by the tests)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(runs: list[dict]) -> dict:
    ttft = [t for run in runs for t in run["ttft"]]
    itl = [t for run in runs for t in run["itl"]]
    rates = [run["tokens"] / run["seconds"] for run in runs]
    return {
        "ttft_ms": (percentile(ttft, 50) * 1e3, percentile(ttft, 99) * 1e3),
        "itl_ms": (percentile(itl, 50) * 1e3, percentile(itl, 99) * 1e3),
        "tok_s": (statistics.median(rates), min(rates), max(rates)),
    }


# -- the client side (its own process) -------------------------------------------------------


async def _http_request(client, url: str, prompt: list[int], new: int, record: dict) -> None:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                record["tokens"] += event["usage"]["completion_tokens"]
            if not any(choice.get("text") for choice in event.get("choices", [])):
                continue
            now = time.perf_counter()
            if last is None:
                record["ttft"].append(now - start)
            else:
                record["itl"].append(now - last)
            last = now


async def _http_load(url: str, prompts: list[list[int]], new: int) -> dict:
    import httpx

    record = {"ttft": [], "itl": [], "tokens": 0}
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_http_request(client, url, p, new, record) for p in prompts))
        record["seconds"] = time.perf_counter() - start
    return record


def http_client_process(url: str, loads: list[list[list[int]]], new: int, out) -> None:
    out.put([asyncio.run(_http_load(url, prompts, new)) for prompts in loads])


# -- the server side -----------------------------------------------------------------------------


async def _direct_load(engine, prompts: list[list[int]], new: int) -> dict:
    from truthgpt.inference.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    record = {"ttft": [], "itl": [], "tokens": 0}

    async def one(prompt: list[int]) -> None:
        start, last = time.perf_counter(), None
        async for output in engine.generate(prompt, params):
            now = time.perf_counter()
            if last is None:
                record["ttft"].append(now - start)
            else:
                record["itl"].append(now - last)
            last = now
            if output.finished:
                record["tokens"] += len(output.outputs[0].token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    record["seconds"] = time.perf_counter() - start
    return record


def build_engine(shape: str, device_type: str, dtype_name: str, options, spare_core: bool = False):
    """The benchmark's engine (random weights), built in whichever process calls it: the
    process engine's child builds its own from this picklable recipe (on a CPU it leaves the
    server a core, as `truthgpt serve` does)."""
    import torch

    from truthgpt.hardware import default_threads

    if spare_core and device_type == "cpu":
        torch.set_num_threads(max(1, default_threads() - 1))

    sys.path.insert(0, str(Path(__file__).parent))
    from generate_throughput import build_model, tokenizer

    from truthgpt.inference.engine import Engine

    model = build_model(shape, torch.device(device_type), getattr(torch, dtype_name))
    return Engine(model, tokenizer(), options)


def start_http(state, build_app, uvicorn):
    server = uvicorn.Server(uvicorn.Config(build_app(state), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def http_load(context, url: str, prompts, new: int, repeats: int) -> list[dict]:
    queue = context.Queue()
    # One warm-up load (connections, JIT of the client's own code), then the timed repeats.
    client = context.Process(
        target=http_client_process, args=(url, [prompts] * (repeats + 1), new, queue)
    )
    client.start()
    runs = None
    while runs is None:  # a crashed client must not hang the benchmark
        try:
            runs = queue.get(timeout=5)[1:]
        except Exception:
            if not client.is_alive():
                raise RuntimeError(f"the HTTP client died ({client.exitcode})") from None
    client.join()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()

    import functools
    import multiprocessing

    import torch
    import uvicorn

    sys.path.insert(0, str(Path(__file__).parent))
    from generate_throughput import random_prompts, tokenizer

    from truthgpt.config import InferenceConfig, ServeConfig
    from truthgpt.inference.async_engine import AsyncEngine
    from truthgpt.inference.engine_process import EngineProcess
    from truthgpt.serving.openai_api import ServerState, build_app

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    shape = "tiny" if args.tiny else "tinyllama"
    prompt_len, new = (16, 8) if args.tiny else (128, 256)
    levels = [int(c) for c in args.concurrency.split(",")]
    tok = tokenizer()
    options = InferenceConfig(
        device=device.type,
        max_model_len=2048 if not args.tiny else 256,
        max_num_seqs=max(levels),
        gpu_memory_fraction=0.35,  # two engines share the GPU: this process's and the child's
        cuda_graphs=device.type == "cuda",
    )
    recipe = functools.partial(build_engine, shape, device.type, dtype_name, options)
    engine = AsyncEngine(recipe())
    servers = {
        "HTTP, engine process": ServerState(
            EngineProcess(functools.partial(recipe, spare_core=True)),
            tok,
            "bench",
            ServeConfig(max_queued_requests=4096),
        ),
        "HTTP, engine thread": ServerState(
            engine, tok, "bench", ServeConfig(max_queued_requests=4096, engine="thread")
        ),
    }
    running = {name: start_http(state, build_app, uvicorn) for name, state in servers.items()}

    vocab = len(tok)
    loads = {c: random_prompts(c, prompt_len, vocab, seed=c) for c in levels}
    asyncio.run(_direct_load(engine, loads[levels[0]], new))  # warm-up
    report: dict = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu")}
    table = []
    context = multiprocessing.get_context("spawn")
    for c in levels:
        results = {
            "engine direct": [
                asyncio.run(_direct_load(engine, loads[c], new)) for _ in range(args.repeats)
            ]
        }
        for name, (_server, _thread, url) in running.items():
            results[name] = http_load(context, url, loads[c], new, args.repeats)
        for name, runs in results.items():
            summary = summarize(runs)
            report[f"{c}/{name}"] = summary
            table.append((c, name, summary))
            print(c, name, summary, flush=True)
    for server, thread, _url in running.values():
        server.should_exit = True
        thread.join(10)
    for state in servers.values():
        state.engine.shutdown()

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\ndevice {report['device']}, torch {torch.__version__}, {shape}, prompt {prompt_len}")
    header = "TTFT p50/p99 ms | ITL p50/p99 ms | output tok/s [min-max] | HTTP/direct"
    print(f"clients | path | {header}")
    for c, name, s in table:
        ratio = ""
        if name.startswith("HTTP"):
            ratio = f"{s['tok_s'][0] / report[f'{c}/engine direct']['tok_s'][0]:.2f}"
        print(
            f"{c} | {name} | {s['ttft_ms'][0]:.1f} / {s['ttft_ms'][1]:.1f} | "
            f"{s['itl_ms'][0]:.2f} / {s['itl_ms'][1]:.2f} | "
            f"{s['tok_s'][0]:,.0f} [{s['tok_s'][1]:,.0f}-{s['tok_s'][2]:,.0f}] | {ratio}"
        )


if __name__ == "__main__":
    main()

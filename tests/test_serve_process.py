"""The engine in a process of its own (`serve.engine: process`, the default of `truthgpt serve`)
under real faults: the process killed with -9 mid-request, frozen with SIGSTOP, failing to load,
and the server killed under it. The requests it held fail with a 5xx, /health tells the truth,
the watchdog starts a new process, and no engine process outlives its server."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import transformers
from serving_fixtures import make_model_folder, metric_values, start_server, wait_until_idle

from truthgpt.config import load
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.inference.engine_process import EngineProcess
from truthgpt.serving.server import build_state, load_engine

COMPLETIONS = "/v1/completions"
# Long enough (thousands of steps) that a request is surely still running when the test acts.
LONG = {"prompt": "a", "max_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"), context=4096)


def status_of(url: str) -> tuple[int, str]:
    response = httpx.get(url + "/health")
    return response.status_code, response.json()["status"]


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1].startswith("Z")


@pytest.fixture(scope="module")
def server(folder):
    """One server for the fault tests (each engine process costs seconds to start)."""
    running = start_server(folder, serve={"engine": "process", "stall_after_s": 0.5})
    yield running
    running.stop()
    assert gone(running.state.engine.pid)


def test_a_frozen_engine_process_fails_health_until_it_moves(server):
    url, engine = server.url, server.state.engine
    restarts = engine.restarts
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + COMPLETIONS, json={**LONG, "stream": True}) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)
            os.kill(engine.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: status_of(url) == (503, "engine loop is stalled"), 10)
            finally:
                os.kill(engine.pid, signal.SIGCONT)
            wait_for(lambda: status_of(url)[0] == 200, 10)  # the stream is still running
            assert server.state.in_flight == 1
    assert engine.restarts == restarts  # frozen is not dead
    wait_until_idle(url)


def test_metrics_show_the_engine_process_while_it_is_busy(server):
    # The child sent stats only 0.25 s after its last message, and it sends outputs every step:
    # while busy, /metrics froze at the stats of the step that woke it (often the idle engine's:
    # 0 running, 0 blocks used) until it went idle again.
    url = server.url
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + COMPLETIONS, json={**LONG, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            wait_for(lambda: metric_values(url)["truthgpt_running_sequences"] == 1, 5)
            used = metric_values(url)["truthgpt_kv_blocks_used"]
            # A block every 16 tokens: the count grows while the request runs.
            wait_for(lambda: metric_values(url)["truthgpt_kv_blocks_used"] > used, 5)
    wait_until_idle(url)


def test_a_killed_engine_process_fails_its_requests_and_is_replaced(server):
    url, engine = server.url, server.state.engine
    restarts = engine.restarts
    first_pid = engine.pid
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(1) as pool:
        # A stream and a plain request, both in flight when the process dies.
        with client.stream("POST", url + COMPLETIONS, json={**LONG, "stream": True}) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            plain = pool.submit(client.post, url + COMPLETIONS, json=LONG)
            wait_for(lambda: server.state.in_flight == 2)
            os.kill(first_pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert '"code": "engine_error"' in rest[-2] and "exited" in rest[-2]
        failed = plain.result()
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "engine_error"

    # Down or loading until the new process is ready, then serving again.
    assert status_of(url)[0] == 503
    wait_for(lambda: status_of(url)[0] == 200)
    assert engine.pid != first_pid and engine.restarts == restarts + 1
    assert metric_values(url)["truthgpt_engine_restarts"] == restarts + 1
    again = httpx.post(url + COMPLETIONS, json={**LONG, "max_tokens": 5}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
    wait_until_idle(url)
    assert gone(first_pid)


def test_a_request_while_the_new_process_loads_gets_503_with_retry_after(server):
    url, engine = server.url, server.state.engine
    restarts = engine.restarts
    os.kill(engine.pid, signal.SIGKILL)
    wait_for(lambda: engine.restarts == restarts + 1)  # the watchdog started a new one
    refused = httpx.post(url + COMPLETIONS, json={**LONG, "max_tokens": 2})
    if not engine.ready:  # (a fast machine may have loaded it already)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["code"] == "engine_starting"
        assert status_of(url) == (503, "engine is loading")
    wait_for(lambda: status_of(url)[0] == 200)
    served = httpx.post(url + COMPLETIONS, json={**LONG, "max_tokens": 2}, timeout=60)
    assert served.status_code == 200


def test_a_model_the_engine_cannot_load_is_a_config_error_from_the_server(tmp_path):
    # A causal LM that transformers runs but our engine does not: the engine process finds
    # out while loading, and the server reports its ConfigError (not a hang, not a traceback).
    config = transformers.OPTConfig(
        vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16,
    )  # fmt: skip
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    make_model_folder(tmp_path / "llama")  # borrow a tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "opt")
    settings = load({"inference": {"device": "cpu"}, "serve": {"engine": "process"}})
    with pytest.raises(ConfigError, match="serve runs native models"):
        build_state(str(tmp_path / "opt"), settings)


def test_an_engine_that_cannot_load_is_reported_once(tmp_path, caplog):
    # The user sees the child's error (raised here), not also an "engine process exited" line
    # from the thread that read it (`serve --device cuda` on a machine without CUDA).
    settings = load({"inference": {"device": "cpu"}})
    factory = functools.partial(load_engine, str(tmp_path / "missing"), settings)
    others = set(threading.enumerate())  # a module fixture's server reads its engine till the end
    with caplog.at_level(logging.ERROR), pytest.raises(CheckpointError, match="missing"):
        EngineProcess(factory)
    for thread in set(threading.enumerate()) - others:
        if thread.name == "truthgpt-engine-reader":
            thread.join(10)  # its last words, if any, are logged by now
    assert not [r for r in caplog.records if "engine process exited" in r.getMessage()]


def test_the_engine_process_does_not_outlive_a_killed_server(folder, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from truthgpt.config import load
            from truthgpt.serving.server import build_state

            if __name__ == "__main__":
                config = load({{"inference": {{"device": "cpu"}}, "serve": {{}}}})
                state = build_state({str(folder)!r}, config)
                print(state.engine.pid, flush=True)
                time.sleep(600)
            """
        )
    )
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert not gone(child)
        server.kill()  # -9: no cleanup runs in the server
        server.wait(10)
        wait_for(lambda: gone(child), 15)
    finally:
        server.kill()


def test_a_ctrl_c_while_the_engine_process_loads_does_not_kill_it(folder, capfd):
    """A terminal's Ctrl-C reaches the whole process group, the engine process too, while it
    is still importing torch: it ignores SIGINT from its start, loads, and serves."""
    import multiprocessing

    hits = []
    # Engine processes of other tests' servers (a module's fixture) are not this one.
    others = {child.pid for child in multiprocessing.active_children()}

    def interrupt_the_child() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not hits:
            for child in multiprocessing.active_children():
                if child.name == "truthgpt-engine" and child.pid and child.pid not in others:
                    os.kill(child.pid, signal.SIGINT)
                    hits.append(child.pid)
            time.sleep(0.01)

    thread = threading.Thread(target=interrupt_the_child, daemon=True)
    thread.start()
    running = start_server(folder, serve={"engine": "process"})
    try:
        thread.join(30)
        assert hits and running.state.engine.pid == hits[0]  # the same process came up
        status, _ = status_of(running.url)
        assert status == 200
        assert "KeyboardInterrupt" not in capfd.readouterr().err
    finally:
        running.stop()

"""A real server for the serving tests: a tiny Llama saved as an HF folder, the engine, the app
under uvicorn on a free loopback port in a background thread."""

from __future__ import annotations

import inspect
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import transformers
import uvicorn

from truthgpt.config import load
from truthgpt.data.tokenizer import train_bpe_tokenizer
from truthgpt.serving.openai_api import ServerState, build_app
from truthgpt.serving.server import build_state

CONTEXT = 256


def make_model_folder(folder: Path, context: int = CONTEXT) -> Path:
    """A random tiny Llama and a BPE tokenizer trained on stdlib source, saved as HF files."""
    source = Path(inspect.__file__).read_text()[:80_000]
    tokenizer = train_bpe_tokenizer([source], vocab_size=320, max_chars=80_000)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def add_peft_adapter(folder: Path):
    """A random LoRA adapter on the folder's model, saved in `adapter/` with transformers' module
    names (as `export --no-merge-lora` and peft write it); returns the adapted transformers model.
    init_lora_weights=False: B is random too, so the adapter changes the output."""
    import peft

    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    adapted = peft.get_peft_model(base, lora).eval()
    adapted.save_pretrained(folder / "adapter")
    return adapted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def model_id(self) -> str:
        return self.state.model_id

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.state.engine.shutdown()


def start_server(folder: Path, serve: dict | None = None, inference: dict | None = None):
    """The engine runs in a thread unless `serve` says `engine: process` (the default of
    `truthgpt serve`): a thread starts in no time, and the fault tests reach into its engine."""
    settings = {"device": "cpu", "max_num_seqs": 64, "block_size": 16, **(inference or {})}
    serve = {"port": free_port(), "engine": "thread", **(serve or {})}
    config = load({"inference": settings, "serve": serve})
    state = build_state(str(folder), config)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(state), host="127.0.0.1", port=config.serve.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{config.serve.port}", state, server, thread)


def metric_values(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


IDLE = (
    "truthgpt_running_sequences",
    "truthgpt_kv_blocks_used",
    "truthgpt_requests_in_flight",
    "truthgpt_queue_depth",
)


def wait_until_idle(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a KV block; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = metric_values(url)
        if all(values[name] == 0 for name in IDLE):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout_s} s: {values}")
        time.sleep(0.05)

"""Generation speed: truthgpt's engine vs Hugging Face `generate` on the same random weights.

One GPU process, bf16, greedy, EOS ignored so every request makes exactly its tokens.
Workloads (pick with --workloads, comma-separated):

  b1       TinyLlama-1.1B shape, batch 1, prompt 128 / 256 new: ms per output token (decode)
  b64      TinyLlama shape, 64 concurrent requests, prompt 128 / 256 new: output tokens/s
  7b       Llama-2-7B shape, batch 1, prompt 128 / 256 new: tokens/s (ours only unless --hf-7b)
  nano     nano-vllm's: 256 requests, prompt and output lengths uniform in 100..1024
  prefix   64 requests sharing a 1,024-token system prompt (+32 own tokens, 64 new): mean
           time to first token with the prefix cache on and off

Peers: `generate` with the default dynamic cache, and with a static cache (transformers then
compiles the forward: its best case) for b1/b64. The weight-read floor is the weights' bytes
over the device-to-device copy bandwidth measured here.

    python benchmarks/generate_throughput.py --workloads b1,b64,7b,nano,prefix
    python benchmarks/generate_throughput.py --tiny     # CPU smoke test (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from truthgpt.config import InferenceConfig
from truthgpt.data.tokenizer import train_bpe_tokenizer
from truthgpt.inference.engine import Engine
from truthgpt.inference.sampling_params import SamplingParams
from truthgpt.models.decoder import Decoder, DecoderConfig
from truthgpt.models.hf_io import hf_config_from_decoder, to_hf_state

SHAPES = {
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        intermediate_size=5632,
        max_position_embeddings=2048,
        tie_embeddings=False,
    ),
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
        tie_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_embeddings=False,
    ),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Decoder:
    """Random weights created directly on the device (a 7B model never touches the CPU)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Decoder(DecoderConfig(family="llama", **SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)
    model.fuse_for_inference()  # as `LLM` does with a model it loads
    return model.eval()


def hf_twin(model: Decoder):
    """The same weights in transformers' LlamaForCausalLM."""
    import transformers

    config = transformers.LlamaConfig(**hf_config_from_decoder(model.config))
    weight = model.embed.weight
    previous = torch.get_default_dtype()
    torch.set_default_dtype(weight.dtype)
    try:
        with weight.device:
            twin = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = twin.load_state_dict(to_hf_state(model), strict=False)
    if unexpected or [name for name in missing if "lm_head" not in name]:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        twin.tie_weights()
    twin.generation_config.pad_token_id = 0
    twin.generation_config.eos_token_id = None
    return twin.eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(512 * 1024 * 1024 // 2, dtype=torch.bfloat16, device=device)  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * src.element_size() * 20 / (time.perf_counter() - start)


def tokenizer():
    import json as stdlib_json
    from pathlib import Path

    text = Path(stdlib_json.__file__).read_text()
    return train_bpe_tokenizer([text], vocab_size=300, max_chars=100_000)


def random_prompts(count: int, length: int | tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    lengths = [length if isinstance(length, int) else rng.randint(*length) for _ in range(count)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_engine(engine: Engine, prompts, params_list) -> dict:
    """Submit everything at once, step to the end; returns wall time, tokens, per-request TTFT."""
    sync()
    start = time.perf_counter()
    arrival = time.monotonic()
    for index, (prompt, params) in enumerate(zip(prompts, params_list)):
        engine.add_request(f"r{index}", prompt, params, detokenize=False, arrival_time=arrival)
    ttft, tokens = [], 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens += sum(len(o.token_ids) for o in output.outputs)
                ttft.append(output.first_token_time - output.arrival_time)
    sync()
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": ttft}


def engine_for(model, tok, **options) -> Engine:
    device = model.embed.weight.device
    settings = {"device": device.type, "max_model_len": 2048, "gpu_memory_fraction": 0.5, **options}
    if device.type != "cuda":
        settings.update(cuda_graphs=False)
    return Engine(model, tok, InferenceConfig(**settings))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def hf_generate_time(twin, prompts, new_tokens: int, static: bool) -> float:
    ids = torch.tensor(prompts, device=twin.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    if static:
        kwargs["cache_implementation"] = "static"
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = twin.generate(ids, **kwargs)
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def bench_decode(model, tok, twin, batch: int, prompt_len: int, new: int, repeats: int, peers):
    """Per-token decode time (ms) and output tokens/s for ours and each peer."""
    vocab = model.config.vocab_size
    prompts = random_prompts(batch, prompt_len, vocab, seed=1)
    rows = {}
    engine = engine_for(model, tok, max_num_seqs=max(batch, 8))
    run_engine(engine, prompts, [greedy(new)] * batch)  # warm-up
    totals, firsts = [], []
    for _ in range(repeats):
        firsts.append(run_engine(engine, prompts, [greedy(1)] * batch)["seconds"])
        totals.append(run_engine(engine, prompts, [greedy(new)] * batch)["seconds"])
    rows["truthgpt engine"] = (totals, firsts)
    del engine
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for name, static in peers:
        hf_generate_time(twin, prompts, new, static)  # warm-up (compiles for static)
        hf_generate_time(twin, prompts, new, static)
        totals = [hf_generate_time(twin, prompts, new, static) for _ in range(repeats)]
        firsts = [hf_generate_time(twin, prompts, 1, static) for _ in range(repeats)]
        rows[name] = (totals, firsts)
    results = {}
    for name, (totals, firsts) in rows.items():
        per_token = [(t - statistics.median(firsts)) / (new - 1) * 1e3 for t in totals]
        throughput = [batch * new / t for t in totals]
        results[name] = {
            "ms_per_token": median_spread(per_token),
            "tok_s": median_spread(throughput),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="b1,b64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    parser.add_argument("--no-static", action="store_true", help="skip HF's static-cache peer")
    parser.add_argument("--hf-7b", action="store_true", help="also time HF generate on 7B")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = tokenizer()
    bandwidth = copy_bandwidth(device)
    workloads = args.workloads.split(",")
    table: list[tuple[str, str, str, str]] = []
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
    }
    small = "tiny" if args.tiny else "tinyllama"
    new = 16 if args.tiny else 256
    prompt_len = 16 if args.tiny else 128
    peers = [("HF generate", False)] + (
        [] if args.no_static or args.tiny else [("HF generate static+compile", True)]
    )

    if {"b1", "b64", "nano", "prefix"} & set(workloads):
        model = build_model(small, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor_ms = weight_bytes / bandwidth * 1e3
        report["tinyllama_weight_GB"] = weight_bytes / 1e9
        report["tinyllama_floor_ms"] = floor_ms
        table.append(
            (
                "floor",
                f"{small} weights {weight_bytes / 1e9:.2f} GB",
                f"{floor_ms:.3f} ms/token",
                f"copy {bandwidth / 1e9:.0f} GB/s",
            )
        )
        twin = hf_twin(model)
        for name, batch in (("b1", 1), ("b64", 64)):
            if name not in workloads:
                continue
            results = bench_decode(model, tok, twin, batch, prompt_len, new, args.repeats, peers)
            report[name] = results
            ours = results["truthgpt engine"]
            for peer, value in results.items():
                ms, lo, hi = value["ms_per_token"]
                tps, tlo, thi = value["tok_s"]
                ratio = ours["tok_s"][0] / tps
                table.append(
                    (
                        name,
                        peer,
                        f"{ms:.2f} ms/step [{lo:.2f}-{hi:.2f}]",
                        f"{tps:,.0f} tok/s [{tlo:,.0f}-{thi:,.0f}] ours/peer {ratio:.2f}x",
                    )
                )
        del twin
        if "nano" in workloads:
            count = 32 if args.tiny else 256
            span = (10, 100) if args.tiny else (100, 1024)
            rng = random.Random(2)
            prompts = random_prompts(count, span, model.config.vocab_size, seed=3)
            params = [greedy(rng.randint(*span)) for _ in range(count)]
            engine = engine_for(model, tok, max_num_seqs=256)
            run_engine(engine, prompts[:8], params[:8])  # warm-up
            runs = [run_engine(engine, prompts, params) for _ in range(args.repeats)]
            rates = [r["tokens"] / r["seconds"] for r in runs]
            med, lo, hi = median_spread(rates)
            report["nano"] = {"tok_s": (med, lo, hi), "tokens": runs[0]["tokens"]}
            table.append(
                (
                    "nano",
                    f"{count} req, {span[0]}-{span[1]} in/out",
                    f"{runs[0]['tokens']:,} tokens",
                    f"{med:,.0f} tok/s [{lo:,.0f}-{hi:,.0f}]",
                )
            )
            del engine
        if "prefix" in workloads:
            system_len = 64 if args.tiny else 1024
            system = random_prompts(1, system_len, model.config.vocab_size, seed=4)[0]
            tails = random_prompts(64, 32 if not args.tiny else 4, model.config.vocab_size, seed=5)
            prompts = [system + tail for tail in tails]
            for caching in (True, False):
                ttfts, walls = [], []
                for _ in range(args.repeats):
                    engine = engine_for(model, tok, max_num_seqs=64, prefix_caching=caching)
                    run_engine(
                        engine, prompts[:1], [greedy(2)]
                    )  # warm-up; caches the system prompt
                    result = run_engine(engine, prompts, [greedy(64)] * 64)
                    ttfts.append(statistics.mean(result["ttft"]) * 1e3)
                    walls.append(result["seconds"])
                    del engine
                med, lo, hi = median_spread(ttfts)
                report[f"prefix_cache_{caching}"] = {
                    "ttft_ms": (med, lo, hi),
                    "seconds": median_spread(walls),
                }
                table.append(
                    (
                        "prefix",
                        f"prefix cache {'on' if caching else 'off'}",
                        f"mean TTFT {med:.1f} ms [{lo:.1f}-{hi:.1f}]",
                        f"total {statistics.median(walls):.2f} s",
                    )
                )
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if "7b" in workloads and not args.tiny:
        model = build_model("llama2-7b", device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor_ms = weight_bytes / bandwidth * 1e3
        twin = hf_twin(model) if args.hf_7b else None
        results = bench_decode(
            model,
            tok,
            twin,
            1,
            128,
            256,
            args.repeats,
            [("HF generate", False)] if args.hf_7b else [],
        )
        report["7b"] = results
        report["7b_floor_ms"] = floor_ms
        table.append(
            (
                "floor",
                f"7B weights {weight_bytes / 1e9:.2f} GB",
                f"{floor_ms:.3f} ms/token",
                f"{1e3 / floor_ms:.0f} tok/s max",
            )
        )
        for peer, value in results.items():
            ms, lo, hi = value["ms_per_token"]
            table.append(
                (
                    "7b",
                    peer,
                    f"{ms:.2f} ms/step [{lo:.2f}-{hi:.2f}]",
                    f"{1e3 / ms:.0f} tok/s decode ({ms and floor_ms / ms:.0%} of floor)",
                )
            )

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    print(f"\ndevice {report['device']}, torch {torch.__version__}")
    for row in table:
        print(" | ".join(row))


if __name__ == "__main__":
    main()

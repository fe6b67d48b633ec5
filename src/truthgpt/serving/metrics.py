"""Prometheus metrics of one server: its own registry, so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from truthgpt.inference.engine import EngineStats

# Latencies of a small model on a GPU are milliseconds; of a big one on a CPU, seconds.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5, 10, 30, 60
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "truthgpt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("truthgpt_prompt_tokens", "prompt tokens in", registry=r)
        self.generation_tokens = Counter(
            "truthgpt_generation_tokens", "tokens generated", registry=r
        )
        self.ttft = Histogram(
            "truthgpt_time_to_first_token_seconds", "arrival to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "truthgpt_inter_token_latency_seconds", "time between a request's tokens",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_hits = Counter("truthgpt_result_cache_hits", "results from cache", registry=r)
        self.cache_misses = Counter(
            "truthgpt_result_cache_misses", "cacheable results computed", registry=r
        )
        self.in_flight = Gauge("truthgpt_requests_in_flight", "admitted, unfinished", registry=r)
        self.queue_depth = Gauge("truthgpt_queue_depth", "sequences waiting to run", registry=r)
        self.running = Gauge("truthgpt_running_sequences", "sequences running", registry=r)
        self.blocks_used = Gauge(
            "truthgpt_kv_blocks_used", "KV blocks held by sequences", registry=r
        )
        self.blocks_free = Gauge(
            "truthgpt_kv_blocks_free", "KV blocks free or cached but unreferenced", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "truthgpt_prefix_cache_hit_rate", "prompt tokens found in the prefix cache", registry=r
        )
        self.preemptions = Gauge(
            "truthgpt_preemptions",
            "sequences preempted (blocks freed, recomputed later) since the engine started",
            registry=r,
        )
        self.engine_restarts = Gauge(
            "truthgpt_engine_restarts", "times the engine loop was restarted", registry=r
        )

    def render(self, stats: EngineStats, in_flight: int, restarts: int) -> bytes:
        self.in_flight.set(in_flight)
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.blocks_used.set(stats.used_blocks)
        self.blocks_free.set(stats.free_blocks)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.preemptions.set(stats.preemptions)
        self.engine_restarts.set(restarts)
        return generate_latest(self.registry)

"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

    qwen2vl_requests_total{route, status}      requests answered
    qwen2vl_prompt_tokens_total                prompt tokens of finished requests
    qwen2vl_generation_tokens_total            generated tokens of finished requests
    qwen2vl_time_to_first_token_seconds        histogram: request arrival to its first text
    qwen2vl_inter_token_latency_seconds        histogram: time between successive text deltas
    qwen2vl_num_requests_running               rows being decoded (and prefilled)
    qwen2vl_num_requests_waiting               requests queued or being prepared
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen2vl_requests", "Requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen2vl_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("qwen2vl_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("qwen2vl_time_to_first_token_seconds", "Request arrival to its first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwen2vl_inter_token_latency_seconds", "Time between successive text deltas",
                             buckets=LATENCY_BUCKETS, registry=r)
        running = Gauge("qwen2vl_num_requests_running", "Rows being decoded or prefilled", registry=r)
        waiting = Gauge("qwen2vl_num_requests_waiting", "Requests queued or being prepared", registry=r)
        running.set_function(lambda: _stat(scheduler, "active") + _stat(scheduler, "admitting"))
        waiting.set_function(lambda: _stat(scheduler, "waiting") + _stat(scheduler, "reserved"))

    def finished(self, results: list) -> None:
        if results:
            self.prompt_tokens.inc(results[0].prompt_tokens)
            self.generation_tokens.inc(sum(r.completion_tokens for r in results))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _stat(scheduler, key: str) -> int:
    return int(scheduler.stats().get(key, 0))

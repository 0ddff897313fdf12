"""Prometheus metrics of the API server (served on /metrics with --enable-metrics), in their own registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmserve.messages import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        r = self.registry
        self.requests = Counter("mmserve_requests", "Finished requests by finish reason (abort: given up before "
                                "the end)", ["model_name", "reason"], registry=r)
        self.prompt_tokens = Counter("mmserve_prompt_tokens", "Prompt tokens of finished requests",
                                     ["model_name"], registry=r).labels(**label)
        self.generation_tokens = Counter("mmserve_generation_tokens", "Generated tokens", ["model_name"],
                                         registry=r).labels(**label)
        self.running = Gauge("mmserve_num_running_reqs", "Requests in the running batch", ["model_name"],
                             registry=r).labels(**label)
        self.queued = Gauge("mmserve_num_queue_reqs", "Requests waiting in the engine", ["model_name"],
                            registry=r).labels(**label)
        self.kv_usage = Gauge("mmserve_kv_cache_usage", "Fraction of KV slots held by requests", ["model_name"],
                              registry=r).labels(**label)
        self.kv_used = Gauge("mmserve_kv_cache_used_tokens", "KV slots held by requests", ["model_name"],
                             registry=r).labels(**label)
        self.cache_hit_rate = Gauge("mmserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache "
                                    "/ prompt tokens, since start", ["model_name"], registry=r).labels(**label)
        self.ttft = Histogram("mmserve_time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.itl = Histogram("mmserve_inter_token_latency_seconds", "Time between output tokens", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.e2e = Histogram("mmserve_e2e_request_latency_seconds", "Request latency", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(**label)
        self.model_name = model_name

    def observe_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.running)
        self.queued.set(stats.waiting)
        self.kv_used.set(stats.kv_used_tokens)
        self.kv_usage.set(stats.kv_used_tokens / max(1, stats.kv_total_tokens))
        self.cache_hit_rate.set(stats.cached_tokens / max(1, stats.prompt_tokens))

    def observe_tokens(self, first: bool, seconds: float, count: int) -> None:
        if first:
            self.ttft.observe(seconds)
        else:  # several tokens in one output share the interval
            for _ in range(count):
                self.itl.observe(seconds / count)
        self.generation_tokens.inc(count)

    def observe_finished(self, state: Any, seconds: float) -> None:
        reason = (state.last.finished_reason or {}).get("type", "unknown")
        self.requests.labels(model_name=self.model_name, reason=reason).inc()
        self.prompt_tokens.inc(len(state.prompt_ids))
        self.e2e.observe(seconds)

    def observe_aborted(self) -> None:
        """A request given up before its end (its client disconnected, or the server stopped it): it produces no
        final output, so `observe_finished` never sees it."""
        self.requests.labels(model_name=self.model_name, reason="abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of a serving engine, in a registry of their own (one per server)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
THROUGHPUT_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.waiting = Gauge("ringlinear_requests_waiting", "Requests queued for a slot", registry=registry)
        self.running = Gauge("ringlinear_requests_running", "Requests in the running batch", registry=registry)
        self.slot_usage = Gauge("ringlinear_cache_slot_usage", "Share of Lightning state slots in use",
                                registry=registry)
        self.page_usage = Gauge("ringlinear_cache_page_usage", "Share of KV cache pages in use", registry=registry)
        self.tokens_per_second = Gauge("ringlinear_generation_tokens_per_second",
                                       f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:.0f} s",
                                       registry=registry)
        self.prompt_tokens = Counter("ringlinear_prompt_tokens", "Prompt tokens computed (recomputation included)",
                                     registry=registry)
        self.generation_tokens = Counter("ringlinear_generation_tokens", "Tokens generated", registry=registry)
        self.preemptions = Counter("ringlinear_preemptions", "Sequences preempted for lack of cache pages",
                                   registry=registry)
        self.prefix_cache_queries = Counter("ringlinear_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache", registry=registry)
        self.prefix_cache_hits = Counter("ringlinear_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         registry=registry)
        self.snapshot_bytes = Gauge("ringlinear_prefix_cache_snapshot_bytes",
                                    "Memory held by cached Lightning-state snapshots", registry=registry)
        self.spec_draft_tokens = Counter("ringlinear_spec_decode_num_draft_tokens",
                                         "Draft tokens verified (speculative decoding)", registry=registry)
        self.spec_accepted_tokens = Counter("ringlinear_spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted (speculative decoding)", registry=registry)
        self.requests = Counter("ringlinear_requests", "Finished requests", ["finish_reason"], registry=registry)
        self.rejected = Counter("ringlinear_requests_rejected", "Requests refused because the queue was full",
                                registry=registry)
        self.ttft = Histogram("ringlinear_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("ringlinear_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("ringlinear_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self._counters = {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generation_tokens,
                          "preemptions": self.preemptions, "prefix_cache_queries": self.prefix_cache_queries,
                          "prefix_cache_hits": self.prefix_cache_hits, "spec_draft_tokens": self.spec_draft_tokens,
                          "spec_accepted_tokens": self.spec_accepted_tokens}
        self._totals = dict.fromkeys(self._counters, 0)
        self._window: deque[tuple[float, int]] = deque()

    def update(self, stats: dict[str, float]) -> None:
        """Take the engine's `stats()` after a step."""
        self.waiting.set(stats["waiting"])
        self.running.set(stats["running"])
        self.slot_usage.set(stats["slot_usage"])
        self.page_usage.set(stats["page_usage"])
        self.snapshot_bytes.set(stats["snapshot_bytes"])
        for name, counter in self._counters.items():
            counter.inc(stats[name] - self._totals[name])
            self._totals[name] = stats[name]
        now = time.monotonic()
        self._window.append((now, stats["generated_tokens"]))
        while now - self._window[0][0] > THROUGHPUT_WINDOW_S:
            self._window.popleft()
        (first_time, first_total), (last_time, last_total) = self._window[0], self._window[-1]
        self.tokens_per_second.set((last_total - first_total) / max(last_time - first_time, 1e-3))

    def render(self) -> bytes:
        return generate_latest(self.registry)

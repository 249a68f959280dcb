"""Prometheus metrics of `qwenjax serve`, named like vLLM's (`vllm:x` → `qwenjax:x`) so that
existing dashboards work after a prefix change (SERVING.md §5).

Latencies are measured here, per request, in the HTTP layer (what a client sees); queue and
token counts are read from `Scheduler.stats()` at scrape time, so they are never out of step with
the engine. Each server owns its registry (no global state: tests start several apps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qwenjax:"

# vLLM's buckets: TTFT from 1 ms to minutes (a long prefill behind a queue), ITL 10 ms-scale.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

# Scheduler.stats() key -> (metric name without prefix, kind, help).
_STATS: dict[str, tuple[str, str, str]] = {
    "running": ("num_requests_running", "gauge", "Requests in a decode slot."),
    "waiting": ("num_requests_waiting", "gauge", "Requests queued for a slot."),
    "slots": ("num_slots", "gauge", "Decode slots of the engine."),
    "slots_used": ("num_slots_used", "gauge", "Decode slots holding a request."),
    "prompt_tokens_total": (
        "prompt_tokens",
        "counter",
        "Prompt tokens of submitted requests (reused ones included).",
    ),
    "generation_tokens_total": ("generation_tokens", "counter", "Generated tokens."),
    "prefix_cache_queries_total": (
        "prefix_cache_queries",
        "counter",
        "Prompt tokens of admitted requests (prefix cache lookups, in tokens).",
    ),
    "prefix_cache_hits_total": (
        "prefix_cache_hits",
        "counter",
        "Prompt tokens reused from a slot's cache instead of prefilled.",
    ),
    "spec_decode_num_drafts_total": (
        "spec_decode_num_drafts",
        "counter",
        "Speculative draft rounds.",
    ),
    "spec_decode_num_draft_tokens_total": (
        "spec_decode_num_draft_tokens",
        "counter",
        "Tokens drafted by the MTP head.",
    ),
    "spec_decode_num_accepted_tokens_total": (
        "spec_decode_num_accepted_tokens",
        "counter",
        "Drafted tokens accepted by the target.",
    ),
}


class _SchedulerCollector:
    """Reads the scheduler's counters at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, kind, text) in _STATS.items():
            value = stats.get(key)
            if value is None:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(PREFIX + name, text, value=float(value))
        used, slots = stats.get("slots_used"), stats.get("slots")
        if used is not None and slots:
            yield GaugeMetricFamily(
                PREFIX + "slot_usage_perc", "Fraction of decode slots in use.", value=used / slots
            )


class Metrics:
    """The registry of one server and the per-request observations the HTTP layer makes."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]):
        # `_created` series only clutter the page (process-wide, but this is the server).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SchedulerCollector(stats))
        r = self.registry
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request (per token).",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.disconnected = Counter(
            PREFIX + "http_requests_client_disconnected",
            "Requests whose client went away before the reply was complete.",
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused before generation, by reason.",
            ["reason"],
            registry=r,
        )

    def observe_tokens(self, start: float, last: float | None, now: float, count: int) -> None:
        """`count` tokens arrived at `now`; `last` is when the previous ones did (None: first)."""
        if count <= 0:
            return
        if last is None:
            self.ttft.observe(now - start)
            count -= 1
            last = now
        # Several tokens per event (speculation): the gap is shared by the tokens it brought.
        for _ in range(count):
            self.itl.observe((now - last) / max(count, 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

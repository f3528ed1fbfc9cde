"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Requests and errors by endpoint, latency and batch-size histograms, resident adapters, loads, evictions.

    Example:
        >>> metrics = ServerMetrics()
        >>> metrics.requests.labels(endpoint="/v1/embeddings").inc()
        >>> b"lntune_requests_total" in metrics.render()
        True
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lntune_requests", "HTTP requests, by endpoint.", ["endpoint"], registry=r)
        self.errors = Counter(
            "lntune_request_errors",
            "HTTP responses with status >= 400, by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "lntune_request_latency_seconds",
            "Time to answer a request, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lntune_batch_size", "Samples in one model forward (or generate).", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_adapters = Histogram(
            "lntune_batch_adapters", "Distinct adapters in one model forward.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.resident = Gauge("lntune_resident_adapters", "Adapters loaded in the model now.", registry=r)
        self.loads = Counter("lntune_adapter_loads", "Adapter loads (first use, reload or replace).", registry=r)
        self.load_failures = Counter("lntune_adapter_load_failures", "Adapter loads that failed.", registry=r)
        self.evictions = Counter(
            "lntune_adapter_evictions", "Adapters unloaded to stay within --max-resident.", registry=r
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class GenerationMetrics:
    """The generation engine's metrics, in a server's registry: requests running, engine restarts, failures.

    Args:
        registry: The server's `ServerMetrics.registry`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge(
            "lntune_generation_running_requests", "Completion and chat requests being answered now.", registry=registry
        )
        self.restarts = Counter(
            "lntune_generation_engine_restarts",
            "Restarts of the continuous-batching engine after a step failed.",
            registry=registry,
        )
        self.failed = Counter(
            "lntune_generation_failed_requests", "Requests failed by a generation step that raised.", registry=registry
        )

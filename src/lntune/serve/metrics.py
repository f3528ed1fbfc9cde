"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Requests and errors by endpoint, latency and batch-size histograms, resident adapters, loads, evictions;
    queue length, waiting and running requests, queue / tokenization / inference time histograms, and the
    adapter gauge in the shape of vLLM's ``lora_requests_info``.

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
        # What gateways and autoscalers read (TEI's te_queue_size and durations, vLLM's request gauges).
        self.queue_size = Gauge("lntune_queue_size", "Inputs waiting for a forward.", registry=r)
        self.requests_waiting = Gauge(
            "lntune_num_requests_waiting", "Requests none of whose inputs has reached a forward yet.", registry=r
        )
        self.requests_running = Gauge(
            "lntune_num_requests_running", "Requests with inputs in a forward, not yet answered.", registry=r
        )
        self.queue_time = Histogram(
            "lntune_queue_time_seconds", "Time an input waits before its forward.", buckets=_STEP_BUCKETS, registry=r
        )
        self.tokenization_time = Histogram(
            "lntune_tokenization_time_seconds", "Time to tokenize one request.", buckets=_STEP_BUCKETS, registry=r
        )
        self.inference_time = Histogram(
            "lntune_inference_time_seconds",
            "Time of one batch's model call (all its length buckets).",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "lntune_batch_tokens",
            "Tokens (inputs' lengths summed) in one batch.",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.rejected = Counter(
            "lntune_requests_rejected", "Requests refused with 429 because the queue was full.", registry=r
        )
        self.timeouts = Counter("lntune_request_timeouts", "Requests answered 504 (--request-timeout).", registry=r)
        self.lora_info = Gauge(
            "lntune_lora_requests_info",
            "Adapters of the running batch and of the queued inputs, as vLLM's vllm:lora_requests_info (value: the "
            "time of the update; only the latest label set is kept).",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=r,
        )
        self._lora_labels: tuple[str, str, str] | None = None
        self._lora_lock = threading.Lock()

    def set_lora_info(self, max_lora: int, waiting: list[str], running: list[str]) -> None:
        """Set the adapter gauge to now for these adapters (vLLM's shape), dropping the previous label set.

        vLLM keeps every label set it ever set and lets readers pick the newest by its value; here only the
        newest is kept, so the number of series stays one however many adapters come and go.
        """
        labels = (str(max_lora), ",".join(waiting), ",".join(running))
        with self._lora_lock:
            self.lora_info.labels(*labels).set_to_current_time()
            if self._lora_labels is not None and self._lora_labels != labels:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels

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

"""Prometheus metrics of the inference service, labelled by model and version (never by anything about a patient).

Histograms, not summaries, so that Prometheus can aggregate across replicas. The request time splits as in
Triton: queue time (waiting in the batcher) + compute time (the onnxruntime run of the batch it joined).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    """All metrics of one server, in their own registry (so tests can run several servers in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ("model", "version")
        self.request_seconds = Histogram(
            "cxr_inference_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "cxr_inference_queue_duration_seconds",
            "Time a request waited in the dynamic batcher's queue.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "cxr_inference_compute_duration_seconds",
            "Time of one onnxruntime run of a batch.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cxr_inference_batch_size",
            "Rows per executed batch.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            "cxr_inference_request_success", "Inference requests answered successfully.", labels, registry=self.registry
        )
        self.failure = Counter(
            "cxr_inference_request_failure",
            "Inference requests that failed, by reason.",
            (*labels, "reason"),
            registry=self.registry,
        )
        self.pending = Gauge(
            "cxr_inference_pending_requests", "Inference requests queued or computing.", labels, registry=self.registry
        )
        self.auth_refused = Counter(
            "cxr_inference_auth_refused",
            "Calls refused for a missing or invalid bearer token, by RPC method.",
            ("method",),
            registry=self.registry,
        )

    def record_failure(self, model: str, version: str, reason: str) -> None:
        self.failure.labels(model or "", version or "", reason).inc()

    def for_version(self, model: str, version: str) -> VersionMeters:
        """The labelled series of one model version, looked up once (not on every request)."""
        labels = (model, version)
        return VersionMeters(
            self.request_seconds.labels(*labels),
            self.queue_seconds.labels(*labels),
            self.compute_seconds.labels(*labels),
            self.batch_size.labels(*labels),
            self.success.labels(*labels),
            self.pending.labels(*labels),
        )


@dataclass(frozen=True)
class VersionMeters:
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    success: Counter
    pending: Gauge

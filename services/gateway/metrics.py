"""The gateway's Prometheus metrics. Labels carry only our own bounded values (model names the upstream
knows, versions, status codes, class names, formats, reason codes): never request data or patient identity."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 1 ms to 30 s: decode of a small PNG is ~1 ms, a large JPEG 2000 DICOM ~1 s.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BYTES = tuple(float(2**k) for k in range(10, 27, 2))  # 1 KiB .. 64 MiB
OOD_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 64.0)  # ood_score is in units of its threshold
PIXELS = (65_536.0, 262_144.0, 1_048_576.0, 4_194_304.0, 9_437_184.0, 16_777_216.0, 41_943_040.0)


class GatewayMetrics:
    """All gateway metrics in one registry (one per gateway, so tests can run several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cxr_gateway_requests",
            "Classify requests answered, by model, version and gRPC status code",
            ["model", "version", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "cxr_gateway_request_seconds",
            "Total time of a Classify request inside the gateway",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "cxr_gateway_decode_seconds",
            "Time to decode image bytes to grayscale pixels",
            ["format"],
            buckets=SECONDS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "cxr_gateway_preprocess_seconds", "Time to resize pixels to the model's input", buckets=SECONDS, registry=r
        )
        self.upstream_seconds = Histogram(
            "cxr_gateway_upstream_seconds",
            "Time of the inference call as the gateway waited for it",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.in_flight = Gauge("cxr_gateway_in_flight_requests", "Classify requests being processed now", registry=r)
        self.predictions = Counter(
            "cxr_gateway_predictions",
            "Top-class predictions returned, by model and class",
            ["model", "class_name"],
            registry=r,
        )
        self.input_bytes = Histogram(
            "cxr_gateway_input_bytes", "Size of the image bytes received", ["format"], buckets=BYTES, registry=r
        )
        self.input_pixels = Histogram(
            "cxr_gateway_input_pixels",
            "Decoded image size in pixels (width x height)",
            ["format"],
            buckets=PIXELS,
            registry=r,
        )
        self.image_errors = Counter(
            "cxr_gateway_image_errors",
            "Images refused by the reader or the input gate, by reason",
            ["reason"],
            registry=r,
        )
        self.gate_notices = Counter(
            "cxr_gateway_input_gate_notices",
            "Input-gate findings answered with a notice instead of a refusal (gate_as_notice), by reason",
            ["reason"],
            registry=r,
        )
        self.ood_score = Histogram(
            "cxr_gateway_ood_score",
            "The input gate's out-of-distribution score of answered and refused images (1.0: the fitted threshold)",
            ["model"],
            buckets=OOD_BUCKETS,
            registry=r,
        )
        self.indeterminate = Counter(
            "cxr_gateway_indeterminate",
            "Answers below the model's operating point (indeterminate), by model",
            ["model"],
            registry=r,
        )
        self.upstream_ready = Gauge(
            "cxr_gateway_upstream_ready", "1 when the inference service reports ready", registry=r
        )
        self.upstream_retries = Counter(
            "cxr_gateway_upstream_retries", "Upstream calls retried after UNAVAILABLE", registry=r
        )
        self.auth_refused = Counter(
            "cxr_gateway_auth_refused",
            "Calls refused for a missing or invalid bearer token, by RPC method",
            ["method"],
            registry=r,
        )

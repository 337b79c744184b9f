"""The gateway's settings: environment variables CXR_GATEWAY_<FIELD>, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_GATEWAY_", use_attribute_docstrings=True, extra="ignore")

    inference: str = "localhost:8001"
    """HOST:PORT of the KServe v2 gRPC inference service (ours or NVIDIA Triton)."""
    host: str = "0.0.0.0"
    """Address the gateway's gRPC server binds to."""
    port: int = 50051
    """Port of the gateway's gRPC API (0 picks a free port)."""
    http_port: int = 8080
    """Port of the gateway's HTTP/JSON API and upload page (same TLS and tokens as gRPC); 0 picks a free port, -1 turns it off."""
    metrics_port: int = 9090
    """HTTP port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off."""
    default_model: str = "ensemble"
    """Model used when a request names none."""

    max_image_bytes: int = 32 * 1024 * 1024
    """Largest accepted image in bytes (the gRPC message limit is set just above it)."""
    max_image_pixels: int = 40_000_000
    """Largest accepted image in pixels, checked from headers before decoding (decompression bombs)."""
    decode_workers: int = 2
    """Threads that decode and resize images (CPU-bound work kept off the event loop)."""
    decode_processes: int = 0
    """Worker processes that decode images instead of threads (0: threads): a decoder crash costs a worker, not the gateway."""
    max_in_flight: int = 64
    """Requests processed at once; beyond that new ones get RESOURCE_EXHAUSTED."""
    stream_window: int = 8
    """Requests of one ClassifyStream processed concurrently (answers still come back in request order)."""

    request_timeout_s: float = 30.0
    """Deadline for the upstream call when the caller sets none."""
    upstream_retries: int = 2
    """Retries of an upstream call that failed with UNAVAILABLE (never for other codes)."""
    upstream_backoff_s: float = 0.05
    """First retry delay; doubled on each further retry."""
    metadata_ttl_s: float = 30.0
    """How long model metadata (classes, input size) is cached before it is fetched again."""
    readiness_interval_s: float = 1.0
    """How often the gateway checks the inference service's readiness."""
    lb_policy: str = "round_robin"
    """gRPC load-balancing policy for a target the gateway does not resolve itself (unix:, xds:); others get one channel per address."""
    upstream_tls: bool = False
    """Use TLS to the inference service."""
    upstream_ca: Path | None = None
    """CA certificate that verifies the inference service (system roots when unset)."""
    upstream_cert: Path | None = None
    """Client certificate for mutual TLS to the inference service."""
    upstream_key: Path | None = None
    """Private key of upstream_cert."""
    upstream_token: str = ""
    """Bearer token sent to the inference service (when it requires one)."""

    tls_cert: Path | None = None
    """Server certificate (PEM): enables TLS on the gateway port together with tls_key."""
    tls_key: Path | None = None
    """Private key of tls_cert (PEM)."""
    tls_client_ca: Path | None = None
    """CA that client certificates must chain to: enables mutual TLS."""
    auth_token_file: Path | None = None
    """File with accepted bearer tokens, one per line: enables token authentication."""
    auth_tokens: str = ""
    """Accepted bearer tokens, comma-separated (e.g. from a secret): enables token authentication."""

    gate_as_notice: str = ""
    """Input-gate reasons answered with a notice instead of a refusal: comma-separated (not_radiograph, not_chest, lateral_view, out_of_distribution) or all."""
    model_repository: Path | None = None
    """Optional model repository the gateway can read: model card metrics and sha256 (for Triton upstreams)."""
    log_level: str = "INFO"
    """Log level of the JSON-lines log on stderr."""
    shutdown_grace_s: float = 5.0
    """Seconds in-flight calls get to finish on SIGTERM (after the drain delay)."""
    drain_delay_s: float = 0.0
    """On SIGTERM: seconds to keep answering with readiness false before draining, so load balancers notice."""

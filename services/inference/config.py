"""Settings of the inference service: `CXR_INFERENCE_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class InferenceSettings(BaseSettings):
    """Everything `cxr serve inference` can be told. Per-model settings live in each model's config.pbtxt."""

    model_config = SettingsConfigDict(env_prefix="CXR_INFERENCE_", extra="ignore", use_attribute_docstrings=True)

    repository: Path = Path("model_repository")
    """The model repository folder (Triton layout)."""
    host: str = "127.0.0.1"
    """Address the gRPC and metrics servers listen on: loopback by default; 0.0.0.0 (as the deploy files set) for all."""
    port: int = 8001
    """gRPC port (KServe v2 / Triton protocol, health, reflection); 0 picks a free port."""
    http_port: int = 8000
    """HTTP/REST port (KServe v2 REST with Triton's paths and binary tensors); 0 picks a free port, -1 turns it off."""
    metrics_port: int = 8002
    """HTTP port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off."""
    model_control: Literal["none", "explicit"] = "none"
    """Triton's model control mode: `none` loads every model at start; `explicit` loads at run time on request."""
    load_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """With model_control=explicit: models to load at start (`*` for all)."""
    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """onnxruntime execution providers in order; empty: CUDA first where a GPU is usable, else CPU."""
    intra_op_threads: int = 0
    """onnxruntime threads inside one operator, per instance, unless a model's config.pbtxt sets
    intra_op_thread_count (0: the CPUs this process may use, cgroup-aware, divided by the model's instances)."""
    inter_op_threads: int = 0
    """onnxruntime threads across operators (0: onnxruntime's default)."""
    spin_wait: bool = False
    """Let idle onnxruntime threads spin for work; off by default: spinning takes the cores the event loop needs."""
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    """onnxruntime graph optimisation level, unless a model's config sets optimization.graph.level."""
    compute_threads: int = 0
    """Worker threads that run onnxruntime so the event loop stays free (0: 4)."""
    warmup: bool = True
    """Run each model once on zeros before reporting it ready."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    grace_period_s: float = 10.0
    """On SIGTERM: how long queued and running requests may take to finish before the server stops."""
    drain_delay_s: float = 0.0
    """On SIGTERM: how long to keep answering (readiness false) before draining, so load balancers notice."""
    log_level: str = "INFO"
    """Python logging level."""
    log_successes: bool = False
    """Log a line for every successful inference too (failures always get one). Off by default, as in Triton: the
    gateway logs every request it answers, and a line per image costs this server's event loop about 0.1 ms."""
    tls_cert: Path | None = None
    """Server certificate (PEM): enables TLS on the gRPC port together with tls_key."""
    tls_key: Path | None = None
    """Private key of tls_cert (PEM)."""
    tls_client_ca: Path | None = None
    """CA that client certificates must chain to: enables mutual TLS."""
    auth_token_file: Path | None = None
    """File with accepted bearer tokens, one per line: enables token authentication."""
    auth_tokens: str = ""
    """Accepted bearer tokens, comma-separated (e.g. from a secret): enables token authentication."""
    auth_scope: Literal["all", "control"] = "all"
    """With tokens: `all` RPCs need one (health exempt), or only the repository `control` RPCs (load, unload)."""

    @field_validator("load_models", "providers", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        # Environment variables give "a,b"; flags and code give lists.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

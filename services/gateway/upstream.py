"""KServe v2 (Open Inference Protocol) gRPC client to the inference service: ours or NVIDIA Triton.

- Model metadata (input name and size, classes, demo flag) comes from ModelMetadata + ModelConfig and is
  cached for `metadata_ttl_s`, then fetched again.
- Images travel as uint8 `[1, 1, H, W]` in `raw_input_contents` (about 50 KB at 224x224).
- Every call carries a deadline (the caller's remaining time); UNAVAILABLE (and a CANCELLED the caller did not
  cause) is retried on another replica, or with exponential backoff on the same one, while that deadline
  allows; no other code is retried.
- A background loop polls ServerReady on every replica (`replicas.py`); `ready` is true while any replica is
  ready, and the channels' reconnect backoff is capped so readiness comes back within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from cxr import datatypes
from cxr.generated.inference import grpc_service_pb2 as pb
from services.common.errors import ServiceError
from services.common.security import bearer_metadata, channel_credentials
from services.gateway.config import GatewaySettings
from services.gateway.replicas import ReplicaHung, ReplicaSet

log = logging.getLogger("cxr.gateway.upstream")

PROBABILITIES, CAM, OOD_SCORE = "probabilities", "cam", "ood_score"
# Status codes passed through to the gateway's caller as they are; anything else is the gateway's INTERNAL.
PASSED_THROUGH = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}  # (never CANCELLED: a caller reads it as its own doing; _call retries it and answers UNAVAILABLE)


class UpstreamError(ServiceError):
    """An upstream failure, already mapped to the status code the gateway answers with; reason upstream_<code>."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message, "upstream_" + code.name.lower())


@dataclass(frozen=True)
class ModelSpec:
    """What the gateway needs to know about one model (version) to call it and explain its answer."""

    name: str
    versions: tuple[str, ...]
    input_name: str
    input_size: int
    classes: tuple[str, ...]
    outputs: frozenset[str]
    synthetic_demo: bool = False
    architecture: str = ""
    ood_threshold: float | None = None  # config parameter cxr.ood_threshold (the input gate; with an ood_score output)
    operating_point: float | None = None  # config parameter cxr.operating_point (below it: indeterminate)
    fetched_at: float = field(default_factory=time.monotonic, compare=False)


@dataclass
class InferResult:
    probabilities: np.ndarray  # float32 [C]
    cam: np.ndarray | None  # float32 [C, h, w]
    model_version: str
    model_sha256: str
    ood_score: float | None = None  # the model's ood_score output, when it has one


def _parameter(config, key: str) -> str:
    param = config.parameters.get(key)
    return param.string_value if param is not None else ""


def _float_parameter(config, key: str) -> float | None:
    """A numeric config parameter; None when absent or not a finite number."""
    try:
        value = float(_parameter(config, key)) if config is not None else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) else None


def _square_size(shape) -> int:
    dims = [int(d) for d in shape]
    if len(dims) >= 2 and dims[-1] == dims[-2] and dims[-1] > 0:
        return dims[-1]
    return 0


class InferenceClient:
    def __init__(
        self,
        settings: GatewaySettings,
        on_readiness: Callable[[bool], None] | None = None,
        on_retry: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self._on_retry = on_retry
        self.ready = False
        self._on_readiness = on_readiness
        self._cache: dict[tuple[str, str], ModelSpec] = {}
        self._metadata = bearer_metadata(settings.upstream_token) if settings.upstream_token else []
        limit = max(settings.max_image_bytes, 16 * 1024 * 1024) + 1024 * 1024
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # reconnect quickly once the inference service is back (the default backoff grows to 2 minutes)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # a headless Service (dns:///inference:8001) resolves to one address per pod: balance per call
            ("grpc.lb_policy_name", settings.lb_policy),
        ]
        credentials = None
        if settings.upstream_tls or settings.upstream_ca or settings.upstream_cert:
            credentials = channel_credentials(settings.upstream_ca, settings.upstream_cert, settings.upstream_key)

        def make_channel(target: str, tls_name: str | None) -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=options)
            # a channel to one resolved address still verifies the certificate against the configured host name
            extra = [("grpc.ssl_target_name_override", tls_name)] if tls_name else []
            return grpc.aio.secure_channel(target, credentials, options=options + extra)

        self.replicas = ReplicaSet(
            settings.inference,
            make_channel,
            self._metadata,
            check_timeout_s=min(1.0, max(0.2, settings.readiness_interval_s)),
        )
        self._poller: asyncio.Task | None = None
        self._fetching: dict[tuple[str, str], asyncio.Future] = {}

    # ---- lifecycle and readiness -------------------------------------------------------------------
    async def start(self) -> None:
        await self.check_ready()
        self._poller = asyncio.create_task(self._poll_readiness())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.replicas.close()

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            log.info(
                "inference service readiness changed",
                extra={"fields": {"ready": ready, "target": self.settings.inference}},
            )
        self.ready = ready
        if self._on_readiness:
            self._on_readiness(ready)

    async def check_ready(self) -> bool:
        """Re-resolve the target and check every replica: ready when any replica is."""
        await self.replicas.refresh()
        self._set_ready(self.replicas.ready)
        return self.ready

    async def _poll_readiness(self) -> None:
        while True:
            await asyncio.sleep(self.settings.readiness_interval_s)
            await self.check_ready()

    # ---- calls with deadline and retry -------------------------------------------------------------
    async def _call(self, method: str, request, deadline: float):
        """Call `method` before the monotonic `deadline` on the best replica, retrying a refusal on another one.

        Retried (at most `upstream_retries` times): UNAVAILABLE (down, starting or draining), CANCELLED that our
        caller did not cause (a replica stopping under the call; our own cancellation raises CancelledError
        instead) and calls abandoned on a replica that hung. An untried replica is called at once, the same one
        again only after a backoff. Every other code is answered as it is."""
        backoff = self.settings.upstream_backoff_s
        attempt = 0
        tried: set = set()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the inference call")
            replica, _ = self.replicas.pick(tried)
            if replica is None:
                why = (
                    "not responding (its readiness checks time out): not waiting for it"
                    if self.replicas.replicas
                    else "not resolvable to any address"
                )
                raise UpstreamError(
                    grpc.StatusCode.UNAVAILABLE, f"inference service at {self.settings.inference} is {why}"
                )
            try:
                return await replica.call(method, request, remaining, self._metadata)
            except ReplicaHung:
                failure = UpstreamError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"inference replica {replica.address} stopped responding during the call",
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.CANCELLED:
                    failure = UpstreamError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"inference replica {replica.address} "
                        f"cancelled the call (shutting down?): {exc.details() or ''}",
                    )
                elif code == grpc.StatusCode.UNAVAILABLE and not _means_unknown_model(exc.details()):
                    failure = _mapped(exc, self.settings.inference)
                else:
                    raise _mapped(exc, self.settings.inference) from None
            self.replicas.refused(replica)
            tried.add(replica)
            if attempt >= self.settings.upstream_retries:
                raise failure
            _, fresh = self.replicas.pick(tried)
            if not fresh and deadline - time.monotonic() <= backoff:
                raise failure  # every replica tried and no room left for the backoff: not a retry
            attempt += 1
            if self._on_retry:
                self._on_retry()
            if not fresh:  # every replica tried: wait before calling one again
                await asyncio.sleep(backoff)
                backoff *= 2

    # ---- model metadata ----------------------------------------------------------------------------
    async def model(self, name: str, version: str, deadline: float) -> ModelSpec:
        """Metadata of `name` (version "" = the newest ready one), from the cache while fresh.

        Concurrent callers of a model whose metadata is missing or stale share one fetch."""
        key = (name, version)
        cached = self._cache.get(key)
        if cached and time.monotonic() - cached.fetched_at < self.settings.metadata_ttl_s:
            return cached
        pending = self._fetching.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_model(name, version, deadline))
            self._fetching[key] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(key, None))
        # shield: one caller giving up (cancelled) must not cancel the fetch the others wait for
        return await asyncio.shield(pending)

    def forget(self, name: str, version: str) -> None:
        """Drop cached metadata (after the model failed in a way that may mean it changed or went away)."""
        self._cache.pop((name, version), None)

    async def _fetch_model(self, name: str, version: str, deadline: float) -> ModelSpec:
        key = (name, version)
        meta = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), deadline)
        try:
            config = (
                await self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version), deadline)
            ).config
        except UpstreamError as exc:
            if exc.code != grpc.StatusCode.INTERNAL:
                raise
            config = None  # a plain KServe server without Triton's ModelConfig extension
        images = [t for t in meta.inputs if t.datatype == "UINT8"] or list(meta.inputs)
        if not images:
            raise UpstreamError(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} declares no input tensor")
        size = 0
        if config is not None and _parameter(config, "cxr.image_size").isdigit():
            size = int(_parameter(config, "cxr.image_size"))
        size = size or _square_size(images[0].shape)
        if not size:
            raise UpstreamError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {name!r} has no square image input (shape {list(images[0].shape)})",
            )
        classes = (
            [c.strip() for c in _parameter(config, "cxr.classes").split(",") if c.strip()] if config is not None else []
        )
        outputs = frozenset(t.name for t in meta.outputs)
        if PROBABILITIES not in outputs:
            raise UpstreamError(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} has no {PROBABILITIES!r} output")
        if not classes:
            width = next(t.shape[-1] for t in meta.outputs if t.name == PROBABILITIES)
            classes = [f"class_{i}" for i in range(max(int(width), 0))]
        spec = ModelSpec(
            name=meta.name or name,
            versions=tuple(meta.versions),
            input_name=images[0].name,
            input_size=size,
            classes=tuple(classes),
            outputs=outputs,
            synthetic_demo=config is not None and _parameter(config, "cxr.synthetic_demo").lower() == "true",
            architecture=_parameter(config, "cxr.architecture") if config is not None else "",
            ood_threshold=_float_parameter(config, "cxr.ood_threshold"),
            operating_point=_float_parameter(config, "cxr.operating_point"),
        )
        self._cache[key] = spec
        return spec

    async def model_ready(self, name: str, deadline: float) -> bool:
        try:
            return bool((await self._call("ModelReady", pb.ModelReadyRequest(name=name), deadline)).ready)
        except UpstreamError:
            return False

    async def model_names(self, deadline: float) -> dict[str, list[str]]:
        """Model name -> versions, from the repository index (a Triton extension our service also serves)."""
        index = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(), deadline)
        names: dict[str, list[str]] = {}
        for entry in index.models:
            versions = names.setdefault(entry.name, [])
            if entry.version and entry.version not in versions:
                versions.append(entry.version)
        return names

    # ---- inference ---------------------------------------------------------------------------------
    async def infer(
        self, spec: ModelSpec, version: str, pixels: np.ndarray, want_cam: bool, request_id: str, deadline: float
    ) -> InferResult:
        """Classify one uint8 [H, W] image already resized to the model's input."""
        request = pb.ModelInferRequest(model_name=spec.name, model_version=version, id=request_id)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = spec.input_name, "UINT8"
        tensor.shape.extend([1, 1, *pixels.shape])
        request.raw_input_contents.append(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
        request.outputs.add().name = PROBABILITIES
        if want_cam and CAM in spec.outputs:
            request.outputs.add().name = CAM
        if OOD_SCORE in spec.outputs:
            request.outputs.add().name = OOD_SCORE
        try:
            response = await self._call("ModelInfer", request, deadline)
        except UpstreamError as exc:
            if exc.code not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ):
                self.forget(spec.name, version)  # unloaded, or reloaded with other inputs: fetch again next time
            raise
        tensors = _output_tensors(response)
        if PROBABILITIES not in tensors:
            raise UpstreamError(grpc.StatusCode.INTERNAL, "the inference response has no probabilities")
        probabilities = tensors[PROBABILITIES].reshape(-1)
        if probabilities.size != len(spec.classes):
            raise UpstreamError(
                grpc.StatusCode.INTERNAL,
                f"model {spec.name!r} returned {probabilities.size} probabilities for {len(spec.classes)} classes",
            )
        cam = tensors.get(CAM)
        if cam is not None:
            cam = cam.reshape(cam.shape[-3:])
        sha = response.parameters.get("model_sha256")
        ood = tensors.get(OOD_SCORE)
        return InferResult(
            ood_score=float(ood.reshape(-1)[0]) if ood is not None and ood.size == 1 else None,
            probabilities=probabilities.astype(np.float32),
            cam=cam,
            model_version=response.model_version or version,
            model_sha256=sha.string_param if sha is not None else "",
        )


# the output datatypes read as numbers (BYTES, e.g. classification strings, and BOOL are not ours to read)
NUMERIC = {d.name for d in datatypes.DATATYPES if d.dtype is not None and d.name != "BOOL"}


def _output_tensors(response) -> dict[str, np.ndarray]:
    """Numeric output tensors by name as float32, from raw_output_contents (parallel to outputs) or typed contents."""
    result = {}
    for i, tensor in enumerate(response.outputs):
        kind = datatypes.by_name(tensor.datatype) if tensor.datatype in NUMERIC else None
        if kind is None:
            continue
        raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else None
        try:
            array = datatypes.to_array(
                kind.name, tensor.shape, raw=raw, contents=tensor.contents, tensor=f"output {tensor.name!r}"
            )
        except datatypes.TensorError as exc:
            raise UpstreamError(grpc.StatusCode.INTERNAL, f"the inference response is malformed: {exc}") from None
        result[tensor.name] = array.astype(np.float32)
    return result


def _means_unknown_model(details: str | None) -> bool:
    """Triton answers an unknown model with UNAVAILABLE 'Request for unknown model ...': that is NOT_FOUND."""
    text = (details or "").lower()
    return "unknown model" in text or ("not found" in text and "model" in text)


def _mapped(exc: grpc.aio.AioRpcError, target: str) -> UpstreamError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and _means_unknown_model(details):
        return UpstreamError(grpc.StatusCode.NOT_FOUND, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return UpstreamError(code, f"inference service at {target} is unavailable: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and "version" in details.lower():
        return UpstreamError(grpc.StatusCode.NOT_FOUND, details)  # some servers answer an unknown version so
    if code in PASSED_THROUGH:
        return UpstreamError(code, details)
    return UpstreamError(grpc.StatusCode.INTERNAL, f"inference service error {code.name}: {details}")

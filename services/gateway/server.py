"""The cxr.v1 gateway: decode the image, resize it to the model's input, ask the inference service, answer.

One request = one answer (a response or a status), one log line and one count in the request metrics.
CPU-bound decoding runs on a small thread pool so the event loop keeps answering other calls.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc as pb_grpc
from cxr.imaging import DecodedImage, ImageError, ImageLimits, read_image, resize_for_model
from services.common.errors import ServiceError, aborts_on_error
from services.common.logging import log_request
from services.common.serving import STARTING, Lifecycle
from services.gateway import input_gate
from services.gateway.config import GatewaySettings
from services.gateway.decode_pool import DecodePool
from services.gateway.heatmap import overlay_png
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import InferenceClient, InferResult, ModelSpec, UpstreamError

log = logging.getLogger("cxr.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name  # "cxr.v1.Gateway"
NOT_FOR_CLINICAL_USE = "not for clinical use: research software, not a medical device"
SYNTHETIC_DEMO = "synthetic demo model: trained on generated phantoms, its answers say nothing about a radiograph"
FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: None,
    pb.IMAGE_FORMAT_DICOM: "dicom",
    pb.IMAGE_FORMAT_PNG: "png",
    pb.IMAGE_FORMAT_JPEG: "jpeg",
}
# Beyond the configured size limits is "too large" (as gRPC's own message limit answers); other reader refusals are bad input.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_VERSION = re.compile(r"^[0-9]{0,18}$")


@dataclass
class _Trace:
    """What one request's log line and metrics record (our own values only: no identifiers, no pixels)."""

    method: str
    request_id: str
    model: str = "-"
    version: str = ""
    code: str = "OK"
    reason: str | None = None
    format: str | None = None
    input_bytes: int = 0
    width: int | None = None
    height: int | None = None
    ms: dict[str, float] = field(default_factory=dict)
    top_class: str | None = None
    notices: int | None = None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class GatewayService(pb_grpc.GatewayServicer):
    def __init__(
        self, settings: GatewaySettings, upstream: InferenceClient, metrics: GatewayMetrics, lifecycle: Lifecycle
    ):
        self.settings = settings
        self.lifecycle = lifecycle
        self.upstream = upstream
        self.metrics = metrics
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.executor = ThreadPoolExecutor(max_workers=max(1, settings.decode_workers), thread_name_prefix="decode")
        self.decode_pool = DecodePool(settings.decode_processes, self.limits) if settings.decode_processes > 0 else None
        self.gate_as_notice = input_gate.parse_notice_only(settings.gate_as_notice)
        self._model_cards: dict[tuple[str, str], dict] = {}  # a version folder never changes: read each card once
        # PIL's own bomb guard must not undercut a larger configured limit (ours is checked first anyway)
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_image_pixels)

    # ---- RPCs -------------------------------------------------------------------------------------
    @aborts_on_error
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        return await self._classify(request, context.time_remaining(), "Classify")

    async def ClassifyStream(self, request_iterator, context) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Up to `stream_window` requests in progress at once; answers go back in request order."""
        window: asyncio.Queue = asyncio.Queue(maxsize=max(1, self.settings.stream_window))

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    await window.put(asyncio.create_task(self._classify_item(request, context)))
            except asyncio.CancelledError:
                raise  # the answering side is gone: nobody to tell
            except Exception as exc:  # reading the request stream failed: answer what was accepted, then fail
                await window.put(exc)
                return
            await window.put(None)  # end of the request stream

        feeder = asyncio.create_task(feed())
        try:
            while (item := await window.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield await item
        finally:
            feeder.cancel()
            while not window.empty():
                pending = window.get_nowait()
                if pending is not None:
                    pending.cancel()

    @aborts_on_error
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        deadline = self._deadline(context.time_remaining())
        try:
            names = await self.upstream.model_names(deadline)
        except UpstreamError as exc:
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            names = {self.settings.default_model: []}  # an upstream without the repository index extension
        response = pb.ListModelsResponse()
        for name in sorted(names):
            info = response.models.add(name=name, is_default=name == self.settings.default_model)
            info.ready = await self.upstream.model_ready(name, deadline)
            try:
                spec = await self.upstream.model(name, "", deadline)
            except UpstreamError:
                spec = None
            versions = list(spec.versions) if spec and spec.versions else names[name]
            info.versions.extend(sorted(set(versions), key=lambda v: (len(v), v)))
            if spec:
                info.classes.extend(spec.classes)
                info.input_size = spec.input_size
                info.synthetic_demo = spec.synthetic_demo
                info.architecture = spec.architecture
            card = self._model_card(name, info.versions[-1] if info.versions else "")
            for key, value in _numbers(card.get("metrics", {})).items():
                info.metrics[key] = value
        return response

    # ---- one classification ------------------------------------------------------------------------
    async def _classify_item(self, request: pb.ClassifyRequest, context) -> pb.ClassifyStreamResponse:
        try:
            response = await self._classify(request, context.time_remaining(), "ClassifyStream")
            return pb.ClassifyStreamResponse(request_id=response.request_id, response=response)
        except ServiceError as exc:
            error = pb.Error(code=exc.code.value[0], code_name=exc.code.name, message=exc.message, reason=exc.reason)
            return pb.ClassifyStreamResponse(request_id=request.request_id, error=error)

    def _deadline(self, time_remaining: float | None) -> float:
        """Monotonic deadline: the caller's, or `request_timeout_s` when the caller set none."""
        budget = self.settings.request_timeout_s if time_remaining is None else time_remaining
        return time.monotonic() + budget

    async def _classify(
        self, request: pb.ClassifyRequest, time_remaining: float | None, method: str
    ) -> pb.ClassifyResponse:
        started = time.perf_counter()
        trace = _Trace(method=method, request_id=request.request_id or uuid.uuid4().hex, input_bytes=len(request.image))
        self.metrics.in_flight.inc()
        try:
            if not self.lifecycle.admitting:
                starting = self.lifecycle.state == STARTING
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the gateway is {'starting' if starting else 'shutting down'}: retry on another replica",
                    "starting" if starting else "shutting_down",
                )
            if self.lifecycle.in_flight >= self.settings.max_in_flight:  # the admitted ones (this one not yet)
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the gateway is busy ({self.settings.max_in_flight} requests in progress): retry later",
                    "busy",
                )
            with self.lifecycle.track():
                response = await self._run(request, trace, self._deadline(time_remaining))
            trace.ms["total_ms"] = _ms(time.perf_counter() - started)
            response.timings.total_ms = trace.ms["total_ms"]
            return response
        except ServiceError as exc:
            trace.code, trace.reason = exc.code.name, exc.reason
            raise
        except asyncio.CancelledError:
            trace.code = "CANCELLED"
            raise
        except Exception as exc:  # a bug of ours: answered INTERNAL, logged by type only (messages may quote input)
            trace.code, trace.reason = "INTERNAL", type(exc).__name__
            log.error(
                "internal error", extra={"fields": {"request_id": trace.request_id, "exc_type": type(exc).__name__}}
            )
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"internal gateway error ({type(exc).__name__})", "internal"
            ) from None
        finally:
            self.metrics.in_flight.dec()
            self._record(trace, time.perf_counter() - started)

    async def _run(self, request: pb.ClassifyRequest, trace: _Trace, deadline: float) -> pb.ClassifyResponse:
        if request.format not in FORMATS:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown image format value {request.format}", "bad_format"
            )
        name = request.model_name or self.settings.default_model
        version = request.model_version
        if not MODEL_NAME.match(name):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "model_name must be 1-128 letters, digits, '_', '.' or '-'",
                "bad_model_name",
            )
        if not MODEL_VERSION.match(version):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "model_version must be empty or a number", "bad_model_version"
            )

        # decode first: a bad image is refused as such whatever the upstream's state
        loop = asyncio.get_running_loop()
        if self.decode_pool is not None:
            try:
                decoded, decode_s = await self.decode_pool.decode(request.image, FORMATS[request.format])
            except ImageError as exc:
                raise self._refusal(exc) from None
        else:
            decoded, decode_s = await loop.run_in_executor(
                self.executor, self._decode, request.image, FORMATS[request.format]
            )
        trace.format, (trace.height, trace.width) = decoded.format, decoded.pixels.shape
        trace.ms["decode_ms"] = _ms(decode_s)
        self.metrics.decode_seconds.labels(decoded.format).observe(decode_s)
        self.metrics.input_bytes.labels(decoded.format).observe(len(request.image))
        self.metrics.input_pixels.labels(decoded.format).observe(decoded.pixels.size)
        gate_notices = self._gate(input_gate.header_refusals(decoded.header))  # refused before any inference

        spec = await self.upstream.model(name, version, deadline)
        trace.model = spec.name
        if decoded.pixels.shape == (spec.input_size, spec.input_size):  # already the model's size: no thread hop
            pixels, preprocess_s = decoded.pixels, 0.0
        else:
            pixels, preprocess_s = await loop.run_in_executor(
                self.executor, _timed_resize, decoded.pixels, spec.input_size
            )
        trace.ms["preprocess_ms"] = _ms(preprocess_s)
        self.metrics.preprocess_seconds.observe(preprocess_s)

        upstream_started = time.perf_counter()
        result = await self.upstream.infer(spec, version, pixels, request.return_heatmap, trace.request_id, deadline)
        upstream_s = time.perf_counter() - upstream_started
        trace.version, trace.ms["upstream_ms"] = result.model_version, _ms(upstream_s)
        self.metrics.upstream_seconds.labels(spec.name).observe(upstream_s)
        gate_notices += self._gate_pixels(spec, result)
        response = self._response(request, trace, spec, decoded, result, gate_notices)
        response.timings.decode_ms, response.timings.preprocess_ms = trace.ms["decode_ms"], trace.ms["preprocess_ms"]
        response.timings.inference_ms = trace.ms["upstream_ms"]
        if request.return_heatmap:
            if result.cam is None:
                response.notices.append("heatmap not available: this model has no class activation output")
            else:
                cam = result.cam[spec.classes.index(response.top_class)]
                png = await loop.run_in_executor(self.executor, overlay_png, decoded.pixels, cam)
                response.heatmap.CopyFrom(
                    pb.Heatmap(
                        label=response.top_class,
                        png=png,
                        height=cam.shape[0],
                        width=cam.shape[1],
                        values=cam.reshape(-1).tolist(),
                    )
                )
        trace.top_class, trace.notices = response.top_class, len(response.notices)
        return response

    def _decode(self, data: bytes, fmt: str | None) -> tuple[DecodedImage, float]:
        started = time.perf_counter()
        try:
            decoded = read_image(data, fmt, self.limits)
        except ImageError as exc:
            raise self._refusal(exc) from None
        return decoded, time.perf_counter() - started

    def _gate(self, refusals: list[input_gate.Refusal]) -> list[str]:
        """Raise the first refusal the settings do not turn into a notice; return the notices of the others."""
        notices = []
        for refusal in refusals:
            if refusal.reason not in self.gate_as_notice:
                self.metrics.image_errors.labels(refusal.reason).inc()
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, refusal.message, refusal.reason)
            self.metrics.gate_notices.labels(refusal.reason).inc()
            notices.append(refusal.notice)
        return notices

    def _gate_pixels(self, spec: ModelSpec, result: InferResult) -> list[str]:
        """The out-of-distribution check on the model's own score (models without one are served with a notice)."""
        if result.ood_score is None:
            return [input_gate.NO_GATE_NOTICE]
        self.metrics.ood_score.labels(spec.name).observe(result.ood_score)
        if spec.ood_threshold is None:
            return [
                "no input-gate threshold for this model (config parameter cxr.ood_threshold missing): the "
                "ood_score is returned but nothing is refused"
            ]
        refusal = input_gate.ood_refusal(result.ood_score, spec.ood_threshold)
        return self._gate([refusal] if refusal else [])

    def _refusal(self, exc: ImageError) -> ServiceError:
        self.metrics.image_errors.labels(exc.reason).inc()
        # every unreadable or oversized image (bombs included) is the caller's to fix: INVALID_ARGUMENT, as issue 4
        # asks; RESOURCE_EXHAUSTED stays for load (busy, queue full) and for gRPC's own message-size limit
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"image refused ({exc.reason}): {exc}", exc.reason)

    def _response(
        self,
        request,
        trace: _Trace,
        spec: ModelSpec,
        decoded: DecodedImage,
        result: InferResult,
        gate_notices: list[str],
    ) -> pb.ClassifyResponse:
        probabilities = result.probabilities
        top = int(np.argmax(probabilities))
        response = pb.ClassifyResponse(
            request_id=trace.request_id,
            identifiers=request.identifiers,  # echoed untouched
            top_class=spec.classes[top],
            top_probability=float(probabilities[top]),
            model_name=spec.name,
            model_version=result.model_version,
            model_sha256=result.model_sha256
            or str(self._model_card(spec.name, result.model_version).get("sha256", "")),
            image_format=decoded.format,
        )
        for label, p in zip(spec.classes, probabilities):
            response.classes.add(label=label, probability=float(p))
        response.notices.extend(decoded.notices)
        response.notices.extend(gate_notices)
        if result.ood_score is not None:
            response.ood_score = result.ood_score
        if spec.ood_threshold is not None and result.ood_score is not None:
            response.ood_threshold = spec.ood_threshold
        if spec.operating_point is not None:
            response.operating_point = spec.operating_point
            if response.top_probability < spec.operating_point:
                response.indeterminate = True
                self.metrics.indeterminate.labels(spec.name).inc()
                response.notices.append(
                    f"indeterminate: the top probability {response.top_probability:.2f} is below "
                    f"the model's operating point {spec.operating_point:.2f}; read every class's "
                    "probability, not the top class"
                )
        if (notice := input_gate.age_notice(decoded.header)) is not None:
            response.notices.append(notice)
        if spec.synthetic_demo:
            response.notices.append(SYNTHETIC_DEMO)
        response.notices.append(NOT_FOR_CLINICAL_USE)
        return response

    def _model_card(self, name: str, version: str) -> dict:
        """The model card from a repository the gateway can read (optional: empty when there is none)."""
        if not self.settings.model_repository or not version.isdigit():
            return {}
        from cxr.repository import RepositoryError, read_model_card

        if (name, version) not in self._model_cards:
            try:
                self._model_cards[(name, version)] = read_model_card(self.settings.model_repository / name / version)
            except (RepositoryError, OSError, ValueError):
                return {}  # not cached: the folder may appear once the version is exported
        return self._model_cards[(name, version)]

    def _record(self, trace: _Trace, total_s: float) -> None:
        self.metrics.requests.labels(trace.model, trace.version, trace.code).inc()
        self.metrics.request_seconds.labels(trace.model).observe(total_s)
        if trace.code == "OK" and trace.top_class:
            self.metrics.predictions.labels(trace.model, trace.top_class).inc()
        trace.ms.setdefault("total_ms", _ms(total_s))
        log_request(
            log,
            request_id=trace.request_id,
            method=trace.method,
            model=trace.model,
            version=trace.version,
            code=trace.code,
            reason=trace.reason,
            format=trace.format,
            input_bytes=trace.input_bytes,
            width=trace.width,
            height=trace.height,
            top_class=trace.top_class,
            notices=trace.notices,
            **trace.ms,
        )


def _timed_resize(pixels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    resized = resize_for_model(pixels, size)
    return resized, time.perf_counter() - started


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) model-card dict as {"a.b": value}."""
    found: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and np.isfinite(tree):
        found[prefix.rstrip(".")] = float(tree)
    return found


# ---- the server process ----------------------------------------------------------------------------
class Gateway:
    """A running gateway: the gRPC server (health, reflection, optional TLS and token auth), its upstream
    client, and the /metrics endpoint. Readiness (grpc.health.v1) follows the inference service's."""

    def __init__(self, settings: GatewaySettings):
        from services.common.security import TokenAuthInterceptor, load_tokens, server_credentials
        from services.common.serving import add_health_and_reflection, create_server

        self.settings = settings
        self.metrics = GatewayMetrics()
        self.upstream = InferenceClient(
            settings, on_readiness=self._on_readiness, on_retry=self.metrics.upstream_retries.inc
        )
        tokens = load_tokens(settings.auth_token_file, settings.auth_tokens)
        limit = settings.max_image_bytes + 64 * 1024  # the image plus the request's other fields
        # one token check for both ports (gRPC here, HTTP in rest.py): the same tokens, log line and counter
        self.auth = (
            TokenAuthInterceptor(tokens, on_refused=lambda m: self.metrics.auth_refused.labels(m).inc())
            if tokens
            else None
        )
        self.server = create_server(
            limit, max_send_bytes=64 * 1024 * 1024, interceptors=[self.auth] if self.auth else []
        )
        self.lifecycle = add_health_and_reflection(self.server, [SERVICE_NAME])
        self.service = GatewayService(settings, self.upstream, self.metrics, self.lifecycle)
        pb_grpc.add_GatewayServicer_to_server(self.service, self.server)
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert and settings.tls_key:
            credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        self.security = {
            "tls": bool(settings.tls_cert),
            "mtls": bool(settings.tls_client_ca),
            "token_auth": bool(tokens),
        }
        self.metrics_port = 0
        self.http = None  # the HTTP server (services/gateway/rest.py), once started
        self._tasks: set[asyncio.Task] = set()

    def _on_readiness(self, ready: bool) -> None:
        self.metrics.upstream_ready.set(1 if ready else 0)
        if ready != self.lifecycle.dependency_ready:  # (a draining gateway stays not ready: the lifecycle says so)
            task = asyncio.get_running_loop().create_task(self.lifecycle.set_dependency_ready(ready))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        from services.common.serving import SERVING, start_metrics_server

        self.lifecycle.dependency_ready = False
        await self.lifecycle.publish()
        if self.service.decode_pool is not None:
            self.service.decode_pool.warm_up()  # before serving: the first requests need not wait for worker start-up
        self.metrics_port = start_metrics_server(self.settings.metrics_port, self.metrics.registry, self.settings.host)
        await self.server.start()
        from services.gateway.rest import start_http

        self.http = await start_http(self)  # the HTTP/JSON API and the upload page, over the same service
        await self.upstream.start()
        self.lifecycle.dependency_ready = self.upstream.ready
        await self.lifecycle.to(SERVING)
        log.info(
            "gateway listening",
            extra={
                "fields": {
                    "port": self.port,
                    "http_port": self.http.port if self.http else -1,
                    "metrics_port": self.metrics_port,
                    "inference": self.settings.inference,
                    "upstream_ready": self.upstream.ready,
                    "decode_processes": self.settings.decode_processes,
                    **self.security,
                }
            },
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.upstream.close()
        self.service.executor.shutdown(wait=False, cancel_futures=True)
        if self.service.decode_pool is not None:
            self.service.decode_pool.close()


async def serve(
    settings: GatewaySettings, started: asyncio.Future | None = None, stop_event: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or `stop_event`); `started` gets (grpc, metrics, http port) once listening."""
    from services.common.serving import serve_until_terminated

    gateway = Gateway(settings)
    await gateway.start()
    if started is not None and not started.done():
        started.set_result((gateway.port, gateway.metrics_port, gateway.http.port if gateway.http else -1))
    try:
        await serve_until_terminated(
            gateway.server,
            gateway.lifecycle,
            grace_period_s=settings.shutdown_grace_s,
            drain_delay_s=settings.drain_delay_s,
            stop_event=stop_event,
        )
    finally:
        await gateway.close()

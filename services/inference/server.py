"""The inference service: KServe v2 / Triton `inference.GRPCInferenceService` over onnxruntime.

Requests are validated against the model's config (datatype, shape, byte count), queued in the model version's
dynamic batcher, computed in a thread pool (the event loop stays free), and answered with exactly their own rows.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc
from services.common.errors import ServiceError, aborts_on_error, invalid, unavailable
from services.common.logging import log_request, safe_request_id
from services.common.serving import (
    SERVING,
    Lifecycle,
    add_health_and_reflection,
    create_server,
    serve_until_terminated,
    start_metrics_server,
)
from services.inference.config import InferenceSettings
from services.inference.metrics import InferenceMetrics
from services.inference.model_manager import READY, ModelManager, ModelVersion
from services.inference.rest import start_http
from services.inference.security import add_port, auth_interceptor, describe_security
from services.inference.tensors import classify, decode_inputs, encode_output, parse_requested_outputs

log = logging.getLogger("cxr.inference")

SERVER_NAME = "cxr-inference"
SERVER_VERSION = importlib.metadata.version("cxr")
# Triton's extension names for what we implement.
EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics"]
UNKNOWN = "(unknown)"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPC handlers. Every accepted request gets exactly one answer: a response or a status with a message."""

    def __init__(
        self, settings: InferenceSettings, manager: ModelManager, metrics: InferenceMetrics, lifecycle: Lifecycle
    ):
        self.settings = settings
        self.manager = manager
        self.metrics = metrics
        self.lifecycle = lifecycle

    # ---- health and metadata -----------------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.lifecycle.ready)

    async def ModelReady(self, request, context):
        if not self.lifecycle.ready:
            return pb.ModelReadyResponse(ready=False)
        try:
            self.manager.resolve(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @aborts_on_error
    async def ModelMetadata(self, request, context):
        model = self.manager.resolve(request.name, request.version)
        entry = self.manager.models[model.name]
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(entry.versions)],
            platform=model.config.platform or "onnxruntime_onnx",
        )
        for spec in model.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.full_shape(model.max_batch_size))
        for spec in model.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.full_shape(model.max_batch_size))
        return response

    @aborts_on_error
    async def ModelConfig(self, request, context):
        model = self.manager.resolve(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    @aborts_on_error
    async def ModelStatistics(self, request, context):
        if request.name:
            self.manager.resolve(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for infer
        response = pb.ModelStatisticsResponse()
        for model in self.manager.ready_versions():
            if request.name and model.name != request.name:
                continue
            if request.version and str(model.version) != request.version:
                continue
            s = model.stats
            out = response.model_stats.add(
                name=model.name,
                version=str(model.version),
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            for field_name in ("success", "fail", "queue", "compute_infer"):
                duration = getattr(s, field_name)
                getattr(out.inference_stats, field_name).CopyFrom(
                    pb.StatisticDuration(count=duration.count, ns=duration.ns)
                )
            for size, duration in sorted(s.batches.items()):
                out.batch_stats.add(
                    batch_size=size, compute_infer=pb.StatisticDuration(count=duration.count, ns=duration.ns)
                )
        return response

    # ---- the model repository ----------------------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.manager.index():
            if request.ready and state != READY:
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @aborts_on_error
    async def RepositoryModelLoad(self, request, context):
        self._check_explicit()
        await self.manager.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @aborts_on_error
    async def RepositoryModelUnload(self, request, context):
        self._check_explicit()
        await self.manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_explicit(self) -> None:
        if self.settings.model_control != "explicit":
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "model control mode is 'none': models cannot be loaded or unloaded at run time; "
                "start the server with --model-control explicit",
            )

    # ---- inference ---------------------------------------------------------------------------------------------

    @aborts_on_error
    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        try:
            return await self._infer(request, context.time_remaining())
        except ServiceError as e:
            self._log(request, e.code.name, e.reason, start)
            raise

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request of the stream is answered on the stream, in completion order; a failed request answers
        with error_message and the stream goes on. Requests run concurrently, so they batch with each other."""
        answers: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request):
            start = time.perf_counter()
            try:
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except ServiceError as e:
                self._log(request, e.code.name, e.reason, start)
                answer = pb.ModelStreamInferResponse(error_message=e.message)
            except Exception:  # noqa: BLE001 - a bug of ours: answer it, keep the stream
                log.exception("internal error in ModelStreamInfer for model %s", request.model_name)
                answer = pb.ModelStreamInferResponse(error_message="internal error in the inference server")
            if answer.error_message:
                answer.infer_response.id = request.id
                answer.infer_response.model_name = request.model_name
            await answers.put(answer)

        async def read():
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> pb.ModelInferResponse:
        """One request, admitted by the server's lifecycle and counted until it is answered (a drain waits for it)."""
        if not self.lifecycle.admitting:
            self.metrics.record_failure(UNKNOWN, UNKNOWN, "unavailable")
            what = "starting (models loading)" if self.lifecycle.state == "starting" else "shutting down"
            raise unavailable(f"the inference server is {what}; retry on another replica")
        with self.lifecycle.track():
            return await self._admitted(request, time_remaining)

    async def _admitted(self, request: pb.ModelInferRequest, time_remaining: float | None) -> pb.ModelInferResponse:
        start = time.perf_counter()
        try:
            # No await between resolving the version and queueing in its batcher: a concurrent reload cannot
            # retire the version in between, so a request that resolved a version runs on it.
            model = self.manager.resolve(request.model_name, request.model_version)
        except ServiceError as e:
            # Labelled "(unknown)": a client must not be able to create metric series with names of its choice.
            self.metrics.record_failure(UNKNOWN, UNKNOWN, e.reason)
            raise
        meters = model.meters
        pending = meters.pending
        pending.inc()
        try:
            inputs, rows = decode_inputs(request, model.inputs, model.max_batch_size, model.name)
            wanted = parse_requested_outputs(request, model.outputs, model.name)
            timeout_us = _timeout_parameter(request)
            deadline = None if time_remaining is None else time.monotonic() + time_remaining
            result = await model.batcher.infer(
                inputs, rows, {w.name for w in wanted}, deadline=deadline, timeout_us=timeout_us
            )
            response = self._response(request, model, wanted, result.outputs)
        except ServiceError as e:
            self._count_failure(model, e.reason, time.perf_counter() - start)
            raise
        except asyncio.CancelledError:
            self._count_failure(model, "cancelled", time.perf_counter() - start)
            raise
        finally:
            pending.dec()
        elapsed = time.perf_counter() - start
        meters.request_seconds.observe(elapsed)
        meters.queue_seconds.observe(result.queue_s)
        meters.success.inc()
        model.stats.success.add(elapsed)
        model.stats.queue.add(result.queue_s)
        if self.settings.log_successes:
            self._log(request, "OK", None, start, model)
        return response

    def _response(self, request, model: ModelVersion, wanted, outputs) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        response.parameters["model_sha256"].string_param = model.sha256
        specs = {s.name: s for s in model.outputs}
        for want in wanted:
            array = outputs[want.name]
            if want.classification:
                encode_output(response, want.name, classify(array, want.classification, model.labels), "BYTES")
            else:
                encode_output(response, want.name, array, specs[want.name].datatype)
        return response

    def _count_failure(self, model: ModelVersion, reason: str, elapsed: float) -> None:
        self.metrics.record_failure(model.name, str(model.version), reason)
        model.stats.fail.add(elapsed)

    def _log(self, request, code: str, reason: str | None, start: float, model: ModelVersion | None = None) -> None:
        # A name we do not serve is the client's free text: logged only after the same scrub as request ids.
        log_request(
            log,
            request_id=request.id,
            method="ModelInfer",
            model=model.name if model else safe_request_id(request.model_name),
            version=str(model.version) if model else safe_request_id(request.model_version),
            code=code,
            reason=reason,
            total_ms=round((time.perf_counter() - start) * 1e3, 2),
        )


def _timeout_parameter(request: pb.ModelInferRequest) -> int:
    """The request's `timeout` parameter in microseconds (Triton's meaning); 0 when absent."""
    if "timeout" not in request.parameters:
        return 0
    param = request.parameters["timeout"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(param, kind) < 0:
        raise invalid(f"the timeout parameter must be a non-negative integer (microseconds), received {kind}")
    return int(getattr(param, kind))


async def serve(
    settings: InferenceSettings, *, started: asyncio.Future | None = None, stop_event: asyncio.Event | None = None
) -> None:
    """Run the service until SIGTERM/SIGINT (or `stop_event`). `started` receives (grpc, metrics, http port)."""
    if not settings.repository.is_dir():
        raise SystemExit(
            f"model repository {settings.repository} is not a folder (--repository / CXR_INFERENCE_REPOSITORY)"
        )
    metrics = InferenceMetrics()
    # onnxruntime releases the GIL while it computes; the batcher bounds concurrent runs per model by its instances.
    compute = ThreadPoolExecutor(max_workers=settings.compute_threads or 4, thread_name_prefix="onnxruntime")
    manager = ModelManager(settings, metrics, compute)
    tokens = auth_interceptor(settings, metrics)
    server = create_server(settings.max_message_bytes, interceptors=[tokens] if tokens else [])
    lifecycle = add_health_and_reflection(server, [SERVICE_NAME])
    await lifecycle.publish()
    service = InferenceService(settings, manager, metrics, lifecycle)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    try:
        port = add_port(server, settings)
    except RuntimeError:
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port} (in use? --port / CXR_INFERENCE_PORT)")
    try:
        metrics_port = start_metrics_server(settings.metrics_port, metrics.registry, settings.host)
    except OSError as e:
        raise SystemExit(
            f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {e} "
            "(--metrics-port / CXR_INFERENCE_METRICS_PORT)"
        ) from None
    await server.start()  # live at once (ServerLive), ready only once the models are loaded and warmed up
    http = await start_http(service, settings, tokens)  # KServe v2 REST beside gRPC, over the same servicer
    http_port = http.port if http else -1
    log.info(
        "listening on %s:%d (HTTP on %s, metrics on %s; %s); loading models from %s",
        settings.host,
        port,
        http_port if http else "off",
        metrics_port if metrics_port >= 0 else "off",
        describe_security(settings, tokens is not None),
        settings.repository,
    )
    await manager.start()
    log.info("ready: %s", ", ".join(f"{n}:{v} {s}" + (f" ({r})" if r else "") for n, v, s, r in manager.index()))
    await lifecycle.to(SERVING)
    if started is not None and not started.done():
        started.set_result((port, metrics_port, http_port))
    try:
        await serve_until_terminated(
            server,
            lifecycle,
            grace_period_s=settings.grace_period_s,
            drain_delay_s=settings.drain_delay_s,
            stop_event=stop_event,
        )
    finally:
        if http:
            await http.stop()
        await manager.close(timeout=1.0)
        compute.shutdown(wait=False, cancel_futures=True)

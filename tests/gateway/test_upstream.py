"""The gateway's upstream client (services/gateway/upstream.py) against a scripted KServe v2 server on loopback:
which codes are retried and how often, how upstream statuses map to the gateway's, and how output tensors are read
(raw_output_contents and typed contents). A unit test of the client: the real inference service is in tests/e2e."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from cxr import datatypes
from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc
from services.common.errors import ServiceError
from services.gateway.config import GatewaySettings
from services.gateway.upstream import InferenceClient, ModelSpec, UpstreamError

CLASSES = ("Normal", "Lung_Opacity", "Viral Pneumonia")
SPEC = ModelSpec(
    name="toy",
    versions=("1",),
    input_name="image",
    input_size=4,
    classes=CLASSES,
    outputs=frozenset({"probabilities", "cam"}),
)
PROBABILITIES = np.array([[0.2, 0.5, 0.3]], np.float32)


class ScriptedInference(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer fails with the scripted (code, details) in turn, then answers `answer(request)`."""

    def __init__(self):
        self.failures: list[tuple[grpc.StatusCode, str]] = []
        self.calls = 0
        self.answer = self.raw_answer
        self.config_code: grpc.StatusCode | None = None

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        self.calls += 1
        if self.failures:
            code, details = self.failures.pop(0)
            await context.abort(code, details)
        return self.answer(request)

    async def ModelMetadata(self, request, context):
        response = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx")
        response.inputs.add(name="image", datatype="UINT8", shape=[-1, 1, 4, 4])
        response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 3])
        return response

    async def ModelConfig(self, request, context):
        if self.config_code is not None:
            await context.abort(self.config_code, "no ModelConfig here")
        response = pb.ModelConfigResponse()
        response.config.name = request.name
        response.config.parameters["cxr.classes"].string_value = ",".join(CLASSES)
        return response

    @staticmethod
    def raw_answer(request):
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 3])
        response.raw_output_contents.append(datatypes.to_raw(PROBABILITIES, "FP32"))
        return response


def _run(script, scenario, **settings):
    """Start the scripted server, run `scenario(client, server)` with a client to it, return what it returns."""

    async def main():
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(script, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        retries = []
        options = {"inference": f"127.0.0.1:{port}", "upstream_backoff_s": 0.01, **settings}
        client = InferenceClient(GatewaySettings(**options), on_retry=lambda: retries.append(1))
        await client.start()  # resolves the target's replicas and checks their readiness, as the gateway does
        try:
            return await scenario(client), len(retries)
        finally:
            await client.close()
            await server.stop(0)

    return asyncio.run(main())


def _infer(client: InferenceClient, budget: float = 10.0):
    pixels = np.zeros((4, 4), np.uint8)
    return client.infer(SPEC, "", pixels, True, "req-1", time.monotonic() + budget)


def _failure(script, **settings) -> tuple[UpstreamError, int]:
    async def scenario(client):
        with pytest.raises(UpstreamError) as failed:
            await _infer(client)
        return failed.value

    return _run(script, scenario, **settings)


def test_unavailable_is_retried_with_backoff_and_then_succeeds():
    script = ScriptedInference()
    script.failures = [(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 2
    result, retries = _run(script, _infer, upstream_retries=2)
    assert retries == 2 and script.calls == 3
    np.testing.assert_array_equal(result.probabilities, PROBABILITIES[0])
    assert result.model_version == "1" and result.cam is None


def test_unavailable_beyond_the_retries_is_unavailable_with_the_target_named():
    script = ScriptedInference()
    script.failures = [(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 5
    error, retries = _failure(script, upstream_retries=2)
    assert isinstance(error, ServiceError), "one error type: the abort decorator handles it"
    assert (error.code, error.reason, retries, script.calls) == (
        grpc.StatusCode.UNAVAILABLE,
        "upstream_unavailable",
        2,
        3,
    )
    assert "inference service at 127.0.0.1:" in error.message and "connection refused" in error.message


@pytest.mark.parametrize(
    "code, details, mapped",
    [
        (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'toy' is not found", grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.INVALID_ARGUMENT, "model 'toy' has no version 7", grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.NOT_FOUND, "unknown model 'x'", grpc.StatusCode.NOT_FOUND),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (max_queue_size 2)", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "not computed before the deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
        (grpc.StatusCode.INVALID_ARGUMENT, "expected shape [-1,1,4,4]", grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.PERMISSION_DENIED, "no", grpc.StatusCode.INTERNAL),
    ],
)
def test_other_codes_are_not_retried_and_map_to_the_gateways_status(code, details, mapped):
    script = ScriptedInference()
    script.failures = [(code, details)]
    error, retries = _failure(script, upstream_retries=3)
    assert (error.code, retries, script.calls) == (mapped, 0, 1)
    assert details in error.message
    if mapped == grpc.StatusCode.INTERNAL:
        assert f"inference service error {code.name}" in error.message


def test_no_retry_once_the_deadline_leaves_no_room_for_the_backoff():
    script = ScriptedInference()
    script.failures = [(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 5

    async def scenario(client):
        with pytest.raises(UpstreamError) as failed:
            await _infer(client, budget=0.005)
        return failed.value

    error, retries = _run(script, scenario, upstream_retries=3, upstream_backoff_s=1.0)
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and retries == 0


def test_typed_output_contents_are_read_as_well_as_raw_ones():
    def typed(request):
        response = pb.ModelInferResponse(model_name="toy", model_version="1")
        out = response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 3])
        out.contents.fp32_contents.extend(PROBABILITIES[0].tolist())
        cam = response.outputs.add(name="cam", datatype="FP64", shape=[1, 3, 2, 2])
        cam.contents.fp64_contents.extend(np.arange(12, dtype=np.float64).tolist())
        return response

    script = ScriptedInference()
    script.answer = typed
    result, _ = _run(script, _infer)
    np.testing.assert_array_equal(result.probabilities, PROBABILITIES[0])
    assert result.cam.dtype == np.float32 and result.cam.shape == (3, 2, 2) and result.cam[2, 1, 1] == 11.0


def test_a_malformed_output_is_the_gateways_internal_error():
    def short(request):
        response = ScriptedInference.raw_answer(request)
        response.raw_output_contents[0] = response.raw_output_contents[0][:-4]
        return response

    script = ScriptedInference()
    script.answer = short
    error, _ = _failure(script)
    assert error.code == grpc.StatusCode.INTERNAL and "expected 12 bytes for FP32 [1,3]" in error.message


def test_metadata_from_a_server_without_model_config_still_serves():
    script = ScriptedInference()
    script.config_code = grpc.StatusCode.UNIMPLEMENTED

    async def scenario(client):
        return await client.model("toy", "", time.monotonic() + 10)

    spec, _ = _run(script, scenario)
    assert (spec.input_name, spec.input_size, spec.classes) == ("image", 4, ("class_0", "class_1", "class_2"))

"""KServe v2 / Open Inference Protocol over HTTP/REST, with Triton's paths, JSON and binary tensor extension.

A thin adapter: each route turns its JSON (and binary tensor bytes) into the same protobuf request the gRPC
transport receives, calls the same `InferenceService` method, and turns the protobuf answer back into Triton's
JSON. So the batcher, version policy, limits, draining, metrics, statistics and logs are the gRPC path's, by
construction (KServe's `dataplane.py` under `grpc/` and `rest/`, MLServer's `handlers`, have this shape).

Binary tensors (Triton's extension): the body is the JSON header followed by the tensors' bytes; the
`Inference-Header-Content-Length` header says where the JSON ends, and each binary input says its size in
`parameters.binary_data_size`. Outputs are answered in binary when the output asks with `parameters.binary_data`,
or the request with `parameters.binary_data_output` (tritonclient asks by default), else as JSON `data`.

Errors answer `{"error": message}` with Triton's HTTP status for the error's class (Triton's
`HttpCodeFromError`): invalid argument 400, not found 404, unavailable 503 (not ready, draining, and, as Triton
files them, a full queue and an expired timeout: Triton reports those as UNAVAILABLE), unsupported 501,
internal 500, anything else 400. Health and readiness answer 200, or 400 when not live/ready, as Triton does.
"""

from __future__ import annotations

import contextvars
import gzip
import json
import logging
import zlib

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from cxr import datatypes
from cxr.datatypes import TensorError
from cxr.generated.inference import grpc_service_pb2 as pb
from services.common.errors import ServiceError, invalid
from services.common.http import BodyTooLarge, HttpCall, internal_error_handler, read_body, unwrapped

log = logging.getLogger("cxr.inference")
HEADER_LENGTH = "Inference-Header-Content-Length"
GRPC_METHOD_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name + "/"
# Triton's HTTP status per error class (its gRPC code here -> Triton's TRITONSERVER_Error class -> HTTP).
TRITON_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,  # queue full: Triton's "Exceeds maximum queue size" is UNAVAILABLE
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,  # Triton's "Request timeout expired" is UNAVAILABLE
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
# request parameters that steer this transport only (never passed to the data plane)
_HTTP_ONLY = {"binary_data_output"}


def to_json(message, defaults: bool = True) -> dict:
    """A protobuf message as Triton writes it in JSON: field names as in the .proto, enums by name, 64-bit
    integers as numbers (protobuf's JSON mapping writes them as strings; Triton's JSON does not), and zero
    values printed (a statistic of 0 is "count": 0) unless `defaults` is False (a model config: only what is set)."""
    document = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults
    )
    return _fix_int64(document, message.DESCRIPTOR)


def _fix_int64(value: dict, descriptor) -> dict:
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.type in _INT64:
            value[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.type in _INT64:
                    value[key] = {k: int(v) for k, v in item.items()}
                elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    value[key] = {k: _fix_int64(v, value_field.message_type) for k, v in item.items()}
            elif isinstance(item, list):
                value[key] = [_fix_int64(v, sub) if isinstance(v, dict) else v for v in item]
            elif isinstance(item, dict):
                value[key] = _fix_int64(item, sub)
    return value


def _parameter_value(param):
    """An InferParameter's value as a JSON scalar."""
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def _set_parameter(target, key: str, value, where: str) -> None:
    """Set `target[key]` (an InferParameter map) from a JSON scalar."""
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value >= 2**63:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise invalid(
            f"{where}: parameter {key!r} must be a boolean, number or string, received {type(value).__name__}"
        )


def _json_array(datatype: str, shape: list[int], data, tensor: str) -> np.ndarray:
    """The JSON `data` of a tensor (flat or nested, row-major) as an array of `datatype`, checked."""
    try:
        kind = datatypes.by_name(datatype)
        count = datatypes.element_count(shape)
    except (TensorError, TypeError, ValueError) as e:
        raise invalid(f"{tensor}: {e}") from None
    if kind.name == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise invalid(f"{tensor}: BYTES data must be strings (send other bytes as binary data)")
        array = np.empty(len(flat), dtype=object)
        array[:] = [v.encode() for v in flat]
    else:
        if kind.dtype is None:
            raise invalid(f"{tensor}: {kind.name} cannot be sent as JSON; send it as binary data")
        try:
            array = np.asarray(data).reshape(-1)
        except ValueError:
            raise invalid(f"{tensor}: data is not a regular (non-ragged) list of numbers") from None
        allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[kind.dtype.kind]
        if array.size and array.dtype.kind not in allowed:
            wanted = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[kind.dtype.kind]
            raise invalid(f"{tensor}: {kind.name} data must be {wanted}")
        if array.size and kind.dtype.kind in "iu":
            info = np.iinfo(kind.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise invalid(f"{tensor}: values out of range for {kind.name} ({info.min}..{info.max})")
        array = array.astype(kind.dtype)
    if array.size != count:
        raise invalid(
            f"{tensor}: expected {count} values for shape {datatypes.format_shape(shape)}, received {array.size}"
        )
    return array


def _flatten(data) -> list:
    if isinstance(data, list):
        return [v for item in data for v in _flatten(item)]
    return [data]


def infer_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, dict[str, bool]]:
    """The ModelInferRequest of an HTTP infer body, and for each output name whether it goes back in binary
    ("" is the default for outputs the request does not list)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise invalid(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
        header, binary = body[:header_length], body[header_length:]
    try:
        document = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the inference request is not valid JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise invalid("the inference request must be a JSON object with an 'inputs' list")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(document.get("id", "")))
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid("'parameters' must be an object")
    binary_out = {"": bool(parameters.get("binary_data_output", False))}
    for key, value in parameters.items():
        if key not in _HTTP_ONLY:
            _set_parameter(request.parameters, key, value, "request")

    offset = 0
    for item in document["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid("each input must be an object with a 'name'")
        name, where = item["name"], f"input {item['name']!r}"
        shape = item.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f"{where}: 'shape' must be a list of integers")
        datatype = item.get("datatype", "")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size")
        for key, value in params.items():
            if key != "binary_data_size":
                _set_parameter(tensor.parameters, key, value, where)
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise invalid(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(
                    f"{where}: binary_data_size {size} goes past the end of the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in item:
            array = _json_array(datatype, shape, item["data"], where)
            request.raw_input_contents.append(datatypes.to_raw(array, datatype))
        else:
            raise invalid(f"{where}: neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")

    for item in document.get("outputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid("each requested output must be an object with a 'name'")
        out = request.outputs.add(name=item["name"])
        for key, value in (item.get("parameters") or {}).items():
            if key == "binary_data":
                binary_out[item["name"]] = bool(value)
            else:
                _set_parameter(out.parameters, key, value, f"output {item['name']!r}")
    return request, binary_out


def infer_response(response: pb.ModelInferResponse, binary_out: dict[str, bool]) -> tuple[bytes, int | None]:
    """The HTTP body of a ModelInferResponse, and the JSON header's length when binary outputs follow it."""
    document = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = {k: _parameter_value(v) for k, v in response.parameters.items()}
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(d) for d in tensor.shape]}
        if binary_out.get(tensor.name, binary_out[""]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            array = datatypes.to_array(tensor.datatype, tensor.shape, raw=raw).reshape(-1)
            if tensor.datatype == "BYTES":
                entry["data"] = [v.decode("utf-8", errors="replace") for v in array]
            else:
                entry["data"] = array.tolist()
        outputs.append(entry)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body (tritonclient's request compression), bounded by `limit` once inflated."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise invalid(f"unsupported Content-Encoding {encoding!r}; expected gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise invalid(f"the {encoding} request body cannot be inflated: {e}") from None
    if len(out) > limit:
        raise BodyTooLarge(limit)
    return out


def build_app(service, max_body_bytes: int, tokens=None):
    """The FastAPI app of the KServe v2 REST API over `service` (an InferenceService). `tokens`: the gRPC port's
    TokenAuthInterceptor (services/inference/security.py), whose same rules (scope, health exempt) guard each route
    by the RPC it maps to."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="cxr inference (KServe v2 REST)", docs_url=None, redoc_url=None, openapi_url=None)
    call = HttpCall()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ServiceError)
    async def _service_error(request, e: ServiceError):
        return error(TRITON_HTTP_STATUS.get(e.code, 400), e.message)

    app.add_exception_handler(Exception, internal_error_handler(log))

    # who is calling (Authorization header, peer) for the token check inside rpc()
    caller: contextvars.ContextVar[tuple[str | None, str]] = contextvars.ContextVar("caller", default=(None, "http"))

    @app.middleware("http")
    async def _remember_caller(request: Request, call_next):
        peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
        caller.set((request.headers.get("authorization"), peer))
        return await call_next(request)

    async def rpc(method: str, message):
        """The gRPC servicer's own method on `message`: one data plane behind both transports."""
        if tokens is not None:
            authorization, peer = caller.get()
            problem = tokens.authorize(GRPC_METHOD_PREFIX + method, authorization, peer)
            if problem is not None:
                raise ServiceError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{problem} bearer token (header 'Authorization: Bearer <token>')",
                    "unauthenticated",
                )
        return await unwrapped(getattr(service, method))(message, call)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        # Triton refuses a request beyond --http-max-input-size as an invalid argument (400)
        return error(400, f"{e} (--max-message-bytes / CXR_INFERENCE_MAX_MESSAGE_BYTES)")

    async def json_body(request: Request) -> dict:
        body = await read_body(request, max_body_bytes)
        if not body:
            return {}
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise invalid(f"the request body is not valid JSON: {e}") from None
        if not isinstance(document, dict):
            raise invalid("the request body must be a JSON object")
        return document

    def status_only(ok: bool) -> Response:
        return Response(status_code=200 if ok else 400)

    # ---- health and metadata ----------------------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live():
        return status_only((await rpc("ServerLive", pb.ServerLiveRequest())).live)

    @app.get("/v2/health/ready")
    async def ready():
        return status_only((await rpc("ServerReady", pb.ServerReadyRequest())).ready)

    @app.get("/v2")
    async def server_metadata():
        return to_json(await rpc("ServerMetadata", pb.ServerMetadataRequest()))

    @app.get("/v2/models/stats")
    async def all_stats():
        return to_json(await rpc("ModelStatistics", pb.ModelStatisticsRequest()))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = ""):
        request = pb.ModelReadyRequest(name=model, version=version)
        return status_only((await rpc("ModelReady", request)).ready)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = ""):
        return to_json(await rpc("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version)))

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = ""):
        response = await rpc("ModelConfig", pb.ModelConfigRequest(name=model, version=version))
        return to_json(response.config, defaults=False)

    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_stats(model: str, version: str = ""):
        return to_json(await rpc("ModelStatistics", pb.ModelStatisticsRequest(name=model, version=version)))

    # ---- the model repository -----------------------------------------------------------------------------
    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        document = await json_body(request)
        answer = await rpc("RepositoryIndex", pb.RepositoryIndexRequest(ready=bool(document.get("ready"))))
        return JSONResponse([to_json(m) for m in answer.models])

    @app.post("/v2/repository/models/{model}/load")
    async def load(model: str, request: Request):
        message = pb.RepositoryModelLoadRequest(model_name=model)
        _repository_parameters(message, await json_body(request))
        await rpc("RepositoryModelLoad", message)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def unload(model: str, request: Request):
        message = pb.RepositoryModelUnloadRequest(model_name=model)
        _repository_parameters(message, await json_body(request))
        await rpc("RepositoryModelUnload", message)
        return Response(status_code=200)

    # ---- inference --------------------------------------------------------------------------------------------
    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = ""):
        body = await read_body(request, max_body_bytes)
        body = _decompress(body, request.headers.get("content-encoding", "").strip().lower(), max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is not None and not header_length.strip().isdigit():
            raise invalid(f"{HEADER_LENGTH} must be a byte count, received {header_length!r}")
        message, binary_out = infer_request(body, None if header_length is None else int(header_length), model, version)
        answer = await rpc("ModelInfer", message)
        content, json_length = infer_response(answer, binary_out)
        headers = {}
        if json_length is not None:
            headers[HEADER_LENGTH] = str(json_length)
        accepted = request.headers.get("accept-encoding", "")
        if "gzip" in accepted:
            content, headers["Content-Encoding"] = gzip.compress(content, compresslevel=1), "gzip"
        elif "deflate" in accepted:
            content, headers["Content-Encoding"] = zlib.compress(content, 1), "deflate"
        media = "application/octet-stream" if json_length is not None else "application/json"
        return Response(content, media_type=media, headers=headers)

    return app


def _repository_parameters(message, document: dict) -> None:
    """Copy Triton's load/unload `parameters` (e.g. unload_dependents) into the request's parameter map."""
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid("'parameters' must be an object")
    for key, value in parameters.items():
        param = message.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise invalid(f"repository parameter {key!r} must be a boolean, integer or string")


async def start_http(service, settings, tokens=None):
    """The REST API on settings.http_port (-1: off, returns None), in the running loop."""
    from services.common import http

    return await http.start_http(
        build_app(service, settings.max_message_bytes, tokens),
        settings,
        env="CXR_INFERENCE_HTTP_PORT",
        grace_period_s=settings.grace_period_s,
    )

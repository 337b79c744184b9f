"""The gateway's HTTP/JSON API and its upload page: a thin adapter over the same `GatewayService` the gRPC port
serves, so the input checks, limits, busy refusal, metrics and PHI-free log line are the gRPC path's.

    POST /v1/classify   the image as the raw body (Content-Type image/png, image/jpeg or application/dicom name
                        the format; any other type is sniffed) or a multipart upload (field `image`); `model`, `version`,
                        `heatmap`, `format`, `request_id` as query or form fields -> cxr.v1.ClassifyResponse
    GET  /v1/models     -> cxr.v1.ListModelsResponse
    GET  /healthz       200 {"status": "SERVING"} while the gateway can serve, else 503 (no token needed)
    GET  /              the upload page (services/gateway/static: plain HTML, CSS and JS, nothing external)

Answers are the protobuf JSON mapping of the cxr.v1 messages (google.protobuf.json_format: lowerCamelCase names,
bytes as base64), so both transports share one schema. An error answers a cxr.v1.Error in JSON with the HTTP
status of its gRPC code (grpc-gateway's table, `ServiceError.http_status`: 400 bad input, 404 unknown model,
429 busy or queue full, 503 upstream down, 504 deadline) and 413 for a body beyond --max-image-bytes.
With tokens configured, /v1/* need `Authorization: Bearer <token>` (401 otherwise), as the gRPC port does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from google.protobuf import json_format
from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from services.common.errors import ServiceError, invalid
from services.common.http import BodyTooLarge, HttpCall, read_body, unwrapped

log = logging.getLogger("cxr.gateway")
STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields, beyond the image itself
FORMATS = {
    "": pb.IMAGE_FORMAT_UNSPECIFIED,
    "auto": pb.IMAGE_FORMAT_UNSPECIFIED,
    "dicom": pb.IMAGE_FORMAT_DICOM,
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "jpg": pb.IMAGE_FORMAT_JPEG,
}
MEDIA_FORMATS = {
    "application/dicom": "dicom",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/octet-stream": "",
    "": "",
}
TRUE, FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


def to_json(message) -> dict:
    """The protobuf JSON mapping of a cxr.v1 message, with every field present (a probability of 0 included)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def error_body(code: grpc.StatusCode, message: str, reason: str) -> dict:
    return to_json(pb.Error(code=code.value[0], code_name=code.name, message=message, reason=reason))


def _flag(value: str | None, name: str) -> bool:
    text = (value or "").strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise invalid(f"{name} must be true or false, received {value!r}", "bad_field")


def classify_request(image: bytes, fields, media_type: str = "") -> pb.ClassifyRequest:
    """A cxr.v1.ClassifyRequest from the image bytes and the request's query or form `fields` (a mapping)."""
    fmt = (fields.get("format") or "").strip().lower()
    if not fmt:
        # any other type (curl's default x-www-form-urlencoded, image/x-dicom, ...): the reader sniffs the bytes
        fmt = MEDIA_FORMATS.get(media_type.split(";")[0].strip().lower(), "")
    if fmt not in FORMATS:
        raise invalid(f"format must be one of dicom, png, jpeg or auto, received {fmt!r}", "bad_format")
    return pb.ClassifyRequest(
        image=image,
        format=FORMATS[fmt],
        model_name=(fields.get("model") or "").strip(),
        model_version=(fields.get("version") or "").strip(),
        request_id=(fields.get("request_id") or "").strip(),
        return_heatmap=_flag(fields.get("heatmap"), "heatmap"),
    )


def build_app(gateway):
    """The FastAPI app over a `Gateway` (its service, readiness, tokens and limits)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile

    settings, service = gateway.settings, gateway.service
    checker = gateway.auth  # the gRPC port's own check: the same tokens, refusals logged and counted the same way
    limit = settings.max_image_bytes + FORM_OVERHEAD
    call = HttpCall()

    app = FastAPI(title="cxr gateway", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(status: int, code: grpc.StatusCode, message: str, reason: str, headers=None) -> JSONResponse:
        return JSONResponse(error_body(code, message, reason), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request, e: ServiceError):
        return refuse(e.http_status, e.code, e.message, e.reason)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.error(
            "internal error in the HTTP adapter",
            extra={"fields": {"path": request.url.path, "exc_type": type(e).__name__}},
        )
        return refuse(500, grpc.StatusCode.INTERNAL, f"internal gateway error ({type(e).__name__})", "internal")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return refuse(
            413,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"image refused (too_large): the request is larger than {limit} bytes (--max-image-bytes "
            f"{settings.max_image_bytes} plus {FORM_OVERHEAD} for the form)",
            "too_large",
        )

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if checker is not None and request.url.path.startswith("/v1/"):
            peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http:unknown"
            route = (
                request.url.path if request.url.path in ("/v1/classify", "/v1/models") else "/v1/*"
            )  # bounded labels
            problem = checker.authorize("http " + route, request.headers.get("authorization"), peer)
            if problem is not None:
                return refuse(
                    401,
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{problem} bearer token (header 'Authorization: Bearer <token>')",
                    "unauthenticated",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        serving = gateway.lifecycle.ready  # false from the first moment of a drain, as gRPC health
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @app.get("/v1/models")
    async def list_models():
        return to_json(await unwrapped(service.ListModels)(pb.ListModelsRequest(), call))

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await read_body(request, limit)
        media_type = request.headers.get("content-type", "")
        fields = dict(request.query_params)
        if media_type.lower().startswith("multipart/form-data"):
            form = await _form(request, body)
            upload = form.get("image") or form.get("file")
            fields.update({k: v for k, v in form.items() if isinstance(v, str)})
            if not isinstance(upload, UploadFile):
                raise invalid("the multipart upload has no file field 'image'", "empty")
            image = await upload.read()
            media_type = upload.content_type or ""
        else:
            image = body
        request_id = request.headers.get("x-request-id")
        if request_id and not fields.get("request_id"):
            fields["request_id"] = request_id
        message = classify_request(image, fields, media_type)
        return to_json(await unwrapped(service.Classify)(message, call))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _form(request, body: bytes):
    """Parse a multipart body that was already read (with its limit) through Starlette's own form parser."""

    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors have no common base we can name
        raise invalid(f"the multipart upload cannot be read: {type(e).__name__}", "bad_form") from None


async def start_http(gateway):
    """The HTTP API and page on settings.http_port (-1: off, returns None), with the gRPC port's TLS settings."""
    from services.common import http

    settings = gateway.settings
    return await http.start_http(
        build_app(gateway), settings, env="CXR_GATEWAY_HTTP_PORT", grace_period_s=settings.shutdown_grace_s
    )

"""The node's client of the gateway's cxr.v1 gRPC API: the node is one more integration, so every instance goes
through the gateway's reader, input gate, limits, auth, metrics and logs. TLS, mutual TLS and a bearer token are
passed on from the settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc as pb_grpc
from services.common.security import bearer_metadata, channel_credentials
from services.dicom.config import DicomSettings
from services.dicom.writers import Classification

# The gateway refuses an image with INVALID_ARGUMENT "image refused (<reason>): ..." (its reader: unreadable,
# multi_frame, too_large, ...; its input gate: not_radiograph, not_chest, lateral_view, out_of_distribution).
REFUSAL = re.compile(r"^image refused \(([a-z0-9_]{1,40})\)")
# Codes worth waiting for: the gateway or its upstream is down, busy or slow. Retried for as long as it takes.
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
MAX_MESSAGE = 256 * 1024 * 1024


@dataclass
class ClassifyFailure(Exception):
    """The gateway did not classify: `refused` (the image is not for us: no results, ever), `transient` (retry),
    or neither (a configuration problem such as an unknown model or a wrong token: retried a few times)."""

    code: str
    reason: str
    refused: bool
    transient: bool

    def __str__(self) -> str:
        return f"{self.code} ({self.reason})"


def refusal_reason(code: grpc.StatusCode, message: str) -> str | None:
    """The reason of an INVALID_ARGUMENT refusal, parsed from the gateway's message; None for other errors."""
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    match = REFUSAL.match(message or "")
    return match.group(1) if match else "invalid_argument"


class GatewayClient:
    def __init__(self, settings: DicomSettings):
        self.settings = settings
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        if settings.gateway_tls or settings.gateway_ca or settings.gateway_cert:
            credentials = channel_credentials(settings.gateway_ca, settings.gateway_cert, settings.gateway_key)
            self.channel = grpc.secure_channel(settings.gateway, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(settings.gateway, options=options)
        self.stub = pb_grpc.GatewayStub(self.channel)
        token = settings.gateway_token
        if not token and settings.gateway_token_file:
            token = Path(settings.gateway_token_file).read_text().strip().splitlines()[0].strip()
        self.metadata = bearer_metadata(token, env="CXR_DICOM_GATEWAY_TOKEN")

    def classify(self, data: bytes, request_id: str, identifiers: pb.StudyIdentifiers) -> Classification:
        request = pb.ClassifyRequest(
            image=data,
            format=pb.IMAGE_FORMAT_DICOM,
            model_name=self.settings.model,
            model_version=self.settings.model_version,
            request_id=request_id,
            identifiers=identifiers,
            return_heatmap=self.settings.heatmap,
        )
        try:
            response = self.stub.Classify(request, timeout=self.settings.request_timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            reason = refusal_reason(code, exc.details() or "")
            raise ClassifyFailure(
                code=code.name,
                reason=reason or code.name.lower(),
                refused=reason is not None,
                transient=code in TRANSIENT,
            ) from None
        return Classification(
            model_name=response.model_name,
            model_version=response.model_version,
            model_sha256=response.model_sha256,
            classes=[(c.label, float(c.probability)) for c in response.classes],
            top_class=response.top_class,
            top_probability=float(response.top_probability),
            indeterminate=response.indeterminate,  # below the model's operating point: the SR says so
            heatmap_png=bytes(response.heatmap.png),
            notices=list(response.notices),
        )

    def close(self) -> None:
        self.channel.close()

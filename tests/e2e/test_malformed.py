"""A corpus of malformed inputs through the real gateway: each gets the right status code and a message naming
the reason, while the gateway keeps serving valid images in between."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from tests.cxr import corpus
from tests.e2e.limits import GATEWAY_MAX_IMAGE_BYTES

# damaged inputs make pydicom and PIL warn on their way to the refusal we assert: expected, not noise to show
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
FORMATS = {
    None: pb.IMAGE_FORMAT_UNSPECIFIED,
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "dicom": pb.IMAGE_FORMAT_DICOM,
}


def _expect(stub, request: pb.ClassifyRequest, code: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request, timeout=60)
    assert info.value.code().name == code, info.value.details()
    assert info.value.details(), "every refusal carries a message"
    return info.value.details()


def test_malformed_corpus_gets_the_right_codes_and_the_gateway_keeps_serving(
    gateway_stub, gateway_service, dicom_dir: Path, cxr_raw_dir: Path
):
    cases = corpus.build(dicom_dir, cxr_raw_dir)
    png = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0].read_bytes()
    valid = (dicom_dir / corpus.NIH).read_bytes()
    # beyond the corpus: oversized input, a message beyond gRPC's limit, malformed request fields
    extra = [
        (
            "oversized_png_padding",
            pb.ClassifyRequest(image=corpus.oversized(GATEWAY_MAX_IMAGE_BYTES, png)),
            "INVALID_ARGUMENT",
            "too_large",
        ),
        (
            "beyond_grpc_message_limit",
            pb.ClassifyRequest(image=b"\0" * (GATEWAY_MAX_IMAGE_BYTES + 512 * 1024)),
            "RESOURCE_EXHAUSTED",
            None,
        ),
        (
            "bad_model_name",
            pb.ClassifyRequest(image=valid, model_name="../../etc/passwd"),
            "INVALID_ARGUMENT",
            "model_name",
        ),
        (
            "bad_model_version",
            pb.ClassifyRequest(image=valid, model_name="custom_cnn", model_version="latest"),
            "INVALID_ARGUMENT",
            "model_version",
        ),
        ("unknown_format_enum", pb.ClassifyRequest(image=valid, format=42), "INVALID_ARGUMENT", "format"),
        ("unknown_model", pb.ClassifyRequest(image=valid, model_name="densenet"), "NOT_FOUND", "densenet"),
        (
            "unknown_version",
            pb.ClassifyRequest(image=valid, model_name="mobilenet", model_version="77"),
            "NOT_FOUND",
            "77",
        ),
    ]
    assert len(cases) + len(extra) >= 40
    wrong = []
    for i, case in enumerate(cases):
        with pytest.raises(grpc.RpcError) as info:
            gateway_stub.Classify(
                pb.ClassifyRequest(image=case.data, format=FORMATS[case.fmt], request_id=case.name), timeout=60
            )
        code, details = info.value.code().name, info.value.details() or ""
        if code != case.code or not any(f"({reason})" in details for reason in case.reasons):
            wrong.append((case.name, code, details))
        if i % 5 == 4:  # the gateway still serves valid images between bad ones
            assert gateway_stub.Classify(pb.ClassifyRequest(image=valid), timeout=60).top_class
    for name, request, code, fragment in extra:
        details = _expect(gateway_stub, request, code)
        if fragment:
            assert fragment in details, (name, details)
    assert not wrong, wrong
    assert gateway_service.alive()
    assert gateway_stub.Classify(pb.ClassifyRequest(image=valid), timeout=60).top_class


def test_messages_name_the_reason(gateway_stub, dicom_dir: Path, cxr_raw_dir: Path):
    by_name = {c.name: c for c in corpus.build(dicom_dir, cxr_raw_dir)}
    details = _expect(gateway_stub, pb.ClassifyRequest(image=by_name["dicom_rgb"].data), "INVALID_ARGUMENT")
    assert "RGB" in details and "MONOCHROME" in details
    details = _expect(gateway_stub, pb.ClassifyRequest(image=by_name["dicom_multi_frame"].data), "INVALID_ARGUMENT")
    assert "multi-frame" in details and "3 frames" in details
    details = _expect(gateway_stub, pb.ClassifyRequest(image=by_name["dicom_no_pixel_data"].data), "INVALID_ARGUMENT")
    assert "no pixel data" in details
    details = _expect(gateway_stub, pb.ClassifyRequest(image=by_name["png_bomb_8000x8000"].data), "INVALID_ARGUMENT")
    assert "8000x8000" in details
    details = _expect(gateway_stub, pb.ClassifyRequest(image=b""), "INVALID_ARGUMENT")
    assert "empty" in details


def test_damaged_files_never_get_an_internal_error(gateway_stub, gateway_service, dicom_dir: Path, cxr_raw_dir: Path):
    files = sorted(dicom_dir.rglob("*.dcm")) + sorted((cxr_raw_dir / "Normal").glob("*.png"))[:1]
    codes: dict[str, int] = {}
    for _name, data in corpus.mutations(files, per_file=6, seed=7):
        try:
            gateway_stub.Classify(pb.ClassifyRequest(image=data), timeout=60)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert gateway_service.alive()

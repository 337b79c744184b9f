"""A recognisable patient identity planted in a DICOM file appears in no log line and no metric of the gateway
or the inference service, whatever path the request takes (success, heatmap, stream, refusal)."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import grpc
import numpy as np
import pydicom
import requests

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from tests.cxr import corpus

PLANTED = {
    "PatientName": "Zzyzxplanted^Wilhelmina^Quintessa",
    "PatientID": "PID-PLANTED-778899",
    "PatientBirthDate": "19310817",
    "OtherPatientNames": "Qwertyplanted^Bartholomew",
    "InstitutionName": "Plantedville General Hospital",
    "ReferringPhysicianName": "Drplanted^Ophelia",
    "AccessionNumber": "ACCPLANTED5566",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99999.4242.1",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99999.4242.2",
    "SOPInstanceUID": "1.2.826.0.1.3680043.99999.4242.3",
    "StudyDescription": "Chest Zzyzxplanted follow-up",
}


def _dicom(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _planted(dicom_dir: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(dicom_dir / corpus.NIH)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    return ds


def _needles() -> list[str]:
    needles = set()
    for value in PLANTED.values():
        needles.add(value)
        needles.update(
            part
            for part in value.replace("^", " ").split()
            if len(part) >= 6 and not part.isdigit() and part not in ("General", "Hospital")
        )
    return sorted(needles)


def test_planted_patient_identity_is_in_no_log_and_no_metric(
    gateway_stub, gateway_service, inference_service, dicom_dir: Path
):
    ds = _planted(dicom_dir)
    valid = _dicom(ds)
    ids = pb.StudyIdentifiers(
        study_instance_uid=PLANTED["StudyInstanceUID"],
        series_instance_uid=PLANTED["SeriesInstanceUID"],
        sop_instance_uid=PLANTED["SOPInstanceUID"],
        accession_number=PLANTED["AccessionNumber"],
    )
    # valid, with a heatmap, through the stream, and refused in several ways (error paths log too)
    response = gateway_stub.Classify(pb.ClassifyRequest(image=valid, identifiers=ids, return_heatmap=True), timeout=60)
    assert response.identifiers == ids  # echoed back to the caller, and only to the caller
    rgb = copy.deepcopy(ds)
    rgb.PhotometricInterpretation, rgb.SamplesPerPixel, rgb.PlanarConfiguration = "RGB", 3, 0
    rgb.Rows, rgb.Columns = 16, 16
    rgb.PixelData = np.zeros((16, 16, 3), dtype=np.uint8).tobytes()
    bad_dates = copy.deepcopy(ds)
    with warnings.catch_warnings():  # pydicom warns here, quoting the value: exactly what the gateway must not log
        warnings.simplefilter("ignore")
        bad_dates.PatientBirthDate = PLANTED["PatientName"][:16]  # an invalid DA value: validators would quote it
    refused = [valid[: len(valid) // 2], _dicom(rgb), valid[:1400]]
    for data in refused:
        try:
            gateway_stub.Classify(pb.ClassifyRequest(image=data, identifiers=ids), timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    gateway_stub.Classify(pb.ClassifyRequest(image=_dicom(bad_dates), identifiers=ids), timeout=60)
    answers = list(
        gateway_stub.ClassifyStream(
            iter([pb.ClassifyRequest(image=d, identifiers=ids) for d in (valid, refused[1])]), timeout=60
        )
    )
    assert [a.WhichOneof("result") for a in answers] == ["response", "error"]

    texts = {
        "gateway log": gateway_service.log_text(),
        "inference log": inference_service.log_text(),
        "gateway metrics": requests.get(f"http://127.0.0.1:{gateway_service.metrics_port}/metrics", timeout=10).text,
        "inference metrics": requests.get(
            f"http://127.0.0.1:{inference_service.metrics_port}/metrics", timeout=10
        ).text,
    }
    assert '"code":"OK"' in texts["gateway log"] and '"code":"INVALID_ARGUMENT"' in texts["gateway log"]
    assert "cxr_gateway_requests_total" in texts["gateway metrics"]
    leaks = [
        (where, needle) for where, text in texts.items() for needle in _needles() if needle.lower() in text.lower()
    ]
    assert not leaks, leaks

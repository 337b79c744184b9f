"""Where the results go: C-STORE SCU to each configured destination, and STOW-RS to a DICOMweb server.

A sender sends one instance's result objects (SR and SC) and either returns (all stored) or raises SendError
with a short reason of our own words (no identifiers): the node retries with backoff, then dead-letters.
A destination that already holds an object (a re-send after a crash) answers success: the UIDs are the same.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
import uuid

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from services.dicom.config import Destination

log = logging.getLogger("cxr.dicom.send")

# C-STORE statuses that mean "stored": success, and the warnings of PS3.4 B.2.3 (coercion, elements discarded)
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


class SendError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CStoreSender:
    """C-STORE SCU: one association per instance's results, both objects on it."""

    def __init__(self, destination: Destination, calling_ae: str, timeout_s: float):
        self.destination = destination
        self.name = str(destination)
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def send(self, objects: dict[str, bytes]) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise SendError("association_rejected" if assoc.is_rejected else "association_failed")
        try:
            for data in objects.values():
                ds = pydicom.dcmread(io.BytesIO(data))
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError("no_response")
                if code not in STORED:
                    raise SendError(f"status_0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()


class StowSender:
    """STOW-RS (PS3.18 10.5): one multipart/related POST of both objects to <base>/studies/<StudyInstanceUID>."""

    def __init__(self, base_url: str, token: str, timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.name = "dicomweb"
        self.token = token
        self.timeout_s = timeout_s

    def send(self, objects: dict[str, bytes]) -> None:
        study = None
        boundary = uuid.uuid4().hex
        body = bytearray()
        for data in objects.values():
            if study is None:
                study = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            f"{self.base_url}/studies/{study}", data=bytes(body), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                answer = reply.read()
        except urllib.error.HTTPError as exc:
            raise SendError(f"http_{exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SendError(f"connection_{type(getattr(exc, 'reason', exc)).__name__}") from None
        failed = _failed_sop_count(answer)
        if failed:
            raise SendError(f"stow_failed_{failed}")


def _failed_sop_count(answer: bytes) -> int:
    """Instances the STOW-RS response lists in its Failed SOP Sequence (00081198)."""
    try:
        reply = json.loads(answer or b"{}")
    except ValueError:
        return 0  # not JSON (some servers answer XML): the HTTP status said success
    if isinstance(reply, list):
        reply = reply[0] if reply else {}
    return len((reply.get("00081198") or {}).get("Value", []) or [])

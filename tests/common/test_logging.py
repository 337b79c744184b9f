"""services/common/logging.py: one JSON line per request, allow-listed fields only (no PHI), bounded request ids."""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from services.common import logging as cxr_logging


def test_request_log_is_one_json_line_with_allowed_fields_only():
    stream = io.StringIO()
    cxr_logging.configure("INFO", stream=stream)
    try:
        cxr_logging.log_request(
            logging.getLogger("cxr.gateway"),
            request_id="req 1\ninjected",
            model="ensemble",
            code="OK",
            total_ms=12.5,
            patient_name="Doe^Jane",
            accession_number="A123",
            pixels=np.zeros(3),
        )
    finally:
        cxr_logging.configure("INFO")  # back to stderr
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["request_id"] == "req_1_injected" and record["model"] == "ensemble" and record["total_ms"] == 12.5
    assert not {"patient_name", "accession_number", "pixels"} & set(record)
    assert "Doe" not in lines[0] and "A123" not in lines[0]


def test_request_id_is_bounded():
    assert len(cxr_logging.safe_request_id("x" * 1000)) == cxr_logging.MAX_REQUEST_ID

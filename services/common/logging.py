"""Structured, PHI-safe logs: one JSON object per line, one line per request.

Only fields named in `REQUEST_FIELDS` reach a request log line; anything else a caller passes is dropped,
so a patient identifier cannot slip into the logs by accident. Pixel data, DICOM tags and the caller's
study identifiers (UIDs, accession number) are never logged. Image-reader error details are not logged
either (only their short reason code): decoder messages can quote bytes from the file.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# The fields a request log line may carry; all are values our own code computes, or the caller's request id.
REQUEST_FIELDS = frozenset(
    {
        "request_id",
        "method",
        "model",
        "version",
        "code",
        "reason",
        "format",
        "input_bytes",
        "width",
        "height",
        "decode_ms",
        "preprocess_ms",
        "upstream_ms",
        "total_ms",
        "top_class",
        "notices",
        "heatmap",
        "peer_tls",
        "attempts",
    }
)
_REQUEST_ID_ALLOWED = re.compile(r"[^A-Za-z0-9._:@/+=-]")
MAX_REQUEST_ID = 128


def safe_request_id(request_id: str) -> str:
    """The caller's request id as it may appear in logs: printable id characters only, at most 128 of them."""
    return _REQUEST_ID_ALLOWED.sub("_", request_id[:MAX_REQUEST_ID])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a record's `fields` dict."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(line, separators=(",", ":"), default=str)


def configure(level: str = "INFO", stream=None) -> None:
    """Route all logging through one JSON-lines handler on stderr (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_cxr_json", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._cxr_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pydicom warns with element values quoted (names, dates): keep it to errors, which carry no values
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # decoder warnings can quote file content too: route them through logging and keep only errors
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def log_request(logger: logging.Logger, **fields) -> None:
    """Log one request as one line; fields outside REQUEST_FIELDS are dropped (PHI safety by allow-list)."""
    safe = {k: v for k, v in fields.items() if k in REQUEST_FIELDS and v is not None}
    if "request_id" in safe:
        safe["request_id"] = safe_request_id(str(safe["request_id"]))
    logger.info("request", extra={"fields": safe})

"""`cxr classify FILE... [--server HOST:PORT] [--model NAME] [--version V] [--heatmap OUT.png] [--json]`

Sends each file to a gateway and prints a table (or JSON). Exits 1 when any file failed, printing the
server's status code and message for it. Not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM, PNG or JPEG files")
    parser.add_argument(
        "--server",
        default=os.environ.get("CXR_SERVER", "localhost:50051"),
        help="gateway HOST:PORT (env CXR_SERVER; default localhost:50051)",
    )
    parser.add_argument("--model", default="", help="model name (default: the gateway's default model)")
    parser.add_argument("--version", default="", help="model version (default: the newest)")
    parser.add_argument(
        "--heatmap", type=Path, metavar="OUT.png", help="save the heatmap overlay (several files: OUT-<file>.png)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--ca", type=Path, help="CA certificate of the gateway: use TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, help="client certificate's private key (mutual TLS)")
    parser.add_argument("--token", default=None, help="bearer token (default: env CXR_TOKEN)")


def _identifiers(data: bytes):
    """The DICOM correlation UIDs, read locally so the gateway can echo them back (empty for PNG/JPEG)."""
    from cxr.generated.cxr.v1 import gateway_pb2 as pb

    ids = pb.StudyIdentifiers()
    if not (data[128:132] == b"DICM" or data[:2] in (b"\x08\x00", b"\x02\x00")):
        return ids
    try:
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        ids.study_instance_uid = str(ds.get("StudyInstanceUID", "") or "")
        ids.series_instance_uid = str(ds.get("SeriesInstanceUID", "") or "")
        ids.sop_instance_uid = str(ds.get("SOPInstanceUID", "") or "")
        ids.accession_number = str(ds.get("AccessionNumber", "") or "")
    except Exception:
        pass  # the gateway will say what is wrong with the file
    return ids


def _heatmap_path(base: Path, source: Path, many: bool) -> Path:
    return base if not many else base.with_name(f"{base.stem}-{source.stem}{base.suffix or '.png'}")


def _table(rows: list[tuple[Path, object]]) -> str:
    if not rows:
        return ""
    classes = [c.label for c in rows[0][1].classes]
    header = ["file", "model", "version", "answer", "top class", *classes, "ood score", "total ms"]
    lines = [header]
    for path, r in rows:
        probabilities = {c.label: c.probability for c in r.classes}
        ood = f"{r.ood_score:.2f}" if r.HasField("ood_score") else "-"
        if r.HasField("ood_threshold"):
            ood += f" (gate {r.ood_threshold:.2f})"
        lines.append(
            [
                path.name,
                r.model_name,
                r.model_version,
                "indeterminate" if r.indeterminate else r.top_class,
                f"{r.top_class} ({r.top_probability:.3f})",
                *[f"{probabilities.get(c, float('nan')):.3f}" for c in classes],
                ood,
                f"{r.timings.total_ms:.1f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines]
    notices = sorted({n for _, r in rows for n in r.notices})
    out += [f"note: {n}" for n in notices]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from cxr.generated.cxr.v1 import gateway_pb2 as pb
    from cxr.generated.cxr.v1 import gateway_pb2_grpc as pb_grpc
    from services.common.security import bearer_metadata, channel_credentials

    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    if args.ca or args.cert:
        channel = grpc.secure_channel(args.server, channel_credentials(args.ca, args.cert, args.key), options=options)
    else:
        channel = grpc.insecure_channel(args.server, options=options)
    stub = pb_grpc.GatewayStub(channel)
    metadata = bearer_metadata(args.token)
    ok: list[tuple[Path, pb.ClassifyResponse]] = []
    results: list[dict] = []
    failures = 0
    many = len(args.files) > 1
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            failures += 1
            results.append({"file": str(path), "error": {"code": "LOCAL", "message": f"cannot read: {exc.strerror}"}})
            continue
        request = pb.ClassifyRequest(
            image=data,
            model_name=args.model,
            model_version=args.version,
            request_id=uuid.uuid4().hex,
            identifiers=_identifiers(data),
            return_heatmap=args.heatmap is not None,
        )
        try:
            response = stub.Classify(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            failures += 1
            print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            results.append({"file": str(path), "error": {"code": exc.code().name, "message": exc.details()}})
            continue
        entry = {"file": str(path), **MessageToDict(response, preserving_proto_field_name=True)}
        if args.heatmap is not None and response.heatmap.png:
            out = _heatmap_path(args.heatmap, path, many)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(response.heatmap.png)
            entry["heatmap"] = {
                "label": response.heatmap.label,
                "png_file": str(out),
                "height": response.heatmap.height,
                "width": response.heatmap.width,
            }
        ok.append((path, response))
        results.append(entry)
    channel.close()
    if args.json:
        print(json.dumps(results, indent=2))
    elif ok:
        print(_table(ok))
        for path, r in ok:
            if args.heatmap is not None and r.heatmap.png:
                print(f"heatmap of {path.name} ({r.heatmap.label}): {_heatmap_path(args.heatmap, path, many)}")
    return 1 if failures else 0

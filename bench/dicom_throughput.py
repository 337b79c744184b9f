#!/usr/bin/env python3
"""End-to-end throughput of the DICOM node against a real Orthanc, vs the gateway alone, measured in one run.

1. Baseline: the same instances classified directly through the gateway (Classify with the heatmap, as the node
   asks), from as many client threads as the node has workers: the part of the work that is the gateway's.
2. Node: Orthanc sends every instance to `cxr serve dicom` in one `/modalities/cxr/store` job (its own C-STORE
   SCU); the clock stops when the node has stored every instance's SR and Secondary Capture back into Orthanc
   (C-STORE), checked in Orthanc. That is received -> spooled (fsync) -> classified -> SR + SC written -> stored.
Prints instances/s of both and their ratio.

    python bench/dicom_throughput.py [--repository DIR] [--copies 5] [--workers 2]

Instances: each real file of ../shared/data/dicom, `--copies` times with fresh UIDs (so each is a new instance).
Repository: --repository, else ./model_repository when present, else a small one trained here (needs [train]).
Needs Debian's orthanc and orthanc-dicomweb. Orthanc, the node, the gateway, inference and the clients share this
machine's cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import pick_repository  # noqa: E402
from cxr.processes import start_service  # noqa: E402
from tests.dicom.orthanc import Orthanc, free_port  # noqa: E402

DATA = Path(os.environ.get("CXR_DICOM_DATA", ROOT.parent / "shared" / "data" / "dicom"))


def instances(copies: int) -> list[bytes]:
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for path in sorted(DATA.rglob("*.dcm")):
        for _ in range(copies):
            ds = pydicom.dcmread(path, force=True)
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                ds.file_meta = pydicom.dataset.FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
                generate_uid(),
                generate_uid(),
                generate_uid(),
            )
            ds.file_meta.MediaStorageSOPInstanceUID, ds.file_meta.MediaStorageSOPClassUID = (
                ds.SOPInstanceUID,
                ds.SOPClassUID,
            )
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            out.append(buffer.getvalue())
    return out


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def gateway_baseline(address: str, data: list[bytes], workers: int) -> float:
    import grpc

    from cxr.generated.cxr.v1 import gateway_pb2 as pb
    from cxr.generated.cxr.v1 import gateway_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = pb_grpc.GatewayStub(channel)
    stub.Classify(pb.ClassifyRequest(image=data[0], return_heatmap=True), timeout=60)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda d: stub.Classify(pb.ClassifyRequest(image=d, return_heatmap=True), timeout=120), data))
    elapsed = time.perf_counter() - started
    channel.close()
    return len(data) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository")
    parser.add_argument("--copies", type=int, default=5, help="copies of each real file, with fresh UIDs (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="the node's workers (default 2)")
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-dicom-") as tmp:
        work = Path(tmp)
        repo = pick_repository(args.repository, work / "trained")
        data = instances(args.copies)
        inference = start_service(
            "inference",
            [
                "--repository",
                str(repo),
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--host",
                "127.0.0.1",
                "--intra-op-threads",
                "1",
            ],
            work / "inference",
            env=env,
        )
        gateway = start_service(
            "gateway",
            # every shared file is classified, whatever the input gate says of it (a refusal would stop the clock
            # early; here the throughput is measured, the gate's answers are tests/dicom's)
            ["--inference", inference.address, "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
            + ["--gate-as-notice", "all"],
            work / "gateway",
            env=env,
        )
        node_port = free_port()
        pacs = Orthanc.start(work / "orthanc", {"cxr": ("CXR", "127.0.0.1", node_port)})
        node = start_service(
            "dicom",
            [
                "--gateway",
                gateway.address,
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
                "--metrics-port",
                "0",
                "--spool",
                str(work / "spool"),
                "--workers",
                str(args.workers),
                "--destination",
                pacs.destination,
            ],
            work / "node",
            env=env,
        )
        try:
            time.sleep(2)  # inference warms its models up before it reports ready; the gateway's first metadata fetch
            direct = gateway_baseline(gateway.address, data, args.workers)
            ids = [pacs.upload(d)["ID"] for d in data]
            started = time.perf_counter()
            pacs.store("cxr", *ids)
            acknowledged = time.perf_counter() - started
            while metric(node.metrics_port, "cxr_dicom_results_sent_total") < len(ids):
                if not node.alive():
                    raise RuntimeError("the node died:\n" + node.log_text()[-3000:])
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            stored = sum(
                1
                for s in pacs.get("/series?expand")
                if s["MainDicomTags"].get("Modality") in ("SR", "OT")
                for _ in s["Instances"]
            )
            assert stored == 2 * len(ids), f"{stored} result objects in Orthanc for {len(ids)} instances"
            result = {
                "instances": len(ids),
                "node_instances_per_s": len(ids) / elapsed,
                "gateway_direct_instances_per_s": direct,
                "ratio_node_to_gateway": (len(ids) / elapsed) / direct,
                "acknowledged_all_s": acknowledged,
                "end_to_end_s": elapsed,
                "workers": args.workers,
                "cpus": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
                "machine": platform.processor() or platform.machine(),
            }
            print(json.dumps(result, indent=1))
        finally:
            node.stop()
            pacs.stop()
            gateway.stop()
            inference.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

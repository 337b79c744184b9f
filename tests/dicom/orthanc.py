"""A real Orthanc (Debian's `orthanc` and `orthanc-dicomweb`) on loopback ports, with a generated configuration
that knows our DICOM node as a modality, and the few REST calls the tests and the benchmark make.

    with Orthanc.start(workdir, modalities={"cxr": ("CXR", "127.0.0.1", node_port)}) as pacs:
        ids = pacs.upload(path.read_bytes())
        pacs.store("cxr", ids["ID"])           # Orthanc's own C-STORE SCU sends the instance to the node
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.gateway.processes import free_port  # a port for Orthanc's generated configuration

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if not (shutil.which("Orthanc") or Path(ORTHANC).exists()):
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    process: subprocess.Popen
    http_port: int
    dicom_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def destination(self) -> str:
        """Orthanc as a C-STORE destination of the node: AE@HOST:PORT."""
        return f"{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    @classmethod
    def start(cls, workdir: Path, modalities: dict[str, tuple[str, str, int]], timeout: float = 60.0) -> Orthanc:
        workdir.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        config = {
            "Name": "cxr-test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": AE_TITLE,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "OverwriteInstances": False,  # what most PACS do: a second copy of a stored SOP instance is not stored
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "HttpTimeout": 60,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
        log = open(workdir / "orthanc.log", "ab")
        process = subprocess.Popen(
            [ORTHANC, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
        pacs = cls(process, http_port, dicom_port, workdir)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{pacs.log_text()[-3000:]}")
            try:
                pacs.get("/system")
                return pacs
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(
                        f"Orthanc did not answer within {timeout:.0f} s:\n{pacs.log_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)

    def log_text(self) -> str:
        return (self.workdir / "orthanc.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- REST -------------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 120.0,
    ) -> bytes:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Content-Type": content_type} if body is not None else {},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.read()

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload) -> object:
        answer = self.request("POST", path, json.dumps(payload).encode())
        return json.loads(answer) if answer.strip() else None

    def upload(self, data: bytes) -> dict:
        """POST /instances: {"ID", "ParentStudy", "ParentSeries", "Status", ...}."""
        return json.loads(self.request("POST", "/instances", data, "application/dicom"))

    def store(self, modality: str, *instance_ids: str) -> dict:
        """Orthanc's C-STORE SCU sends the instances to `modality` (synchronously: returns once they are acknowledged)."""
        return self.post_json(f"/modalities/{modality}/store", {"Resources": list(instance_ids), "Synchronous": True})

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode())

    def study_series(self, study_id: str) -> list[dict]:
        return self.get(f"/studies/{study_id}/series")

    def series_by_modality(self, study_id: str, modality: str) -> list[dict]:
        return [s for s in self.study_series(study_id) if s["MainDicomTags"].get("Modality") == modality]

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def delete_study(self, study_id: str) -> None:
        self.request("DELETE", f"/studies/{study_id}")

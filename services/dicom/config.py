"""The DICOM node's settings: environment variables CXR_DICOM_<FIELD>, overridden by command-line flags.

List fields (destinations, allow_ae) come from the environment comma-separated, e.g.
CXR_DICOM_DESTINATIONS=ORTHANC@pacs:4242,ARCHIVE@10.0.0.5:104.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# DICOM AE titles: 1-16 characters of the default repertoire, no backslash or control characters
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination, written AE@HOST:PORT."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = DESTINATION.match(text.strip())
        if not match or not AE_TITLE.match(match["ae"].strip()) or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"destination {text!r} is not AE@HOST:PORT (AE title of 1-16 characters, port 1-65535)")
        return cls(match["ae"].strip(), match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _split(value):
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class DicomSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_DICOM_", use_attribute_docstrings=True, extra="ignore")

    gateway: str = "localhost:50051"
    """HOST:PORT of the cxr gateway's gRPC API that classifies each received instance."""
    host: str = "0.0.0.0"
    """Address the DICOM listener binds to."""
    port: int = 11112
    """DICOM port of the C-ECHO / C-STORE SCP (0 picks a free port)."""
    ae_title: str = "CXR"
    """Our AE title (the called AE title a PACS addresses us with; also the calling AE title when we send)."""
    allow_ae: Annotated[list[str], NoDecode] = []
    """Calling AE titles allowed to associate; empty: any calling AE is accepted (and logged)."""
    destinations: Annotated[list[str], NoDecode] = []
    """C-STORE destinations of the results, each AE@HOST:PORT."""
    dicomweb: str = ""
    """DICOMweb base URL for STOW-RS of the results (e.g. http://pacs:8042/dicom-web); empty: no STOW-RS."""
    dicomweb_token: str = ""
    """Bearer token sent with STOW-RS requests (when the DICOMweb server requires one)."""
    spool: Path = Path("dicom-spool")
    """Spool folder: received instances, results waiting to be sent, and the dead-letter folder."""
    metrics_port: int = 9091
    """HTTP port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off."""

    model: str = ""
    """Model name asked of the gateway; empty: the gateway's default model."""
    model_version: str = ""
    """Model version asked of the gateway; empty: the newest."""
    heatmap: bool = True
    """Also create the Secondary Capture with the heatmap overlay and the top class burnt in."""
    workers: int = 2
    """Instances classified and sent at once."""
    request_timeout_s: float = 60.0
    """Deadline of one Classify call to the gateway."""
    gateway_tls: bool = False
    """Use TLS to the gateway."""
    gateway_ca: Path | None = None
    """CA certificate that verifies the gateway (system roots when unset)."""
    gateway_cert: Path | None = None
    """Client certificate for mutual TLS to the gateway."""
    gateway_key: Path | None = None
    """Private key of gateway_cert."""
    gateway_token: str = ""
    """Bearer token sent to the gateway (when it requires one)."""
    gateway_token_file: Path | None = None
    """File whose first line is the bearer token sent to the gateway (instead of gateway_token)."""

    retry_backoff_s: float = 1.0
    """First delay before a failed classification or send is retried; doubled on each further try."""
    retry_backoff_max_s: float = 60.0
    """Longest delay between two tries."""
    send_attempts: int = 5
    """Tries per destination before the results go to the dead-letter folder."""
    classify_attempts: int = 5
    """Tries of an instance the gateway fails with a non-transient error before it goes to the dead-letter folder
    (UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried for as long as it takes)."""
    network_timeout_s: float = 30.0
    """Timeout of DICOM network operations (association, DIMSE, STOW-RS request)."""
    max_pdu: int = 0
    """Largest PDU we receive (0: unlimited)."""
    manufacturer: str = "cxr"
    """Manufacturer written into the result objects and their Contributing Equipment Sequence."""
    log_level: str = "INFO"
    """Log level of the JSON-lines log on stderr."""

    @field_validator("allow_ae", "destinations", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return _split(value)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not AE_TITLE.match(value):
            raise ValueError(f"AE title {value!r} must be 1-16 characters without backslash or control characters")
        return value

    @field_validator("allow_ae")
    @classmethod
    def _allow_ae(cls, values: list[str]) -> list[str]:
        for value in values:
            cls._ae_title(value)
        return values

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: list[str]) -> list[str]:
        for value in values:
            Destination.parse(value)
        return values

    def destination_list(self) -> list[Destination]:
        return [Destination.parse(d) for d in self.destinations]

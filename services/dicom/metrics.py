"""The DICOM node's Prometheus metrics (cxr_dicom_*). Labels carry only our own bounded values (destination
names from the configuration, reason codes, outcomes): never an identifier from a DICOM header."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# received -> results stored at every destination: seconds when all is well, minutes while a destination is down
E2E_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DicomMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "cxr_dicom_associations",
            "DICOM associations requested of the node, by result (accepted, rejected, aborted)",
            ["result"],
            registry=r,
        )
        self.received = Counter(
            "cxr_dicom_instances_received",
            "Instances received by C-STORE and made durable in the spool (acknowledged)",
            registry=r,
        )
        self.store_failures = Counter(
            "cxr_dicom_store_failures",
            "C-STORE requests answered with a failure status (nothing acknowledged), by reason",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            "cxr_dicom_instances_refused",
            "Instances the gateway refused (no finding objects made), by reason",
            ["reason"],
            registry=r,
        )
        self.classify_errors = Counter(
            "cxr_dicom_classify_errors",
            "Classify calls to the gateway that failed for other reasons than a refusal, by gRPC code",
            ["code"],
            registry=r,
        )
        self.classify_seconds = Histogram(
            "cxr_dicom_classify_seconds", "Time of one Classify call to the gateway", buckets=SECONDS, registry=r
        )
        self.results_created = Counter(
            "cxr_dicom_results_created",
            "Instances whose result objects (SR, and SC when there is a heatmap) were written",
            registry=r,
        )
        self.results_sent = Counter(
            "cxr_dicom_results_sent",
            "Instances whose result objects a destination stored, by destination",
            ["destination"],
            registry=r,
        )
        self.results_failed = Counter(
            "cxr_dicom_results_failed",
            "Failed tries to send an instance's result objects, by destination",
            ["destination"],
            registry=r,
        )
        self.dead_letters = Counter(
            "cxr_dicom_dead_letters",
            "Instances moved to the dead-letter folder, by stage (classify, send)",
            ["stage"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "cxr_dicom_spool_depth",
            "Entries in the spool, by stage (incoming: not yet classified; outbox: results not yet sent everywhere; dead_letter)",
            ["stage"],
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "cxr_dicom_end_to_end_seconds",
            "From an instance received to its results stored at every destination",
            buckets=E2E_SECONDS,
            registry=r,
        )

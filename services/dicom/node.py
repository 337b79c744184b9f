"""The DICOM node: C-ECHO / C-STORE SCP -> spool -> gateway Classify -> SR + SC -> C-STORE / STOW-RS.

Threads: pynetdicom's listener (one thread per association) only makes each instance durable in the spool and
queues its key; `workers` threads take keys from a delay queue and do the rest, so a slow gateway or an absent
destination never holds up an association. Everything a worker does is safe to repeat (see spool.py): a crash
at any point, and the restart picks up what the spool holds.
"""

from __future__ import annotations

import heapq
import io
import logging
import threading
import time

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, Verification

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from services.dicom.client import ClassifyFailure, GatewayClient
from services.dicom.config import DicomSettings
from services.dicom.metrics import DicomMetrics
from services.dicom.senders import CStoreSender, SendError, StowSender
from services.dicom.spool import OutboxState, Spool, instance_key
from services.dicom.writers import SC_SERIES_NUMBER, SR_SERIES_NUMBER, build_sc, build_sr, encode

log = logging.getLogger("cxr.dicom")

# What an instance's log line may carry: our own values and the hashed instance key only (PHI safety by allow-list).
INSTANCE_FIELDS = frozenset(
    {
        "instance",
        "outcome",
        "reason",
        "model",
        "version",
        "top_class",
        "objects",
        "destinations",
        "attempts",
        "e2e_ms",
        "classify_ms",
        "retry_in_s",
        "calling_ae",
        "stage",
    }
)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def log_instance(level: int, message: str, **fields) -> None:
    safe = {k: v for k, v in fields.items() if k in INSTANCE_FIELDS and v is not None}
    log.log(level, message, extra={"fields": safe})


class WorkQueue:
    """Keys due at a time; a key is queued at most once and handed to one worker at a time."""

    def __init__(self):
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._busy: set[str] = set()
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False

    def put(self, key: str, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        with self._cond:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, key))
            self._cond.notify()

    def get(self) -> str | None:
        """The next due key that no worker holds (None once closed)."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier due time
                if self._heap and self._heap[0][0] <= now:
                    due, _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    if key in self._busy:  # a re-sent instance while its first copy is being processed
                        self._due[key] = now + 0.2
                        self._seq += 1
                        heapq.heappush(self._heap, (now + 0.2, self._seq, key))
                        continue
                    self._busy.add(key)
                    return key
                self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            return None

    def done(self, key: str) -> None:
        with self._cond:
            self._busy.discard(key)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)


def quiet_third_party_logs() -> None:
    """highdicom logs UIDs at INFO ("copy Patient-related attributes from dataset <SOP Instance UID>") and
    pynetdicom logs association and dataset details: keep both to errors, which carry no header values."""
    for name in ("highdicom", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.ERROR)


class DicomNode:
    def __init__(self, settings: DicomSettings, metrics: DicomMetrics | None = None):
        destinations = settings.destination_list()
        if not destinations and not settings.dicomweb:
            raise ValueError("no destination for the results: give --destination AE@HOST:PORT and/or --dicomweb URL")
        quiet_third_party_logs()
        self.settings = settings
        self.metrics = metrics or DicomMetrics()
        self.spool = Spool(settings.spool)
        self.client = GatewayClient(settings)
        self.senders = [CStoreSender(d, settings.ae_title, settings.network_timeout_s) for d in destinations]
        if settings.dicomweb:
            self.senders.append(StowSender(settings.dicomweb, settings.dicomweb_token, settings.network_timeout_s))
        self.senders_by_name = {s.name: s for s in self.senders}
        self.queue = WorkQueue()
        self._classify_attempts: dict[str, int] = {}
        self._workers: list[threading.Thread] = []
        self._server = None
        for stage in ("incoming", "outbox", "dead_letter"):
            self.metrics.spool_depth.labels(stage).set_function(lambda stage=stage: self.spool.depth()[stage])

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> int:
        """Queue what the spool holds (a restart), start the workers and the listener; returns the DICOM port."""
        recovered = self.spool.pending_outbox() + self.spool.pending_incoming()
        for key in recovered:
            self.queue.put(key)
        if recovered:
            log.info("spool recovered", extra={"fields": {"instances": len(recovered)}})
        for i in range(max(1, self.settings.workers)):
            worker = threading.Thread(target=self._work, name=f"dicom-worker-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._server = self._application_entity().start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=self._handlers()
        )
        port = self._server.server_address[1]
        log.info(
            "listening",
            extra={
                "fields": {
                    "port": port,
                    "ae_title": self.settings.ae_title,
                    "destinations": [s.name for s in self.senders],
                }
            },
        )
        return port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening, let the workers finish what they hold; what is left stays in the spool for the restart."""
        if self._server is not None:
            self._server.shutdown()
        self.queue.close()
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self.client.close()

    # ---- the SCP ----------------------------------------------------------------------------------------
    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.network_timeout_s
        ae.require_calling_aet = list(self.settings.allow_ae)
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)  # stored as received
        return ae

    def _handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_ACCEPTED, self._on_association, ["accepted"]),
            (evt.EVT_REJECTED, self._on_association, ["rejected"]),
            (evt.EVT_ABORTED, self._on_association, ["aborted"]),
        ]

    def _on_association(self, event, result: str) -> None:
        self.metrics.associations.labels(result).inc()
        calling = event.assoc.requestor.ae_title
        fields = {"calling_ae": calling.strip() if isinstance(calling, str) else str(calling), "result": result}
        log.log(logging.WARNING if result != "accepted" else logging.INFO, "association", extra={"fields": fields})

    def _on_store(self, event) -> int:
        """Make the instance durable, then (and only then) answer success."""
        sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
        if not sop_instance_uid:
            self.metrics.store_failures.labels("no_sop_instance_uid").inc()
            return STATUS_CANNOT_UNDERSTAND
        key = instance_key(sop_instance_uid)
        try:
            self.spool.accept(key, event.encoded_dataset())
        except OSError as exc:  # disk full, read-only: the sender keeps the instance and may retry
            self.metrics.store_failures.labels("spool_" + type(exc).__name__).inc()
            log_instance(logging.ERROR, "spool write failed", instance=key[:16], reason=type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        self.metrics.received.inc()
        self.queue.put(key)
        return 0x0000

    # ---- the workers --------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                self._process(key)
            except Exception as exc:  # a bug of ours: keep the entry, log by type only, try again later
                log_instance(logging.ERROR, "processing failed", instance=key[:16], reason=type(exc).__name__)
                log.debug("processing failed", exc_info=True)
                self.queue.put(key, self.settings.retry_backoff_max_s)
            finally:
                self.queue.done(key)

    def _backoff(self, attempts: int) -> float:
        return min(self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** max(0, attempts - 1))

    def _process(self, key: str) -> None:
        if self.spool.has_outbox(key):  # results already made (a restart, or a retry of the sending)
            self._deliver(key)
            return
        path = self.spool.incoming_path(key)
        if not path.exists():
            return  # done meanwhile (a re-send queued twice)
        data = path.read_bytes()
        source = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        identifiers = pb.StudyIdentifiers(
            study_instance_uid=str(source.get("StudyInstanceUID", "")),
            series_instance_uid=str(source.get("SeriesInstanceUID", "")),
            sop_instance_uid=str(source.get("SOPInstanceUID", "")),
        )
        if self._is_own_result(source):  # a PACS that routes every new instance to us sends our results back
            self._classify_failed(key, ClassifyFailure("OK", "own_result", refused=True, transient=False))
            return
        started = time.perf_counter()
        try:
            result = self.client.classify(data, request_id=f"dicom-{key[:16]}", identifiers=identifiers)
        except ClassifyFailure as failure:
            self._classify_failed(key, failure)
            return
        finally:
            self.metrics.classify_seconds.observe(time.perf_counter() - started)
        classify_ms = round(1e3 * (time.perf_counter() - started), 1)
        self._classify_attempts.pop(key, None)

        objects = {"sr.dcm": encode(build_sr(source, result, self.settings.manufacturer))}
        sc = build_sc(source, result, self.settings.manufacturer)
        if sc is not None:
            objects["sc.dcm"] = encode(sc)
        state = OutboxState(
            received_at=self.spool.received_at(key),
            pending=[s.name for s in self.senders],
            summary={
                "model": result.model_name,
                "version": result.model_version,
                "top_class": result.top_class,
                "classify_ms": classify_ms,
            },
        )
        self.spool.commit_results(key, objects, state)
        self.metrics.results_created.inc()
        self._deliver(key)

    def _is_own_result(self, source: pydicom.Dataset) -> bool:
        return (
            str(source.get("Manufacturer", "")) == self.settings.manufacturer
            and source.get("SeriesNumber") in (SR_SERIES_NUMBER, SC_SERIES_NUMBER)
            and str(source.get("SOPClassUID", "")) in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
        )

    def _classify_failed(self, key: str, failure: ClassifyFailure) -> None:
        if failure.refused:
            self.metrics.refused.labels(failure.reason).inc()
            self.spool.discard_incoming(key)
            log_instance(logging.INFO, "instance", instance=key[:16], outcome="refused", reason=failure.reason)
            return
        self.metrics.classify_errors.labels(failure.code).inc()
        attempts = self._classify_attempts.get(key, 0) + 1
        self._classify_attempts[key] = attempts
        if not failure.transient and attempts >= self.settings.classify_attempts:
            self._classify_attempts.pop(key, None)
            self.spool.to_dead_letter(
                key, {"stage": "classify", "code": failure.code, "reason": failure.reason, "attempts": attempts}
            )
            self.metrics.dead_letters.labels("classify").inc()
            log_instance(
                logging.ERROR,
                "instance",
                instance=key[:16],
                outcome="dead_letter",
                stage="classify",
                reason=failure.reason,
                attempts=attempts,
            )
            return
        delay = self._backoff(attempts)
        log_instance(
            logging.WARNING,
            "classify failed",
            instance=key[:16],
            reason=failure.reason,
            attempts=attempts,
            retry_in_s=delay,
        )
        self.queue.put(key, delay)

    def _deliver(self, key: str) -> None:
        state = self.spool.read_state(key)
        objects = self.spool.result_objects(key)
        for name in list(state.pending):
            sender = self.senders_by_name.get(name)
            if sender is None:  # the configuration changed since the results were made: keep them
                state.attempts[name] = self.settings.send_attempts
                state.errors[name] = "destination_no_longer_configured"
                continue
            try:
                sender.send(objects)
            except SendError as exc:
                state.attempts[name] = state.attempts.get(name, 0) + 1
                state.errors[name] = exc.reason
                self.metrics.results_failed.labels(name).inc()
                continue
            state.pending.remove(name)
            state.delivered.append(name)
            self.metrics.results_sent.labels(name).inc()
            self.spool.write_state(key, state)
        summary = state.summary
        if not state.pending:
            self.spool.finish(key)
            e2e = max(0.0, time.time() - state.received_at)
            self.metrics.end_to_end_seconds.observe(e2e)
            log_instance(
                logging.INFO,
                "instance",
                instance=key[:16],
                outcome="stored",
                model=summary.get("model"),
                version=summary.get("version"),
                top_class=summary.get("top_class"),
                objects=len(objects),
                destinations=len(state.delivered),
                classify_ms=summary.get("classify_ms"),
                e2e_ms=round(1e3 * e2e, 1),
            )
            return
        attempts = max(state.attempts.get(name, 0) for name in state.pending)
        if attempts >= self.settings.send_attempts:
            reasons = {name: state.errors.get(name, "") for name in state.pending}
            self.spool.to_dead_letter(
                key, {"stage": "send", "failed": reasons, "delivered": state.delivered, "attempts": attempts}
            )
            self.metrics.dead_letters.labels("send").inc()
            log_instance(
                logging.ERROR,
                "instance",
                instance=key[:16],
                outcome="dead_letter",
                stage="send",
                reason=",".join(sorted(set(reasons.values()))),
                attempts=attempts,
                destinations=len(state.delivered),
            )
            return
        self.spool.write_state(key, state)
        delay = self._backoff(attempts)
        log_instance(
            logging.WARNING,
            "send failed",
            instance=key[:16],
            attempts=attempts,
            retry_in_s=delay,
            reason=",".join(sorted({state.errors.get(n, "") for n in state.pending})),
        )
        self.queue.put(key, delay)

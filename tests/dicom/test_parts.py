"""The node's parts without a network: settings, refusal parsing, the spool's crash ordering, the work queue, and
the result objects (deterministic UIDs, TID 1500 content, the Secondary Capture)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import grpc
import highdicom as hd
import pydicom
import pytest
from PIL import Image

from services.dicom.client import refusal_reason
from services.dicom.config import Destination, DicomSettings
from services.dicom.node import WorkQueue
from services.dicom.spool import OutboxState, Spool, instance_key
from services.dicom.writers import Classification, build_sc, build_sr, encode, result_uids


def test_settings_from_the_environment_split_lists_and_check_destinations(monkeypatch):
    monkeypatch.setenv("CXR_DICOM_DESTINATIONS", "ORTHANC@pacs:4242, ARCHIVE@[::1]:104")
    monkeypatch.setenv("CXR_DICOM_ALLOW_AE", "ORTHANC,MODALITY1")
    settings = DicomSettings()
    assert settings.destination_list() == [Destination("ORTHANC", "pacs", 4242), Destination("ARCHIVE", "::1", 104)]
    assert settings.allow_ae == ["ORTHANC", "MODALITY1"]
    for bad in ("ORTHANC@pacs", "@pacs:104", "A_TITLE_LONGER_THAN_16@h:104", "AE@h:70000"):
        with pytest.raises(ValueError):
            DicomSettings(destinations=[bad])
    with pytest.raises(ValueError):
        DicomSettings(ae_title="back\\slash")


def test_refusals_are_parsed_from_the_gateways_message():
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert (
        refusal_reason(invalid, "image refused (lateral_view): a lateral view; the models know PA/AP") == "lateral_view"
    )
    assert refusal_reason(invalid, "image refused (not_radiograph): Modality CT") == "not_radiograph"
    assert refusal_reason(invalid, "model_name must be 1-128 letters") == "invalid_argument"
    assert refusal_reason(grpc.StatusCode.UNAVAILABLE, "image refused (x): upstream down") is None


def test_the_spool_keeps_an_instance_until_its_results_are_committed(tmp_path: Path):
    spool = Spool(tmp_path)
    key = instance_key("1.2.3.4")
    assert "1.2.3.4" not in key and len(key) == 32
    spool.accept(key, b"first copy")
    spool.accept(key, b"re-sent copy")  # the same SOP instance again: one entry
    assert spool.pending_incoming() == [key] and spool.incoming_path(key).read_bytes() == b"re-sent copy"

    (spool.tmp / "half-written").write_bytes(b"x")  # a crash mid-write: never acknowledged
    spool = Spool(tmp_path)  # the restart
    assert list(spool.tmp.iterdir()) == [] and spool.pending_incoming() == [key]

    state = OutboxState(received_at=time.time(), pending=["A@h:1", "dicomweb"])
    spool.commit_results(key, {"sr.dcm": b"sr", "sc.dcm": b"sc"}, state)
    assert spool.pending_incoming() == [] and spool.pending_outbox() == [key]
    assert spool.result_objects(key) == {"sc.dcm": b"sc", "sr.dcm": b"sr"}
    # a crash after the commit but before the source was dropped: the restart finds both, and only sends
    spool.accept(key, b"source again")
    spool.commit_results(key, {"sr.dcm": b"other"}, state)
    assert spool.result_objects(key)["sr.dcm"] == b"sr", "committed results are never rewritten"

    state.pending.remove("A@h:1")
    state.delivered.append("A@h:1")
    spool.write_state(key, state)
    assert spool.read_state(key).delivered == ["A@h:1"]
    letter = spool.to_dead_letter(key, {"stage": "send", "failed": {"dicomweb": "http_503"}})
    assert spool.pending_outbox() == [] and (letter / "sr.dcm").read_bytes() == b"sr"
    assert spool.depth() == {"incoming": 0, "outbox": 0, "dead_letter": 1}


def test_the_work_queue_delays_deduplicates_and_never_hands_one_key_to_two_workers():
    queue = WorkQueue()
    queue.put("later", delay=0.3)
    queue.put("now")
    queue.put("now")  # queued once
    assert queue.get() == "now"
    queue.put("now")  # re-sent while a worker holds it: handed out only after done()
    started = time.monotonic()
    assert queue.get() == "later" and time.monotonic() - started >= 0.25
    got = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    time.sleep(0.3)
    assert got == [], "a key a worker holds must not go to a second worker"
    queue.done("now")
    worker.join(5)
    assert got == ["now"]
    queue.close()
    assert queue.get() is None


def _result(sha: str = "ab" * 32, indeterminate: bool = False) -> Classification:
    png = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 30, 30)).save(png, "PNG")
    return Classification(
        "ensemble",
        "1",
        sha,
        [("Normal", 0.1234567), ("Lung_Opacity", 0.5), ("Viral Pneumonia", 0.3765433)],
        "Lung_Opacity",
        0.5,
        indeterminate=indeterminate,
        heatmap_png=png.getvalue(),
    )


@pytest.fixture(scope="module")
def source(dicom_dir: Path) -> pydicom.Dataset:
    return pydicom.dcmread(dicom_dir / "CR-MONO1-10-chest.dcm", force=True, stop_before_pixels=True)


def test_result_uids_follow_the_source_instance_and_the_model(source):
    first, again = result_uids(source, "sha-a"), result_uids(source, "sha-a")
    assert first == again
    other_model = result_uids(source, "sha-b")
    assert other_model.sr_instance != first.sr_instance and other_model.device != first.device
    assert len({first.sr_instance, first.sc_instance, first.sr_series, first.sc_series}) == 4
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in vars(first).values())


def test_the_sr_is_a_tid_1500_report_with_each_probability_and_the_sc_has_the_finding_burnt_in(source):
    sr = hd.sr.srread(io.BytesIO(encode(build_sr(source, _result()))))
    groups = sr.content.get_image_measurement_groups()
    assert groups[0].finding_type.meaning == "Lung_Opacity"
    assert {g.finding_type.meaning: g.get_measurements()[0].value for g in groups[1:]} == {
        "Normal": pytest.approx(0.1234567, abs=1e-9),
        "Lung_Opacity": 0.5,
        "Viral Pneumonia": pytest.approx(0.3765433, abs=1e-9),
    }
    assert sr.VerificationFlag == "UNVERIFIED" and sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientName == source.PatientName and sr.PatientID == ""  # the source has none: Type 2, present and empty

    indeterminate = hd.sr.srread(io.BytesIO(encode(build_sr(source, _result(indeterminate=True)))))
    assert indeterminate.content.get_image_measurement_groups()[0].finding_type.value == "indeterminate"

    sc = pydicom.dcmread(io.BytesIO(encode(build_sc(source, _result()))))
    assert sc.Modality == "OT" and sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == source.StudyInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape[0] > 128 and pixels.shape[1:] == (128, 3), "a caption band above the overlay"
    band = pixels[: pixels.shape[0] - 128]
    assert band.min() == 0 and (band > 200).any(axis=-1).mean() > 0.01, "light caption text on black"
    assert build_sc(source, Classification("m", "1", "", [("a", 1.0)], "a", 1.0)) is None, "no heatmap, no SC"


def test_cxr_serve_dicom_is_registered_and_its_flags_load_without_torch_or_the_dicom_libraries():
    import subprocess
    import sys

    probe = (
        "import sys\nfrom cxr.cli import main\ntry:\n    main(['serve', 'dicom', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'pynetdicom', 'highdicom', 'training') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--destination" in done.stdout and "--allow-ae" in done.stdout and "--dicomweb" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"

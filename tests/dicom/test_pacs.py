"""The DICOM node against a real Orthanc: the PACS sends (Orthanc's own C-STORE SCU, `/modalities/cxr/store`),
the node classifies through the gateway and stores an SR and a Secondary Capture back into the same study.

Every DICOM file of ../shared/data/dicom takes the round trip; the SR is checked with highdicom and with dcmtk's
`dsrdump`, and its probabilities against a direct Classify of the same file. Then: a re-send stores nothing twice,
an unknown calling AE title is refused, unreadable, CT and lateral instances
produce no finding objects and are counted by reason, kill -9 between acknowledgement and processing loses
nothing, STOW-RS works, and a destination that never answers ends in the dead-letter folder.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import require
from cxr.generated.cxr.v1 import gateway_pb2 as pb
from services.dicom.writers import INDETERMINATE, NOT_FOR_CLINICAL_USE
from tests.dicom import orthanc
from tests.dicom.conftest import NODE_AE, metric, start_node, wait_for

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def dicom_files(dicom_dir: Path) -> list[Path]:
    files = sorted(dicom_dir.rglob("*.dcm"))
    assert len(files) >= 5, f"expected the real DICOM files in {dicom_dir}"
    return files


def results(pacs: orthanc.Orthanc, study: str, source_uid: str | None = None) -> dict[str, list[str]]:
    """Instance ids of our result objects in an Orthanc study, {"SR": [...], "OT": [...]}; with `source_uid` only
    those that reference that source SOP instance (several sources can share a study)."""
    found = {"SR": [], "OT": []}
    for series in pacs.study_series(study):
        modality = series["MainDicomTags"].get("Modality")
        if modality in found:
            found[modality] += [
                i for i in series["Instances"] if source_uid is None or referenced(pacs, i) == source_uid
            ]
    return found


def referenced(pacs: orthanc.Orthanc, instance_id: str) -> str:
    """The source SOP Instance UID a result object references (SR evidence, SC source image)."""
    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance_id)), stop_before_pixels=True)
    if "SourceImageSequence" in ds:
        return ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    return (
        ds.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
    )


def wait_results(
    pacs: orthanc.Orthanc, study: str, source_uid: str | None = None, timeout: float = 90
) -> dict[str, list[str]]:
    return wait_for(
        lambda: (r := results(pacs, study, source_uid))["SR"] and r["OT"] and r, timeout, "the SR and SC in the study"
    )


def sr_probabilities(sr: hd.sr.Comprehensive3DSR) -> dict[str, float]:
    groups = sr.content.get_image_measurement_groups()
    return {g.finding_type.meaning: g.get_measurements()[0].value for g in groups if g.get_measurements()}


def copy_with_new_uids(path: Path, **changes) -> bytes:
    """A chest file as a new instance in a new study (fresh UIDs), with `changes` applied to its header."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_every_file_goes_round_the_pacs_and_the_sr_matches_a_direct_classify(
    node, pacs, gateway_stub, dicom_dir, tmp_path
):
    sent = {}
    for path in dicom_files(dicom_dir):
        upload = pacs.upload(path.read_bytes())
        if upload["Status"] == "AlreadyStored":
            # Fake_MONOHR1.dcm is siim_*.dcm with one tag changed and the same SOP Instance UID: one instance for a PACS
            continue
        sent[path] = upload
    assert len(sent) >= 5
    for upload in sent.values():
        pacs.store("cxr", upload["ID"])  # the PACS sends: returns once our node acknowledged
    assert metric(node, "cxr_dicom_instances_received_total") == len(sent)

    require(shutil.which("dsrdump") is not None, "dsrdump (Debian's dcmtk) is not installed")
    for path, upload in sent.items():
        source = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        found = wait_results(pacs, upload["ParentStudy"], source.SOPInstanceUID)
        assert len(found["SR"]) == 1 and len(found["OT"]) == 1, found
        sr_bytes = pacs.instance_file(found["SR"][0])
        sr = hd.sr.srread(io.BytesIO(sr_bytes))
        assert sr.SOPClassUID == SR_CLASS
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.PatientID == source.get("PatientID", "")
        assert sr.VerificationFlag == "UNVERIFIED"
        assert NOT_FOR_CLINICAL_USE in sr.SeriesDescription
        assert (
            sr.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
            == source.SOPInstanceUID
        )
        [equipment] = [
            e
            for e in sr.ContributingEquipmentSequence
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and e.Manufacturer == "cxr"
        ]  # IHE AIR: the algorithm as processing equipment
        assert equipment.DeviceUID

        direct = gateway_stub.Classify(pb.ClassifyRequest(image=path.read_bytes()), timeout=60)
        assert (
            equipment.ManufacturerModelName == direct.model_name and direct.model_sha256 in equipment.SoftwareVersions
        )
        probabilities = sr_probabilities(sr)
        assert list(probabilities) == [c.label for c in direct.classes]
        for c in direct.classes:
            assert abs(probabilities[c.label] - c.probability) <= 1e-6, (
                path.name,
                c.label,
                probabilities[c.label],
                c.probability,
            )
        top_group = sr.content.get_image_measurement_groups()[0]
        # the top finding: the class, or "indeterminate" below the model's operating point (the probabilities stay)
        expected = INDETERMINATE[1] if direct.indeterminate else direct.top_class
        assert top_group.finding_type.meaning == expected

        (tmp_path / "sr.dcm").write_bytes(sr_bytes)
        dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert "Imaging Measurement Report" in dump.stdout and "UNVERIFIED" in dump.stdout
        assert "Probability" in dump.stdout and direct.top_class in dump.stdout

        sc = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["OT"][0])))
        assert sc.SOPClassUID == SC_CLASS and sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB" and sc.pixel_array.ndim == 3
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert equipment.DeviceUID in [e.get("DeviceUID") for e in sc.ContributingEquipmentSequence]

    assert metric(node, "cxr_dicom_results_sent_total", destination=pacs.destination) == len(sent)
    assert metric(node, "cxr_dicom_end_to_end_seconds_count") == len(sent)
    assert (
        metric(node, "cxr_dicom_spool_depth", stage="incoming") == 0
        and metric(node, "cxr_dicom_spool_depth", stage="outbox") == 0
    )
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    stored = [line for line in lines if line.get("msg") == "instance" and line.get("outcome") == "stored"]
    assert len(stored) == len(sent) and all(len(line["instance"]) == 16 for line in stored)


def test_a_resent_instance_is_stored_only_once(node, pacs, dicom_dir):
    path = dicom_files(dicom_dir)[0]
    upload = pacs.upload(path.read_bytes())
    study, uid = upload["ParentStudy"], str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
    before_sent = metric(node, "cxr_dicom_results_sent_total", destination=pacs.destination)
    pacs.store("cxr", upload["ID"])
    wait_for(
        lambda: metric(node, "cxr_dicom_results_sent_total", destination=pacs.destination) >= before_sent + 1,
        90,
        "the node to send its results",
    )
    first = results(pacs, study, uid)
    pacs.store("cxr", upload["ID"])  # the PACS sends the same instance again
    wait_for(
        lambda: metric(node, "cxr_dicom_results_sent_total", destination=pacs.destination) >= before_sent + 2,
        90,
        "the node to send the results of the re-sent instance",
    )
    again = results(pacs, study, uid)
    assert len(again["SR"]) == 1 and len(again["OT"]) == 1, f"a re-send created duplicates: {again}"
    assert again == first, "the re-sent instance's results must carry the same SOP Instance UIDs"


def test_an_unknown_calling_ae_title_is_refused(node, pacs):
    require(shutil.which("echoscu") is not None, "echoscu (Debian's dcmtk) is not installed")
    before = metric(node, "cxr_dicom_associations_total", result="rejected")
    refused = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", NODE_AE, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert metric(node, "cxr_dicom_associations_total", result="rejected") == before + 1
    assert any('"calling_ae":"INTRUDER"' in line and '"rejected"' in line for line in node.log_text().splitlines())
    accepted = subprocess.run(
        ["echoscu", "-aet", orthanc.AE_TITLE, "-aec", NODE_AE, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert accepted.returncode == 0, accepted.stderr
    pacs.post_json("/modalities/cxr/echo", {})  # Orthanc's own C-ECHO to the node: an HTTP error when it fails


def _push_and_wait_refused(node, pacs, data: bytes, reason: str) -> str:
    upload = pacs.upload(data)
    before = metric(node, "cxr_dicom_instances_refused_total", reason=reason)
    pacs.store("cxr", upload["ID"])
    wait_for(
        lambda: metric(node, "cxr_dicom_instances_refused_total", reason=reason) >= before + 1,
        60,
        f"the node to count a refusal ({reason})",
    )
    return upload["ParentStudy"]


def test_an_unreadable_instance_produces_no_finding_objects_and_is_counted(node, pacs, dicom_dir):
    nih = next(p for p in dicom_files(dicom_dir) if p.name.startswith("nih_"))
    study = _push_and_wait_refused(node, pacs, copy_with_new_uids(nih, NumberOfFrames=2), "multi_frame")
    assert results(pacs, study) == {"SR": [], "OT": []}
    assert metric(node, "cxr_dicom_spool_depth", stage="incoming") == 0


def test_a_ct_instance_and_a_lateral_view_produce_no_finding_objects_and_are_counted(node, pacs, dicom_dir):
    nih = next(p for p in dicom_files(dicom_dir) if p.name.startswith("nih_"))
    ct = _push_and_wait_refused(
        node, pacs, copy_with_new_uids(nih, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"), "not_radiograph"
    )
    lateral = _push_and_wait_refused(node, pacs, copy_with_new_uids(nih, ViewPosition="LL"), "lateral_view")
    for study in (ct, lateral):
        assert results(pacs, study) == {"SR": [], "OT": []}


def test_kill_9_between_acknowledgement_and_processing_then_restart_gives_each_instance_its_results_once(
    dicom_gateway, pacs, dicom_dir, tmp_path
):
    # The node acknowledges and spools, but its gateway is unreachable: nothing gets processed. Then kill -9.
    port = orthanc.free_port()
    pacs.add_modality("cxr-crash", NODE_AE, "127.0.0.1", port)
    dead_gateway = f"127.0.0.1:{orthanc.free_port()}"
    node = start_node(dead_gateway, tmp_path, [pacs.destination], port=port)
    sources = [p for p in dicom_files(dicom_dir) if not p.name.startswith("Fake_")][:3]
    uploads = [pacs.upload(copy_with_new_uids(p)) for p in sources]
    pacs.store("cxr-crash", *[u["ID"] for u in uploads])
    spooled = sorted((tmp_path / "spool" / "incoming").glob("*.dcm"))
    assert len(spooled) == len(uploads), "every acknowledged instance must be in the spool before the success answer"
    node.process.kill()
    node.process.wait(10)
    assert all(results(pacs, u["ParentStudy"]) == {"SR": [], "OT": []} for u in uploads)

    restarted = start_node(dicom_gateway.address, tmp_path, [pacs.destination], port=port)
    try:
        for upload in uploads:
            found = wait_results(pacs, upload["ParentStudy"])
            assert len(found["SR"]) == 1 and len(found["OT"]) == 1, found
        wait_for(
            lambda: (
                metric(restarted, "cxr_dicom_spool_depth", stage="incoming") == 0
                and metric(restarted, "cxr_dicom_spool_depth", stage="outbox") == 0
            ),
            30,
            "the spool to drain",
        )
        assert metric(restarted, "cxr_dicom_results_sent_total", destination=pacs.destination) == len(uploads)
    finally:
        assert restarted.stop() == 0


def test_stow_rs_to_orthancs_dicomweb_plugin_and_c_store_to_a_second_pacs(dicom_gateway, pacs, dicom_dir, tmp_path):
    """Several destinations at once: STOW-RS to the PACS that sent the instance, C-STORE to an archive."""
    port = orthanc.free_port()
    pacs.add_modality("cxr-stow", NODE_AE, "127.0.0.1", port)
    with orthanc.Orthanc.start(tmp_path / "archive", {}) as archive:
        node = start_node(dicom_gateway.address, tmp_path, [archive.destination], port=port, dicomweb=pacs.dicomweb)
        try:
            siim = next(p for p in dicom_files(dicom_dir) if p.name.startswith("siim_"))
            upload = pacs.upload(copy_with_new_uids(siim))
            pacs.store("cxr-stow", upload["ID"])
            found = wait_results(pacs, upload["ParentStudy"])
            assert len(found["SR"]) == 1 and len(found["OT"]) == 1
            wait_for(
                lambda: metric(node, "cxr_dicom_results_sent_total", destination=archive.destination) == 1,
                60,
                "the C-STORE to the archive",
            )
            assert metric(node, "cxr_dicom_results_sent_total", destination="dicomweb") == 1
            archived = {s["MainDicomTags"]["Modality"] for s in archive.get("/series?expand")}
            assert archived == {"SR", "OT"}, "the archive gets the results (and only them: it never had the source)"
        finally:
            assert node.stop() == 0


def test_a_destination_that_never_answers_ends_in_the_dead_letter_folder(dicom_gateway, pacs, dicom_dir, tmp_path):
    port = orthanc.free_port()
    pacs.add_modality("cxr-dead", NODE_AE, "127.0.0.1", port)
    nowhere = f"NOWHERE@127.0.0.1:{orthanc.free_port()}"
    node = start_node(
        dicom_gateway.address,
        tmp_path,
        [nowhere],
        port=port,
        extra=["--send-attempts", "3", "--retry-backoff", "0.05", "--network-timeout", "5"],
    )
    try:
        siim = next(p for p in dicom_files(dicom_dir) if p.name.startswith("siim_"))
        upload = pacs.upload(copy_with_new_uids(siim))
        pacs.store("cxr-dead", upload["ID"])
        wait_for(lambda: metric(node, "cxr_dicom_dead_letters_total", stage="send") == 1, 60, "the dead letter")
        assert metric(node, "cxr_dicom_results_failed_total", destination=nowhere) == 3
        [letter] = list((tmp_path / "spool" / "dead-letter").iterdir())
        reason = json.loads((letter / "reason.json").read_text())
        assert (
            reason["stage"] == "send"
            and reason["failed"] == {nowhere: "association_failed"}
            and reason["attempts"] == 3
        )
        assert sorted(p.name for p in letter.glob("*.dcm")) == ["sc.dcm", "sr.dcm"]
        assert (
            pydicom.dcmread(letter / "sr.dcm").StudyInstanceUID
            == pydicom.dcmread(io.BytesIO(pacs.instance_file(upload["ID"]))).StudyInstanceUID
        )
    finally:
        assert node.stop() == 0


def test_results_routed_back_to_the_node_are_not_classified_again(node, pacs, dicom_dir):
    """A PACS that forwards every new instance to us also forwards our own SR and SC: no loop."""
    path = next(p for p in dicom_files(dicom_dir) if p.name.startswith("nih_"))
    upload = pacs.upload(path.read_bytes())
    uid = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
    pacs.store("cxr", upload["ID"])
    found = wait_results(pacs, upload["ParentStudy"], uid)
    before = metric(node, "cxr_dicom_instances_refused_total", reason="own_result")
    pacs.store("cxr", found["SR"][0], found["OT"][0])
    wait_for(
        lambda: metric(node, "cxr_dicom_instances_refused_total", reason="own_result") == before + 2,
        60,
        "the node to recognise its own results",
    )
    assert results(pacs, upload["ParentStudy"]) == results(pacs, upload["ParentStudy"], uid) == found


def test_no_patient_data_in_the_nodes_logs_or_metrics(node, pacs, dicom_dir):
    from tests.e2e.test_phi import PLANTED

    nih = next(p for p in dicom_files(dicom_dir) if p.name.startswith("nih_"))
    planted = {k: v for k, v in PLANTED.items() if not k.endswith("InstanceUID")}
    data = copy_with_new_uids(nih, **planted)
    uids = {
        k: str(getattr(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), k))
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    }
    upload = pacs.upload(data)
    pacs.store("cxr", upload["ID"])
    found = wait_results(pacs, upload["ParentStudy"], uids["SOPInstanceUID"])
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["SR"][0])), stop_before_pixels=True)
    assert str(sr.PatientName) == planted["PatientName"], "the SR belongs to the source's patient"
    text = node.log_text() + node.metrics_text()
    for value in [*planted.values(), *uids.values()]:
        assert value.lower() not in text.lower(), f"{value!r} leaked into the node's logs or metrics"


def test_the_node_passes_tls_and_a_token_on_to_the_gateway_and_dead_letters_what_the_gateway_never_accepts(
    dicom_inference, pacs, dicom_dir, tmp_path
):
    from tests.gateway import processes
    from tests.gateway.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "tokens").write_text("node-secret\n")
    gateway = processes.start_gateway(
        dicom_inference.address,
        tmp_path / "gateway",
        extra=[
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-client-ca",
            str(pki.ca),
            "--auth-token-file",
            str(tmp_path / "tokens"),
        ],
    )
    siim = next(p for p in dicom_files(dicom_dir) if p.name.startswith("siim_"))
    tls = [
        "--gateway-tls",
        "--gateway-ca",
        str(pki.ca),
        "--gateway-cert",
        str(pki.client_cert),
        "--gateway-key",
        str(pki.client_key),
    ]
    try:
        (tmp_path / "good").mkdir()
        (tmp_path / "good" / "token").write_text("node-secret\n")
        port = orthanc.free_port()
        pacs.add_modality("cxr-tls", NODE_AE, "127.0.0.1", port)
        node = start_node(
            gateway.address,
            tmp_path / "good",
            [pacs.destination],
            port=port,
            extra=[*tls, "--gateway-token-file", str(tmp_path / "good" / "token")],
        )
        try:
            upload = pacs.upload(copy_with_new_uids(siim))
            pacs.store("cxr-tls", upload["ID"])
            found = wait_results(pacs, upload["ParentStudy"])
            assert len(found["SR"]) == 1 and len(found["OT"]) == 1
        finally:
            assert node.stop() == 0

        (tmp_path / "wrong").mkdir()
        (tmp_path / "wrong" / "token").write_text("not-the-secret\n")
        node = start_node(
            gateway.address,
            tmp_path / "wrong",
            [pacs.destination],
            port=port,
            extra=[
                *tls,
                "--gateway-token-file",
                str(tmp_path / "wrong" / "token"),
                "--classify-attempts",
                "2",
                "--retry-backoff",
                "0.05",
            ],
        )
        try:
            upload = pacs.upload(copy_with_new_uids(siim))
            pacs.store("cxr-tls", upload["ID"])
            wait_for(lambda: metric(node, "cxr_dicom_dead_letters_total", stage="classify") == 1, 60, "the dead letter")
            assert metric(node, "cxr_dicom_classify_errors_total", code="UNAUTHENTICATED") == 2
            [letter] = list((tmp_path / "wrong" / "spool" / "dead-letter").iterdir())
            assert json.loads((letter / "reason.json").read_text())["code"] == "UNAUTHENTICATED"
            assert (letter / "source.dcm").is_file(), "the acknowledged instance is kept, not dropped"
            assert results(pacs, upload["ParentStudy"]) == {"SR": [], "OT": []}
        finally:
            assert node.stop() == 0
    finally:
        gateway.stop()


def test_kill_9_while_processing_then_restart_gives_each_instance_its_results_once(
    dicom_gateway, pacs, dicom_dir, tmp_path
):
    """Killed mid-way (one instance's results stored, the others queued, classifying or being sent): after the
    restart every acknowledged instance has exactly one SR and one SC."""
    port = orthanc.free_port()
    pacs.add_modality("cxr-crash2", NODE_AE, "127.0.0.1", port)
    node = start_node(dicom_gateway.address, tmp_path, [pacs.destination], port=port)
    sources = [p for p in dicom_files(dicom_dir) if not p.name.startswith("Fake_")][:4] * 2
    uploads = [pacs.upload(copy_with_new_uids(p)) for p in sources]
    pacs.store("cxr-crash2", *[u["ID"] for u in uploads])  # all acknowledged
    wait_for(
        lambda: metric(node, "cxr_dicom_results_sent_total", destination=pacs.destination) >= 1,
        120,
        "the first results",
        interval=0.05,
    )
    node.process.kill()
    node.process.wait(10)
    left = sum(1 for _ in (tmp_path / "spool" / "incoming").glob("*.dcm")) + sum(
        1 for _ in (tmp_path / "spool" / "outbox").iterdir()
    )
    assert left >= 1, "the kill came too late to test anything: every instance was done"

    restarted = start_node(dicom_gateway.address, tmp_path, [pacs.destination], port=port)
    try:
        for upload in uploads:
            found = wait_results(pacs, upload["ParentStudy"])
            assert len(found["SR"]) == 1 and len(found["OT"]) == 1, found
        wait_for(
            lambda: (
                metric(restarted, "cxr_dicom_spool_depth", stage="incoming") == 0
                and metric(restarted, "cxr_dicom_spool_depth", stage="outbox") == 0
            ),
            60,
            "the spool to drain",
        )
        for upload in uploads:  # still exactly one of each once everything is done
            found = results(pacs, upload["ParentStudy"])
            assert len(found["SR"]) == 1 and len(found["OT"]) == 1, found
    finally:
        assert restarted.stop() == 0

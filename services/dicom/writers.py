"""The result objects, built with highdicom: a Comprehensive 3D SR (TID 1500 Measurement Report) with the
findings, and a Secondary Capture image with the heatmap overlay and the top class burnt in.

Both go into the source's study (patient and study modules copied from the source), each in a new series, and
reference the source SOP instance. Every UID is derived from the source SOP Instance UID and the model's identity
(its sha256): the same instance classified by the same model always gives the same objects' UIDs, so a re-send or
a recovery after a crash stores nothing twice, and another model gives new ones.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
# Our private coding scheme (PS3.16 8.2: designators beginning "99" are private) for the model's class labels,
# which are whatever folders the model was trained on, and for our own concepts.
SCHEME = "99CXR"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr:dicom-results")  # of our name-based (v5) UUIDs
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


@dataclass
class Classification:
    """What the gateway answered for one instance (the parts the result objects carry)."""

    model_name: str
    model_version: str
    model_sha256: str
    classes: list[tuple[str, float]]  # (label, probability) in the model's order
    top_class: str
    top_probability: float
    indeterminate: bool = False  # the gateway's "no confident answer" (its input gate): the SR then says so
    heatmap_png: bytes = b""
    notices: list[str] = field(default_factory=list)

    @property
    def model_identity(self) -> str:
        """What names the model's exact weights: its sha256, or name:version when the upstream does not say."""
        return self.model_sha256 or f"{self.model_name}:{self.model_version}"


@dataclass
class ResultUIDs:
    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str
    device: str
    tracking: str


# Type 2 attributes of the patient and study modules that the result objects copy: present (maybe empty) in the copy
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def evidence_header(source: Dataset) -> Dataset:
    """The source's header (no pixel data) with the Type 2 patient/study attributes the copy needs present:
    an older file (ACR-NEMA style, say) may lack some, and the result objects must still be valid."""
    header = Dataset()
    for element in source:
        if element.tag != 0x7FE00010:
            header.add(element)
    for keyword in TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def result_uids(source: Dataset, model_identity: str) -> ResultUIDs:
    """Deterministic UIDs (2.25.<name-based UUID>, PS3.5 B.2): one result series per source series and model, one SR and one
    SC per source instance and model; a Device UID per model file (IHE AIR: it changes when the weights change)."""
    sop, series = str(source.SOPInstanceUID), str(source.get("SeriesInstanceUID", ""))

    def uid(*parts: str) -> str:
        return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(parts)).int}"

    return ResultUIDs(
        sr_series=uid("sr-series", series, model_identity),
        sr_instance=uid("sr", sop, model_identity),
        sc_series=uid("sc-series", series, model_identity),
        sc_instance=uid("sc", sop, model_identity),
        device=uid("device", model_identity),
        tracking=uid("tracking", sop, model_identity),
    )


def class_code(label: str):
    """The coded concept of a class label in our private scheme (code values are at most 16 characters)."""
    from highdicom.sr import CodedConcept

    value = (
        label
        if len(label) <= 16 and label.isascii() and "\\" not in label
        else "C" + hashlib.sha1(label.encode()).hexdigest()[:15]
    )
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=label[:64])


def _concept(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


INDETERMINATE = ("indeterminate", "Indeterminate: no confident finding")
INTENDED_USE = ("intended-use", "Intended use")
RESEARCH_ONLY = ("research-only", "Not for clinical use: research software, not a medical device")
PROCEDURE = ("cxr-ai", "Chest radiograph AI classification")


def _equipment(result: Classification, uids: ResultUIDs, manufacturer: str, software: str):
    """The Contributing Equipment item (IHE AIR): the algorithm, its version and a Device UID of its weights."""
    import highdicom as hd

    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=result.model_name[:64],
        software_versions=[
            software[:64],
            f"model {result.model_name} {result.model_version}"[:64],
            *([result.model_sha256] if result.model_sha256 else []),
        ],
        contribution_description=f"AI classification, {NOT_FOR_CLINICAL_USE.lower()}",
    )
    item.DeviceUID = uids.device
    return item


def _software() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cxr {version('cxr')}"
    except PackageNotFoundError:
        return "cxr"


def build_sr(source: Dataset, result: Classification, manufacturer: str = "cxr") -> Dataset:
    """The Comprehensive 3D SR, TID 1500: a first measurement group "top finding" whose Finding is the top class
    (or Indeterminate) with the intended-use notice, then one group per class (Finding = the class) with its
    Probability (DCM 122157); the algorithm (TID 4019: name, version, sha256) on each group."""
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    source = evidence_header(source)
    uids = result_uids(source, result.model_identity)
    software = _software()
    algorithm = AlgorithmIdentification(
        name=result.model_name[:64],
        version=result.model_version or "-",
        parameters=[f"sha256={result.model_sha256}"] if result.model_sha256 else None,
        manufacturer=manufacturer,
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uids.device,
            name=f"{result.model_name} {result.model_version}"[:64],
            manufacturer_name=manufacturer,
            model_name=result.model_name[:64],
        ),
    )
    source_image = [SourceImageForMeasurementGroup.from_source_image(source)]
    finding = _concept(*INDETERMINATE) if result.indeterminate else class_code(result.top_class)
    groups = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uids.tracking, identifier="top finding"),
            finding_type=finding,  # TID 1501 "Finding" (DCM 121071)
            algorithm_id=algorithm,
            qualitative_evaluations=[
                QualitativeEvaluation(name=_concept(*INTENDED_USE), value=_concept(*RESEARCH_ONLY))
            ],
            source_images=source_image,
        )
    ]
    for index, (label, probability) in enumerate(result.classes):
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=f"{uids.tracking}.{index + 1}", identifier=f"probability of {label}"[:64]
                ),
                finding_type=class_code(label),
                algorithm_id=algorithm,
                measurements=[
                    Measurement(name=codes.DCM.Probability, value=float(probability), unit=codes.UCUM.NoUnits)
                ],
                source_images=source_image,
            )
        )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=_concept(*PROCEDURE),
        imaging_measurements=groups,
    )
    sr = Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_equipment(result, uids, manufacturer, software)],
        series_description=f"cxr AI findings - {NOT_FOR_CLINICAL_USE}",
    )
    sr.SoftwareVersions = software
    return sr


def _burn_in(png: bytes, lines: list[str]) -> np.ndarray:
    """The overlay PNG as RGB pixels with a black band at the top carrying `lines` in white."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.open(io.BytesIO(png)).convert("RGB")
    size = max(10, image.width // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    band = int(size * 1.4) * len(lines) + size // 2
    canvas = Image.new("RGB", (image.width, image.height + band), (0, 0, 0))
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((size // 2, size // 4 + i * int(size * 1.4)), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def sc_caption(result: Classification) -> list[str]:
    finding = "Indeterminate" if result.indeterminate else f"{result.top_class} {result.top_probability:.2f}"
    return [f"AI: {finding}", f"{result.model_name} v{result.model_version}  {NOT_FOR_CLINICAL_USE}"]


def build_sc(source: Dataset, result: Classification, manufacturer: str = "cxr") -> Dataset | None:
    """The Secondary Capture of the heatmap overlay with the finding burnt in; None when there is no heatmap."""
    import highdicom as hd

    if not result.heatmap_png:
        return None
    source = evidence_header(source)
    uids = result_uids(source, result.model_identity)
    pixels = _burn_in(result.heatmap_png, sc_caption(result))
    # the overlay keeps the source's orientation (the caption band only adds rows on top)
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(v in ("L", "R", "A", "P", "H", "F") for v in orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance,
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_equipment(result, uids, manufacturer, _software())],
        series_description=f"cxr AI heatmap - {NOT_FOR_CLINICAL_USE}",
    )
    if not known:
        sc.PatientOrientation = ""  # Type 2: unknown stays empty rather than guessed
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"AI result overlay, {NOT_FOR_CLINICAL_USE.lower()}"
    sc.SourceImageSequence = [_reference(source)]
    sc.SoftwareVersions = _software()
    return sc


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def encode(ds: Dataset) -> bytes:
    """A result object as DICOM Part 10 bytes (explicit VR little endian)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()

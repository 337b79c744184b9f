"""The input gate: refuse what the models were not built for, with a reason a person can act on.

From the DICOM header (before any inference):
    not_radiograph       Modality present and not CR or DX (CT, MR, NM, US, ... slices)
    not_chest            BodyPartExamined present and not a chest
    lateral_view         ViewPosition lateral (the models learnt frontal PA/AP views only)
From the pixels (after inference, from the model's `ood_score` output; training/ood.py):
    out_of_distribution  score above the model's threshold (config parameter cxr.ood_threshold)

A refusal is INVALID_ARGUMENT "image refused (<reason>): <what a person can do>" (the DICOM node parses the reason
from it). The gateway setting `gate_as_notice` turns chosen reasons into a notice on an answered response instead.
A patient younger than 18 (PatientAge) gets a notice, never a refusal. Nothing here logs or returns header values
beyond the coded facts (no PHI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cxr.dicom import LATERAL_VIEWS

REASONS = ("not_radiograph", "not_chest", "lateral_view", "out_of_distribution")
RADIOGRAPH_MODALITIES = {"CR", "DX"}
# BodyPartExamined is free-ish text (DICOM CS, site-defined): a chest is named in English, Latin, and other languages
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "TORAX", "TORACE", "LUNG", "PECHO", "BRUST", "POITRINE")
ADULT_AGE_YEARS = 18
PAEDIATRIC_NOTICE = (
    "paediatric patient (PatientAge under 18): the models learnt Normal and Lung_Opacity from adults only "
    "and Viral Pneumonia from children only, so a child's radiograph is pulled towards Viral Pneumonia "
    "whatever it shows"
)
NO_GATE_NOTICE = (
    "no input gate for this model (it has no ood_score output): images unlike chest radiographs are not "
    "detected; re-export the model with `cxr evaluate` + `cxr export` to get one"
)
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


@dataclass(frozen=True)
class Refusal:
    reason: str
    what: str  # what a person can do about it

    @property
    def message(self) -> str:
        """The refusal's status message, in the form every image refusal has (the DICOM node parses the reason)."""
        return f"image refused ({self.reason}): {self.what}"

    @property
    def notice(self) -> str:
        return f"input gate ({self.reason}), answered anyway as configured: {self.what}"


def header_refusals(header: dict[str, str]) -> list[Refusal]:
    """What the DICOM header facts (DecodedImage.header) rule out, in REASONS order."""
    found = []
    modality = header.get("Modality", "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        found.append(
            Refusal(
                "not_radiograph",
                f"the DICOM Modality is {_coded(modality)}, not a radiograph (CR or DX); send a chest radiograph",
            )
        )
    body_part = header.get("BodyPartExamined", "").upper()
    if body_part and not any(word in body_part for word in CHEST_WORDS):
        found.append(
            Refusal(
                "not_chest",
                f"the DICOM BodyPartExamined is {_coded(body_part)}, not a chest; the models "
                "read chest radiographs only (correct the tag if it is one)",
            )
        )
    view = header.get("ViewPosition", "").upper()
    if view in LATERAL_VIEWS:
        found.append(
            Refusal(
                "lateral_view",
                f"ViewPosition {view} is a lateral view; the models learnt frontal (PA/AP) "
                "chest radiographs only: send the frontal image of the study",
            )
        )
    return found


def ood_refusal(score: float, threshold: float) -> Refusal | None:
    if score <= threshold:
        return None
    return Refusal(
        "out_of_distribution",
        f"the image is unlike the chest radiographs the model learnt (score {score:.2f} "
        f"above the threshold {threshold:.2f}): send a frontal chest radiograph, "
        "upright, not inverted, whole lungs in view",
    )


def age_in_years(value: str) -> float | None:
    """DICOM AS ("045Y", "006M", "010W", "003D") in years; None when absent or malformed."""
    match = _AGE.match(value.strip().upper()) if value else None
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return number / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


def age_notice(header: dict[str, str]) -> str | None:
    age = age_in_years(header.get("PatientAge", ""))
    return PAEDIATRIC_NOTICE if age is not None and age < ADULT_AGE_YEARS else None


def parse_notice_only(setting: str) -> frozenset[str]:
    """The `gate_as_notice` setting: comma-separated reasons, or "all"."""
    names = {part.strip() for part in setting.split(",") if part.strip()}
    if "all" in names:
        return frozenset(REASONS)
    unknown = names - set(REASONS)
    if unknown:
        raise ValueError(
            f"gate_as_notice: unknown reason(s) {sorted(unknown)}; choose from {', '.join(REASONS)} or all"
        )
    return frozenset(names)


def _coded(value: str) -> str:
    """A coded header value, shown only when it looks like a code (never free text that could carry PHI)."""
    return value if re.fullmatch(r"[A-Z0-9 _-]{1,16}", value) else "(not a chest value)"

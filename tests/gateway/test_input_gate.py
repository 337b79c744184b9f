"""The input gate's policy on DICOM header facts, the paediatric notice and the refusal message format (no models)."""

from __future__ import annotations

import re

import pytest

from services.gateway import input_gate as G

MESSAGE = re.compile(r"^image refused \((?P<reason>[a-z_]+)\): (?P<what>.+)$")  # what the DICOM node parses


def _reasons(**header) -> list[str]:
    return [r.reason for r in G.header_refusals(header)]


@pytest.mark.parametrize(
    "modality,refused",
    [
        ("CR", False),
        ("DX", False),
        ("dx", False),
        ("CT", True),
        ("MR", True),
        ("NM", True),
        ("US", True),
        ("MG", True),
        ("", False),
    ],
)
def test_modality_other_than_cr_or_dx_is_not_a_radiograph(modality, refused):
    assert _reasons(Modality=modality) == (["not_radiograph"] if refused else [])


@pytest.mark.parametrize(
    "body_part,refused",
    [
        ("CHEST", False),
        ("Chest PA", False),
        ("THORAX", False),
        ("TORAX", False),
        ("LUNG", False),
        ("PORT CHEST", False),
        ("KNEE", True),
        ("HAND", True),
        ("ABDOMEN", True),
        ("SKULL", True),
        ("", False),
    ],
)
def test_body_part_present_and_not_a_chest(body_part, refused):
    assert _reasons(BodyPartExamined=body_part) == (["not_chest"] if refused else [])


@pytest.mark.parametrize(
    "view,refused",
    [("LL", True), ("RL", True), ("LATERAL", True), ("lat", True), ("PA", False), ("AP", False), ("", False)],
)
def test_lateral_view_position(view, refused):
    assert _reasons(ViewPosition=view) == (["lateral_view"] if refused else [])


def test_every_refusal_names_its_reason_and_what_to_do():
    refusals = G.header_refusals({"Modality": "CT", "BodyPartExamined": "HEAD", "ViewPosition": "LL"})
    assert [r.reason for r in refusals] == ["not_radiograph", "not_chest", "lateral_view"]
    for refusal in [*refusals, G.ood_refusal(3.5, 1.0)]:
        match = MESSAGE.match(refusal.message)
        assert match and match["reason"] == refusal.reason and len(match["what"]) > 20
        assert refusal.notice.startswith(f"input gate ({refusal.reason})")
    assert "CT" in refusals[0].message and "HEAD" in refusals[1].message


def test_free_text_header_values_are_never_quoted():
    (refusal,) = G.header_refusals({"BodyPartExamined": "John Smith's left knee"})
    assert refusal.reason == "not_chest" and "Smith" not in refusal.message


def test_ood_threshold_is_inclusive():
    assert G.ood_refusal(1.0, 1.0) is None and G.ood_refusal(0.2, 1.0) is None
    assert G.ood_refusal(1.0001, 1.0).reason == "out_of_distribution"


@pytest.mark.parametrize(
    "age,years",
    [
        ("045Y", 45.0),
        ("017Y", 17.0),
        ("006M", 0.5),
        ("003D", 3 / 365.25),
        ("052W", 52 / 52.18),
        ("45", None),
        ("", None),
        ("1234Y", None),
    ],
)
def test_patient_age(age, years):
    got = G.age_in_years(age)
    assert got == pytest.approx(years) if years is not None else got is None


def test_paediatric_notice_under_18_only():
    assert G.age_notice({"PatientAge": "017Y"}) == G.PAEDIATRIC_NOTICE
    assert G.age_notice({"PatientAge": "018Y"}) is None and G.age_notice({}) is None
    assert "Viral Pneumonia" in G.PAEDIATRIC_NOTICE and "children" in G.PAEDIATRIC_NOTICE


def test_gate_as_notice_setting():
    assert G.parse_notice_only("") == frozenset()
    assert G.parse_notice_only("lateral_view, out_of_distribution") == {"lateral_view", "out_of_distribution"}
    assert G.parse_notice_only("all") == set(G.REASONS)
    with pytest.raises(ValueError, match="unknown reason"):
        G.parse_notice_only("lateral")

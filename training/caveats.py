"""What a model card must say about the data a model learnt from: which population each class was learnt from (the
confound that remains), how its labels were made, and the label cleaning chosen. Written from the run's own counts
(RUN_DIR/data.json) and what the data READMEs say of each origin, so the statement follows the data."""

from __future__ import annotations

# What ../shared/data/*/README.md say of each source_origin (population, site, how the label was made).
ORIGINS = {
    "nih": "adults (NIH ChestX-ray14, NIH Clinical Center, USA)",
    "kermany": "children aged 1-5 (Kermany et al., Guangzhou Women and Children's Medical Center)",
    "bimcv_rdb": "adults with COVID-19 (BIMCV-COVID19+, Valencia region; labels are PCR/antibody results, not image findings)",
    "figure1": "adults with COVID-19 (Figure1 clinician-submitted cases; some are photographs of monitors)",
    "actualmed": "adults (Actualmed, COVID-era portable films)",
    "synthetic": "synthetic phantoms (cxr demo-data): not radiographs",
}
CHILD_ORIGINS = {"kermany"}
ADULT_ORIGINS = {"nih", "bimcv_rdb", "figure1", "actualmed"}


def caveats(classes: list[str], data_facts: dict, label_policy: str) -> list[str]:
    """Plain sentences for the model card's "caveats" list."""
    train = data_facts.get("train", {})  # {source: {class: n}}
    out = []
    for name in classes:
        sources = sorted(s for s, counts in train.items() if counts.get(name))
        if not sources:
            continue
        who = "; ".join(f"{s} {train[s][name]} ({ORIGINS.get(s, 'origin not described')})" for s in sources)
        ages = (
            "children only"
            if set(sources) <= CHILD_ORIGINS
            else "adults only"
            if set(sources) <= ADULT_ORIGINS
            else "children and adults"
        )
        out.append(f"{name} was learnt from {ages}; training images per origin: {who}.")
    viral_sources = {s for s, counts in train.items() if counts.get("Viral Pneumonia")}
    if viral_sources & CHILD_ORIGINS and viral_sources & ADULT_ORIGINS:
        out.append(
            "Viral Pneumonia in adults is COVID-19 only (no influenza, RSV or other adult viral pneumonia was "
            "available); in children it is Kermany's viral pneumonia. Source, age and site still go together "
            "with the classes: per-origin results and the same-site normals check are in the metrics."
        )
    if "Lung_Opacity" in classes:
        out.append(
            "Lung_Opacity is a proxy: NIH ChestX-ray14 images whose text-mined report label includes "
            "'Pneumonia', not a radiologist's read; where RSNA radiologists re-read the same images, 90 of 148 "
            "were judged not to show lung opacity. The model was not shown children with lung opacity, nor adults "
            "with non-COVID viral pneumonia: do not use it for them."
        )
    if label_policy == "drop_contradicted":
        removed = data_facts.get("removed_from_training") or {}
        out.append(
            "Label cleaning: training images whose label a radiologist contradicted were left out of training ("
            + (", ".join(f"{k}: {v}" for k, v in removed.items()) or "none in this split")
            + "); validation keeps them, and metrics are given on the whole split and on its consistent subset."
        )
    else:
        out.append(
            "Label cleaning: none (every label kept, also those a radiologist contradicted); metrics are given on "
            "the whole validation split and on its radiologist-consistent subset."
        )
    if data_facts.get("site_check"):
        out.append(
            f"Same-site check: {data_facts['site_check']}, so that a site learnt in place of the disease shows "
            "as those normals called Viral Pneumonia (metrics per_source)."
        )
    out.append(
        "Validation is a split of the same sources (patient-disjoint), not an external test: expect lower "
        "accuracy on other hospitals, scanners and populations."
    )
    return out

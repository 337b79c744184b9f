"""The adult viral pneumonia folder (cxr-adult-viral) beside cxr-raw: found with its origins and patients from its
manifest, split by patient together with cxr-raw (every origin on both sides), its same-site normals held in
validation as the check that a site is not learnt in place of the disease."""

from __future__ import annotations

from collections import Counter, defaultdict

from training import data as D
from training.config import TrainConfig
from training.train import prepare_split

CLASSES = list(D.DEFAULT_CLASSES)


def test_discovery_of_an_extra_folder_without_every_class(cxr_adult_viral_dir):
    found = D.discover(cxr_adult_viral_dir, CLASSES, dataset="cxr-adult-viral", require_all_classes=False)
    counts = Counter((CLASSES[s.label], s.source_origin) for s in found.samples)
    assert counts == {
        ("Viral Pneumonia", "bimcv_rdb"): 600,
        ("Viral Pneumonia", "figure1"): 32,
        ("Viral Pneumonia", "actualmed"): 26,
        ("Normal", "actualmed"): 18,
        ("Normal", "figure1"): 2,
    }
    assert all(s.dataset == "cxr-adult-viral" for s in found.samples)
    assert len({s.patient for s in found.samples if s.source_origin == "figure1"}) < 34  # patients from the manifest
    assert all(not s.patient.startswith("file:") for s in found.samples)


def test_split_with_the_adult_viral_folder_is_patient_disjoint_per_origin(cxr_raw_dir, cxr_adult_viral_dir, tmp_path):
    cfg = TrainConfig(
        data=str(cxr_raw_dir), extra_data=[str(cxr_adult_viral_dir)], architecture="custom_cnn", image_size=32
    )
    facts: dict = {}
    train_set, val_set = prepare_split(cfg, tmp_path, facts)
    samples, split = D.read_split(tmp_path / D.SPLIT_FILE, CLASSES)
    assert len(samples) == 872 + 678
    sides = defaultdict(set)
    for s, side in zip(samples, split):
        sides[s.patient].add(side)
    assert all(len(v) == 1 for v in sides.values())  # no patient on both sides
    # the same-site normals (and their patients) are all in validation, never in training
    assert {s.source_origin for s in train_set.samples if s.dataset and s.label == 0} == set()
    assert sum(1 for s in val_set.samples if s.dataset and s.label == 0) == 20
    # every origin of the adult viral images is in both training and validation, about 80/20
    for origin in ("bimcv_rdb", "figure1", "actualmed"):
        n_train = sum(1 for s in train_set.samples if s.source_origin == origin and s.label == 2)
        n_val = sum(1 for s in val_set.samples if s.source_origin == origin and s.label == 2)
        assert n_train > 0 and n_val > 0 and 0.1 < n_val / (n_train + n_val) < 0.35, origin
    assert facts["extra_data"] == ["cxr-adult-viral"] and "validation only" in facts["site_check"]
    assert set(facts["val"]) == {"nih", "kermany", "bimcv_rdb", "figure1", "actualmed"}
    # the images are read from their own folder
    adult = [i for i, s in enumerate(val_set.samples) if s.dataset == "cxr-adult-viral"]
    from cxr.imaging import load_for_model

    s = val_set.samples[adult[0]]
    assert (val_set.images[adult[0]] == load_for_model(cxr_adult_viral_dir / s.file, 32)).all()

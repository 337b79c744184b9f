"""Label cleaning as the user's choice (--label-policy over radiologist_labels.csv, --exclude FILE.csv): contradicted
images leave training, never validation; the choice and its counts are recorded; evaluation reports every metric on
the whole validation split and on its radiologist-consistent subset, per source."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from training import data as D
from training.config import TrainConfig
from training.evaluate import CONSISTENT_SUBSET, evaluate_predictions
from training.train import prepare_split


def _cfg(cxr_raw_dir, **kw) -> TrainConfig:
    return TrainConfig(data=str(cxr_raw_dir), architecture="custom_cnn", image_size=32, max_per_class=60, **kw)


def test_discovery_reads_the_radiologist_verdicts(cxr_raw_dir):
    found = D.discover(cxr_raw_dir, list(D.DEFAULT_CLASSES))
    assert found.radiologist_labels == cxr_raw_dir / D.RADIOLOGIST_FILE  # DATA/radiologist_labels.csv when present
    contradicted = [s for s in found.samples if s.contradicted]
    by_class = {c: sum(s.label == i for s in contradicted) for i, c in enumerate(D.DEFAULT_CLASSES)}
    assert by_class == {"Normal": 13, "Lung_Opacity": 90, "Viral Pneumonia": 0}  # the README's table
    assert {s.radiologist for s in found.samples if s.source_origin == "kermany"} == {"not nih"}


@pytest.mark.parametrize("policy", ["keep", "drop_contradicted"])
def test_label_policy_changes_training_only(cxr_raw_dir, tmp_path, policy):
    facts: dict = {}
    train_set, val_set = prepare_split(_cfg(cxr_raw_dir, label_policy=policy), tmp_path, facts)
    samples, split = D.read_split(tmp_path / D.SPLIT_FILE, list(D.DEFAULT_CLASSES))
    everyone_train = [s for s, side in zip(samples, split) if side == "train"]
    everyone_val = [s for s, side in zip(samples, split) if side == "val"]
    assert [s.file for s in val_set.samples] == [s.file for s in everyone_val]  # validation keeps every image
    assert any(s.contradicted for s in everyone_train) and any(s.contradicted for s in everyone_val)
    if policy == "keep":
        assert len(train_set.samples) == len(everyone_train) and facts["removed_from_training"] == {}
    else:
        assert not any(s.contradicted for s in train_set.samples)
        kept = [s.file for s in everyone_train if not s.contradicted]
        assert [s.file for s in train_set.samples] == kept
        removed = sum(facts["removed_from_training"].values())
        assert removed == len(everyone_train) - len(kept) > 0
    assert facts["label_policy"] == policy and facts["val_contradicted"] == sum(s.contradicted for s in everyone_val)
    # split.csv records each verdict, so evaluation finds the consistent subset whatever the policy
    with open(tmp_path / D.SPLIT_FILE, newline="") as fh:
        assert "radiologist" in next(csv.reader(fh))


def test_exclude_file_removes_the_listed_training_images(cxr_raw_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first, _ = prepare_split(_cfg(cxr_raw_dir), run)
    listed = [s.file for s in first.samples[:5]]
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("file,reason\n" + "".join(f"{f},blurred\n" for f in listed))
    facts: dict = {}
    second, _ = prepare_split(_cfg(cxr_raw_dir, exclude=str(exclude)), run, facts)
    assert [s.file for s in second.samples] == [s.file for s in first.samples[5:]]
    assert facts["exclude"] == "exclude.csv" and sum(facts["removed_from_training"].values()) == 5
    with pytest.raises(ValueError, match="file"):
        (tmp_path / "bad.csv").write_text("name\nx.png\n")
        prepare_split(_cfg(cxr_raw_dir, exclude=str(tmp_path / "bad.csv")), run)


def test_drop_contradicted_without_radiologist_labels_is_a_clear_error(tmp_path, cxr_raw_dir):
    import shutil

    for cls in D.DEFAULT_CLASSES:
        (tmp_path / "d" / cls).mkdir(parents=True)
        for f in sorted((cxr_raw_dir / cls).glob("*.png"))[:4]:
            shutil.copy(f, tmp_path / "d" / cls / f.name)
    cfg = TrainConfig(
        data=str(tmp_path / "d"), architecture="custom_cnn", image_size=32, label_policy="drop_contradicted"
    )
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="radiologist"):
        prepare_split(cfg, tmp_path / "run")


def test_evaluation_on_the_whole_split_and_the_consistent_subset_per_source():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n)
    sources = np.where(labels == 2, "kermany", np.where(rng.random(n) < 0.5, "nih", "kermany")).tolist()
    contradicted = (labels == 1) & (rng.random(n) < 0.6)
    logits = rng.normal(size=(n, 3)) + 2.5 * np.eye(3)[labels]
    logits[contradicted] = rng.normal(size=(contradicted.sum(), 3))  # noisy labels: the model cannot match them
    classes = ["Normal", "Lung_Opacity", "Viral Pneumonia"]
    metrics = evaluate_predictions(labels, logits, classes, sources, contradicted=contradicted)
    sub = metrics[CONSISTENT_SUBSET]
    assert sub["n"] == n - contradicted.sum() and sub["excluded"] == contradicted.sum()
    assert sub["accuracy"] > metrics["accuracy"] and sub["macro_auc"] > metrics["macro_auc"]
    keep = ~contradicted
    alone = evaluate_predictions(
        labels[keep], logits[keep], classes, np.array(sources)[keep].tolist(), temperature=metrics["temperature"]
    )  # the same temperature as the whole split
    for key in ("accuracy", "macro_auc", "macro_f1", "ece_after"):
        assert sub[key] == pytest.approx(alone[key])
    for block in (metrics, sub):
        assert set(block["per_source"]) == {"nih", "kermany"}
        for source, m in block["per_source"].items():
            mask = (np.array(sources) == source) & (keep if block is sub else True)
            assert m["n"] == mask.sum()
            assert {
                "accuracy",
                "accuracy_ci95",
                "auc_among_its_classes",
                "per_class_recall",
                "predicted",
                "ece_after",
            } <= set(m)
        assert block["per_source"]["nih"]["classes"] == ["Normal", "Lung_Opacity"]
    json.dumps(metrics)  # metrics.json can hold it

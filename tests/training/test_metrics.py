"""The one macro-AUC definition (training/metrics.py) against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.metrics import binary_auc, macro_auc


@pytest.mark.parametrize("seed", range(5))
def test_macro_auc_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + np.eye(3)[labels] * rng.uniform(0, 2)
    logits[:40] = np.round(logits[:40] * 2) / 2  # repeated scores: both must average the ties
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auc(labels, probs) == pytest.approx(expected, abs=1e-12)
    for c in range(3):
        assert binary_auc(labels == c, probs[:, c]) == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-12)


def test_absent_classes_are_left_out_and_a_single_class_has_no_auc():
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.4, 0.5, 0.1]])
    both = [roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)]
    assert macro_auc(labels, probs) == pytest.approx(np.mean(both))  # class 2 has no positives: not in the mean
    assert np.isnan(macro_auc(np.zeros(4, int), probs[:4]))
    assert np.isnan(binary_auc(np.ones(3, bool), np.arange(3.0)))

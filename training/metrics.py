"""The one macro-AUC definition, used for early stopping (train.py) and in every report (evaluate.py).

Macro one-vs-rest ROC AUC over the classes present in `labels` (a class absent from a split, or the only class
present, has no AUC and is left out of the mean): for 2+ classes present it equals scikit-learn's
`roc_auc_score(labels, probs, multi_class="ovr", average="macro")` on those classes' columns
(tests/training/test_metrics.py), computed by the rank-sum formula in numpy, which is much faster inside
bootstrap loops.
"""

from __future__ import annotations

import numpy as np


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(labels: np.ndarray, probs: np.ndarray, classes: list[int] | None = None) -> float:
    """Macro one-vs-rest AUC over `classes` (default: all columns) that are present, and not alone, in `labels`."""
    labels = np.asarray(labels)
    scores = []
    for c in range(probs.shape[1]) if classes is None else classes:
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        scores.append(binary_auc(positive, probs[:, c]))
    return float(np.mean(scores)) if scores else float("nan")

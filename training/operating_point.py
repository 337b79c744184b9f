"""The "indeterminate" answer: a top-probability threshold (the operating point) below which the model does not
commit to a class (selective classification, Geifman & El-Yaniv 2017).

Fitted on the validation split's calibrated probabilities: the lowest threshold (the most cases answered) at which the
accuracy among the answered cases is still at least TARGET_ACCURACY. Where no threshold reaches the target, the one
with the best accuracy among those answering at least MIN_COVERAGE of the cases is taken, and `reached` says so.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_ACCURACY = 0.95
MIN_COVERAGE = 0.10


def coverage_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, coverage, accuracy among answered) for every distinct threshold, coverage ascending.

    Answered = top probability >= threshold; ties at a threshold are answered together."""
    top = probs.max(1)
    correct = probs.argmax(1) == labels
    order = np.argsort(-top, kind="stable")
    top, correct = top[order], correct[order]
    answered = np.arange(1, len(top) + 1)
    last_of_tie = np.r_[top[1:] < top[:-1], True] if len(top) else np.zeros(0, bool)
    accuracy = np.cumsum(correct) / answered
    return top[last_of_tie], answered[last_of_tie] / max(len(top), 1), accuracy[last_of_tie]


def fit_operating_point(
    probs: np.ndarray, labels: np.ndarray, target_accuracy: float = TARGET_ACCURACY, min_coverage: float = MIN_COVERAGE
) -> dict:
    """The operating point and what it does on the data it was fitted on."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no validation predictions to fit the operating point on")
    thresholds, coverage, accuracy = coverage_curve(probs, labels)
    reaching = np.flatnonzero(accuracy >= target_accuracy)
    if len(reaching):
        i = int(reaching[-1])  # the most coverage that still meets the target
    else:
        allowed = np.flatnonzero(coverage >= min(min_coverage, coverage[-1]))
        i = int(allowed[np.argmax(accuracy[allowed])])
    threshold = float(thresholds[i])  # every case meeting the target: the lowest top probability seen, kept
    answered = probs.max(1) >= threshold
    return {
        "min_top_probability": threshold,
        "target_accuracy": float(target_accuracy),
        "reached": bool(len(reaching)),
        "coverage": float(answered.mean()),
        "accuracy_answered": float((probs.argmax(1) == labels)[answered].mean()),
        "accuracy_all": float((probs.argmax(1) == labels).mean()),
        "n": int(len(labels)),
        "rule": "indeterminate when the top calibrated probability is below min_top_probability",
    }


def plot_coverage(probs: np.ndarray, labels: np.ndarray, point: dict, path, title: str, note: str) -> None:
    """Accuracy among the answered cases against the share answered, with the chosen operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, coverage, accuracy = coverage_curve(np.asarray(probs, dtype=np.float64), np.asarray(labels))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(coverage, accuracy, marker=".", label="accuracy among answered")
    ax.axhline(point["target_accuracy"], color="grey", linestyle=":", label=f"target {point['target_accuracy']:.2f}")
    ax.scatter(
        [point["coverage"]],
        [point["accuracy_answered"]],
        color="red",
        zorder=3,
        label=f"operating point p >= {point['min_top_probability']:.3f}: coverage {point['coverage']:.2f}",
    )
    low = min(accuracy.min() if len(accuracy) else 1.0, point["target_accuracy"])
    ax.set(
        xlabel="coverage (share answered)",
        ylabel="accuracy",
        title=f"Coverage vs accuracy: {title}",
        xlim=(0, 1.02),
        ylim=(max(0.0, math.floor(low * 20) / 20 - 0.05), 1.01),
    )
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.005, note, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation split, so that softmax(logits / T)
is calibrated; and the expected calibration error that measures it."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits.astype(np.float64), temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the validation negative log-likelihood: coarse log-grid, then golden-section refinement."""
    if len(labels) == 0:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [nll(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if nll(logits, labels, np.exp(a)) < nll(logits, labels, np.exp(b)):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top-class probability."""
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) per non-empty bin, for the reliability diagram."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    rows = [(conf[m].mean(), correct[m].mean(), m.sum()) for lo, hi in zip(edges[:-1], edges[1:])
            if (m := (conf > lo) & (conf <= hi)).any()]
    arr = np.array(rows) if rows else np.zeros((0, 3))
    return arr[:, 0], arr[:, 1], arr[:, 2]


def cross_fitted_ece(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """ECE after temperature scaling where each half of the split is scored with T fitted on the other half, so the
    number is not measured on the data T was fitted to."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    probs = np.zeros(logits.shape, dtype=np.float64)
    for score, fit in ((halves[0], halves[1]), (halves[1], halves[0])):
        probs[score] = softmax(logits[score].astype(np.float64), fit_temperature(logits[fit], labels[fit]))
    return expected_calibration_error(probs, labels)

"""The input gate's pixel check: how unlike the training radiographs an image is (out-of-distribution score).

Method: the Mahalanobis distance of the pooled features (the classifier head's input) to class-conditional Gaussians
with one shared covariance, fitted on the training split (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples"). The covariance is shrunk towards a scaled identity by the Ledoit-Wolf formula: a
network has 256 to 2048 features and the training split only a few hundred images, so the plain estimate is singular.

score(x) = min_c (f(x) - mu_c)^T Sigma^-1 (f(x) - mu_c) / threshold

The threshold is fitted on the validation split so that a stated share of real radiographs (ACCEPTANCE) scores at or
below it, and is folded into the graph: the exported `ood_score` is in units of that threshold, so 1.0 is the fitted
gate for every model and every version (an operator can loosen or tighten it per model with `cxr.ood_threshold`).
The energy score (-logsumexp of the logits; Liu et al. 2020) is here too, for the comparison in the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACCEPTANCE = 0.99  # share of the validation radiographs the fitted threshold lets through
METHOD = "mahalanobis"


@dataclass
class Gaussians:
    """Class means and the whitening matrix W of the shared covariance (W W^T = Sigma^-1), float64."""

    means: np.ndarray  # [C, F]
    whitening: np.ndarray  # [F, F]
    shrinkage: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to every class mean: [N, C]."""
        z = np.asarray(features, dtype=np.float64) @ self.whitening
        m = self.means @ self.whitening
        return ((z[:, None, :] - m[None]) ** 2).sum(-1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest class: [N] (higher = less like the training images)."""
        return self.distances(features).min(1) if len(features) else np.zeros(0)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "whitening": self.whitening, "shrinkage": np.array(self.shrinkage)}

    @classmethod
    def from_arrays(cls, arrays) -> "Gaussians":
        return cls(np.asarray(arrays["means"]), np.asarray(arrays["whitening"]), float(arrays["shrinkage"]))


def fit_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Gaussians:
    """Class means and the Ledoit-Wolf-shrunk covariance of the features around their own class mean."""
    from sklearn.covariance import ledoit_wolf

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        raise ValueError("no training features to fit the input gate on")
    means = np.stack([features[labels == c].mean(0) if (labels == c).any() else np.full(features.shape[1], np.nan)
                      for c in range(num_classes)])
    centred = features - means[labels]
    covariance, shrinkage = ledoit_wolf(centred, assume_centered=True)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-10)
    whitening = vectors / np.sqrt(eigenvalues)  # columns scaled: W W^T = V diag(1/lambda) V^T = Sigma^-1
    # a class absent from training cannot be near anything: keep only the classes that were seen
    return Gaussians(means[present], whitening, float(shrinkage))


def energy(logits: np.ndarray) -> np.ndarray:
    """Negative free energy -logsumexp(logits): higher = less like the training images (the sign matches ours)."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(1)))


def fit_threshold(scores: np.ndarray, acceptance: float = ACCEPTANCE) -> float:
    """The smallest score at or below which at least `acceptance` of `scores` lie (the validation radiographs)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if len(ordered) == 0:
        raise ValueError("no validation scores to fit the threshold on")
    k = min(len(ordered), max(1, math.ceil(acceptance * len(ordered))))
    threshold = float(ordered[k - 1])
    return threshold if threshold > 0 else float(np.finfo(np.float32).tiny)


def refused_share(scores: np.ndarray, threshold: float) -> float:
    scores = np.asarray(scores)
    return float((scores > threshold).mean()) if len(scores) else float("nan")


def separation_auc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """ROC AUC of telling `out_scores` (should be high) from `in_scores`: 1.0 = perfectly separated."""
    from scipy.stats import rankdata

    scores = np.concatenate([in_scores, out_scores])
    ranks = rankdata(scores)
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


# --- torch: features of a trained network, and the score as a graph module ------------------------------------------


def forward_features(model, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N,C], pooled features [N,F]) of uint8 [N,S,S] images, evaluation mode, no augmentation."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    logits, features = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).unsqueeze(1).to(device)
            lg, _, pooled = model.forward_all(x)
            logits.append(lg.float().cpu().numpy())
            features.append(pooled.float().cpu().numpy())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def score_module(gaussians: Gaussians, threshold: float):
    """An nn.Module: pooled features [N,F] -> ood_score [N] (squared Mahalanobis distance / threshold), float32."""
    import torch
    from torch import nn

    class MahalanobisScore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = gaussians.whitening
            self.register_buffer("whitening", torch.tensor(w, dtype=torch.float32))
            self.register_buffer("white_means", torch.tensor(gaussians.means @ w, dtype=torch.float32))
            self.register_buffer("inv_threshold", torch.tensor(1.0 / threshold, dtype=torch.float32))

        def forward(self, pooled: torch.Tensor) -> torch.Tensor:
            z = pooled @ self.whitening  # [N, F]
            d = ((z.unsqueeze(1) - self.white_means.unsqueeze(0)) ** 2).sum(-1)  # [N, C]
            return d.min(dim=1).values * self.inv_threshold

    return MahalanobisScore()

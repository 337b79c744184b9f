"""The input gate's pixel check: how unlike the training radiographs an image is (out-of-distribution score).

Method: the Mahalanobis distance to class-conditional Gaussians with one shared covariance, fitted on the training
split (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"), on the features of
several depths of the network, as Lee et al. do: for each top-level block in the deeper half of the backbone, the
spatial mean of its output (and the spatial standard deviation, for blocks of at most STD_MAX_CHANNELS channels; the
last block's mean is the classifier head's input). Each block's distance is divided by its median on the validation
split, so the blocks weigh alike, and the score is their sum. Each covariance is shrunk towards a scaled identity by
the Ledoit-Wolf formula: a block has up to 2048 features and the training split only a few hundred images.

    score(x) = sum_l min_c (f_l(x) - mu_lc)^T Sigma_l^-1 (f_l(x) - mu_lc) / median_l / threshold

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
METHOD = "mahalanobis, several depths"
STD_MAX_CHANNELS = 512  # wider blocks contribute their mean only (a 4096-wide whitening matrix would be 64 MB)


@dataclass
class Gaussians:
    """Class means and the whitening matrix W of the shared covariance (W W^T = Sigma^-1), float64."""

    means: np.ndarray  # [C, F]
    whitening: np.ndarray  # [F, F]
    shrinkage: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to every class mean: [N, C]."""
        diff = np.asarray(features, dtype=np.float64)[:, None, :] - self.means[None]
        return ((diff @ self.whitening) ** 2).sum(-1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest class: [N] (higher = less like the training images)."""
        return self.distances(features).min(1) if len(features) else np.zeros(0)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "whitening": self.whitening, "shrinkage": np.array(self.shrinkage)}

    @classmethod
    def from_arrays(cls, arrays) -> Gaussians:
        return cls(np.asarray(arrays["means"]), np.asarray(arrays["whitening"]), float(arrays["shrinkage"]))


def fit_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Gaussians:
    """Class means and the Ledoit-Wolf-shrunk covariance of the features around their own class mean."""
    from sklearn.covariance import ledoit_wolf

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        raise ValueError("no training features to fit the input gate on")
    means = np.stack(
        [
            features[labels == c].mean(0) if (labels == c).any() else np.full(features.shape[1], np.nan)
            for c in range(num_classes)
        ]
    )
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
    from training.metrics import binary_auc

    is_out = np.r_[np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)]
    return binary_auc(is_out, np.concatenate([in_scores, out_scores]))


@dataclass
class Gate:
    """One Gaussians per scored block, each block's validation median distance, and the fitted threshold."""

    layers: list[Gaussians]
    medians: list[float]
    threshold: float = 1.0

    def score(self, layer_features: list[np.ndarray]) -> np.ndarray:
        """[N] in units of the threshold."""
        total = sum(g.score(f) / m for g, m, f in zip(self.layers, self.medians, layer_features))
        return np.asarray(total) / self.threshold

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"medians": np.array(self.medians), "threshold": np.array(self.threshold)}
        for i, g in enumerate(self.layers):
            out.update({f"{k}_{i}": v for k, v in g.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays) -> Gate:
        medians = [float(m) for m in np.asarray(arrays["medians"])]
        layers = [
            Gaussians.from_arrays({k: arrays[f"{k}_{i}"] for k in ("means", "whitening", "shrinkage")})
            for i in range(len(medians))
        ]
        return cls(layers, medians, float(arrays["threshold"]))


def fit_gate(
    train: list[np.ndarray],
    train_labels: np.ndarray,
    val: list[np.ndarray],
    num_classes: int,
    acceptance: float = ACCEPTANCE,
) -> tuple[Gate, np.ndarray]:
    """Fit the Gaussians of each block on the training split, their medians and the threshold on the validation
    split. Returns the gate and the validation scores (in units of the threshold)."""
    layers = [fit_gaussians(f, train_labels, num_classes) for f in train]
    medians = [max(float(np.median(g.score(v))), 1e-12) for g, v in zip(layers, val)]
    gate = Gate(layers, medians)
    gate.threshold = fit_threshold(gate.score(val), acceptance)
    return gate, gate.score(val)


# --- torch: features of a trained network, and the score as a graph module ------------------------------------------


def scored_blocks(count: int) -> range:
    """Which of a backbone's `count` top-level blocks the gate scores: the deeper half."""
    return range(count // 2, count)


def block_features(taps):
    """Per scored block: [N, C] spatial mean, with the spatial standard deviation appended when C <= STD_MAX_CHANNELS."""
    import torch

    out = []
    for i in scored_blocks(len(taps)):
        t = taps[i]
        mean = t.mean(dim=(2, 3))
        if t.shape[1] <= STD_MAX_CHANNELS:
            std = ((t - mean[:, :, None, None]) ** 2).mean(dim=(2, 3)).clamp_min(0).sqrt()
            mean = torch.cat([mean, std], dim=1)
        out.append(mean)
    return out


def forward_features(model, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits [N,C], the scored blocks' features [[N,D_l]]) of uint8 [N,S,S] images, evaluation mode."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    logits, features = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).unsqueeze(1).to(device)
            lg, _, taps = model.forward_all(x)
            logits.append(lg.float().cpu().numpy())
            features.append([f.float().cpu().numpy() for f in block_features(taps)])
    if not logits:
        raise ValueError("no images to compute features of")
    return np.concatenate(logits), [np.concatenate(layer) for layer in zip(*features)]


def score_module(gate: Gate):
    """An nn.Module: the backbone blocks' outputs (CxrNet.forward_all's taps) -> ood_score [N, 1] float32, 1.0 = threshold.
    The distances are computed in float64 (ONNX DOUBLE; onnxruntime's CPU and CUDA providers run it)."""
    import torch
    from torch import nn

    class MahalanobisScore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, (g, median) in enumerate(zip(gate.layers, gate.medians)):
                # in float64: the whitening of near-degenerate directions loses ~1% to float32 rounding
                self.register_buffer(f"whitening_{i}", torch.tensor(g.whitening, dtype=torch.float64))
                self.register_buffer(f"means_{i}", torch.tensor(g.means, dtype=torch.float64))
                self.register_buffer(f"scale_{i}", torch.tensor(1.0 / (median * gate.threshold), dtype=torch.float64))
            self.count = len(gate.layers)

        def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
            total = None
            for i, f in enumerate(block_features(taps)):
                # subtract the means before whitening: f @ W and mu @ W can be large and nearly equal (float32
                # cancellation), the difference of features and means is not
                diff = f.double().unsqueeze(1) - getattr(self, f"means_{i}").unsqueeze(0)  # [N, C, D]
                d = ((diff @ getattr(self, f"whitening_{i}")) ** 2).sum(-1)  # [N, C]
                part = d.min(dim=1).values * getattr(self, f"scale_{i}")
                total = part if total is None else total + part
            return total.float().unsqueeze(1)  # [N, 1]: Triton needs a non-empty dims beside the batch axis

    return MahalanobisScore()

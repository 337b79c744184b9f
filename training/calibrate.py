"""What is fitted on a run's validation split after training, stored once in the run folder, and applied by the
exporter: the temperature (Guo et al. 2017: softmax(logits / T) calibrated), the operating point of the
"indeterminate" answer (training/operating_point.py) and the input gate's out-of-distribution threshold with its
Gaussians fitted on the training split (training/ood.py). Also the expected calibration error that measures T.

    RUN/calibration.json   {"temperature", "operating_point", "input_gate"}   (Calibration.save / Calibration.load)
    RUN/input_gate.npz     per scored block: class means, whitening matrix, validation median; the threshold; the
                           validation scores (for an ensemble's own threshold)

`cxr evaluate` fits and writes them (fit_run); `cxr export` only reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.json"
GATE_FILE = "input_gate.npz"
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass
class Calibration:
    """The post-training fit of one run (or of an ensemble's evaluation folder)."""

    temperature: float | None  # None for an ensemble: its members are calibrated one by one
    operating_point: dict
    input_gate: dict | None = None  # None: no gate fitted (a run evaluated before the input gate existed)
    members: list[str] | None = None  # an ensemble's member run folders

    def save(self, folder: Path, gate_arrays: dict | None = None) -> None:
        folder = Path(folder)
        (folder / CALIBRATION_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")
        if gate_arrays is not None:
            np.savez(folder / GATE_FILE, **gate_arrays)

    @classmethod
    def load(cls, folder: Path) -> Calibration:
        """Raises FileNotFoundError (saying which command makes it) when the folder was never evaluated."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run `cxr evaluate {folder}` first (it fits the temperature, "
                "the operating point and the input gate on the validation split)"
            )
        fields = json.loads(path.read_text())
        return cls(
            temperature=fields.get("temperature"),
            operating_point=fields.get("operating_point") or {},
            input_gate=fields.get("input_gate"),
            members=fields.get("members"),
        )

    @staticmethod
    def gate_arrays(folder: Path) -> dict[str, np.ndarray]:
        with np.load(Path(folder) / GATE_FILE) as arrays:
            return {k: arrays[k] for k in arrays.files}

    @property
    def has_gate(self) -> bool:
        """An input gate was fitted and goes into the exported graph (not left out for failing its parity check)."""
        return self.input_gate is not None and "omitted" not in self.input_gate

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a single model's logits."""
        return softmax(np.asarray(logits, dtype=np.float64), self.temperature or 1.0)


def fit_run(run_dir: Path, data_dir: str | None = None, target_accuracy: float | None = None):
    """Fit and save a run's calibration from its best checkpoint: T and the operating point on the validation split,
    the Gaussians on the training split and their threshold on the validation split.
    Returns (Calibration, validation logits, validation ImageSet, TrainConfig)."""
    from training import ood
    from training import operating_point as op
    from training.train import load_model, prepare_split

    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir)
    if data_dir:
        cfg.data = str(data_dir)
    train_set, val = prepare_split(cfg, run_dir)
    if len(val.labels) == 0:
        raise FileNotFoundError(
            f"none of {run_dir}'s validation images could be read under {cfg.data}: if the data moved, pass --data DIR"
        )
    logits, val_features = ood.forward_features(model, val.images)
    _, train_features = ood.forward_features(model, train_set.images)
    temperature = fit_temperature(logits, val.labels)
    point = op.fit_operating_point(
        softmax(logits.astype(np.float64), temperature),
        val.labels,
        op.TARGET_ACCURACY if target_accuracy is None else target_accuracy,
    )
    gate, val_scores = ood.fit_gate(train_features, train_set.labels, val_features, len(cfg.classes))
    summary = {
        "method": ood.METHOD,
        "features": f"spatial mean (and std, up to {ood.STD_MAX_CHANNELS} channels) of the outputs of the deeper "
        f"half of the backbone's blocks: {len(val_features)} blocks, "
        f"{sum(f.shape[1] for f in val_features)} features",
        "fitted_on": "class means and shared covariance (Ledoit-Wolf shrinkage) on the training split; per-block "
        "medians and the threshold on the validation split",
        "acceptance_target": ood.ACCEPTANCE,
        "raw_threshold": gate.threshold,
        "threshold": 1.0,
        "val_refused": ood.refused_share(val_scores, 1.0),
        "train_images": int(len(train_set.labels)),
        "val_images": int(len(val.labels)),
        "score_units": "multiples of raw_threshold: the exported ood_score is divided by it, so 1.0 is the gate",
    }
    calibration = Calibration(temperature=temperature, operating_point=point, input_gate=summary)
    calibration.save(
        run_dir, {**gate.arrays(), "val_scores": val_scores, "val_files": np.array([s.file for s in val.samples])}
    )
    return calibration, logits, val, cfg


def fit_ensemble(
    run_dirs: list[Path], out_dir: Path, probs: np.ndarray, val, target_accuracy: float | None = None
) -> Calibration:
    """An ensemble's own fit, saved in `out_dir`: the operating point on its mean probabilities, and the threshold of
    its score, the largest of its members' scores (each already in units of the member's own threshold)."""
    from training import ood
    from training import operating_point as op

    point = op.fit_operating_point(
        probs, val.labels, op.TARGET_ACCURACY if target_accuracy is None else target_accuracy
    )
    files = [s.file for s in val.samples]
    member_scores = []
    for run_dir in run_dirs:
        if Calibration.load(run_dir).input_gate is None or not (Path(run_dir) / GATE_FILE).is_file():
            member_scores = []  # a member without a gate (evaluated before the gate existed): no gate for the ensemble
            break
        arrays = Calibration.gate_arrays(run_dir)
        if [str(f) for f in arrays["val_files"]] != files:
            raise ValueError(
                f"{run_dir}'s input gate was fitted on other validation images: run `cxr evaluate` on it again"
            )
        member_scores.append(arrays["val_scores"])
    gate = None
    if member_scores:
        combined = np.max(member_scores, axis=0)
        threshold = ood.fit_threshold(combined)
        gate = {
            "method": f"max over the members of their {ood.METHOD} ood_score (each in units of its own threshold)",
            "fitted_on": "the threshold of the maximum on the validation split",
            "acceptance_target": ood.ACCEPTANCE,
            "raw_threshold": threshold,
            "threshold": 1.0,
            "val_refused": ood.refused_share(combined, threshold),
            "val_images": int(len(files)),
            "members": [str(r) for r in run_dirs],
            "score_units": "multiples of raw_threshold: the exported ood_score is divided by it, so 1.0 is the gate",
        }
    calibration = Calibration(
        temperature=None, operating_point=point, input_gate=gate, members=[str(r) for r in run_dirs]
    )
    calibration.save(out_dir)
    return calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits.astype(np.float64), temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the validation negative log-likelihood (scipy's bounded scalar minimiser over log T)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


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


def reliability_curve(
    probs: np.ndarray, labels: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, count) per non-empty bin, for the reliability diagram."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    rows = [
        (conf[m].mean(), correct[m].mean(), m.sum())
        for lo, hi in zip(edges[:-1], edges[1:])
        if (m := (conf > lo) & (conf <= hi)).any()
    ]
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

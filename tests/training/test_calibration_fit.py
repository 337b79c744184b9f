"""What `cxr evaluate` fits after training, on synthetic data where the right answer is known: the temperature, the
input gate's Gaussians and threshold, and the operating point of the indeterminate answer."""

from __future__ import annotations

import numpy as np
import pytest

from training import calibrate as C
from training import ood
from training import operating_point as op


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_a_known_temperature_is_recovered(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 3))
    # labels drawn from softmax(logits / T): the NLL is minimised at T
    p = C.softmax(logits, true_t)
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
    assert C.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_stays_within_its_bounds():
    logits = np.array([[0.1, 0.0], [0.0, 0.1]] * 50)
    labels = np.array([0, 1] * 50)  # always right: the NLL keeps falling as T shrinks
    assert C.fit_temperature(logits, labels) == pytest.approx(C.TEMPERATURE_BOUNDS[0], rel=1e-3)


def _blobs(rng, n, dim=32, shift=0.0):
    labels = rng.integers(0, 3, n)
    centres = np.eye(3, dim) * 6
    mixing = rng.normal(0, 1, (dim, dim)) / np.sqrt(dim) + np.eye(dim)  # correlated features
    return (rng.normal(0, 1, (n, dim)) @ mixing) + centres[labels] + shift, labels


def test_mahalanobis_matches_the_definition_and_separates_shifted_features():
    rng = np.random.default_rng(1)
    train, train_labels = _blobs(rng, 2000)
    g = ood.fit_gaussians(train, train_labels, 3)
    x = train[:5]
    # W W^T is the inverse of the (shrunk) covariance, so the score is the textbook quadratic form
    precision = g.whitening @ g.whitening.T
    d = x[:, None, :] - g.means[None]
    np.testing.assert_allclose(g.distances(x), np.einsum("ncf,fg,ncg->nc", d, precision, d), rtol=1e-8)
    val, _ = _blobs(np.random.default_rng(2), 1000)
    far, _ = _blobs(np.random.default_rng(3), 200, shift=4.0)
    threshold = ood.fit_threshold(g.score(val), 0.99)
    assert ood.refused_share(g.score(val), threshold) <= 0.01
    assert ood.refused_share(g.score(far), threshold) > 0.95
    assert ood.separation_auc(g.score(val), g.score(far)) > 0.99


def test_threshold_accepts_the_stated_share():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    assert ood.fit_threshold(scores, 0.99) == 99.0 and ood.refused_share(scores, 99.0) == 0.01
    assert ood.fit_threshold(scores, 1.0) == 100.0
    assert ood.fit_threshold(np.array([5.0]), 0.99) == 5.0
    with pytest.raises(ValueError):
        ood.fit_threshold(np.array([]))


def test_the_graph_module_computes_the_fitted_gates_score():
    """ood.score_module (what goes into the ONNX graph) == Gate.score in numpy, over the deeper half of the blocks."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)

    def taps(n, shift=0.0):  # four "blocks": the gate scores the last two (mean and std of each: 2 x 8 features)
        return [torch.tensor(rng.normal(shift, 1, (n, 8, 3, 3)), dtype=torch.float32) for _ in range(4)]

    train, val, test = taps(300), taps(100), taps(7, shift=0.5)
    labels = rng.integers(0, 3, 300)
    features = [[f.numpy() for f in ood.block_features(t)] for t in (train, val, test)]
    assert [f.shape for f in features[0]] == [(300, 16), (300, 16)]
    gate, val_scores = ood.fit_gate(features[0], labels, features[1], 3)
    assert (val_scores <= 1.0).mean() >= 0.99
    got = ood.score_module(gate)(test).numpy()
    assert got.shape == (7, 1)
    got = got[:, 0]
    np.testing.assert_allclose(got, gate.score(features[2]), rtol=1e-4)
    restored = ood.Gate.from_arrays(gate.arrays())
    np.testing.assert_allclose(restored.score(features[2]), gate.score(features[2]), rtol=1e-12)


def test_operating_point_is_the_most_coverage_that_meets_the_target():
    # 10 cases, top probabilities 0.95 .. 0.50; the three least sure are wrong
    top = np.linspace(0.95, 0.5, 10)
    probs = np.stack([top, 1 - top], 1)
    labels = np.array([0] * 7 + [1] * 3)
    point = op.fit_operating_point(probs, labels, target_accuracy=0.9)
    # answering 7 cases: 7/7 right; 8 cases: 7/8 = 0.875 < 0.9
    assert point["min_top_probability"] == pytest.approx(top[6]) and point["coverage"] == pytest.approx(0.7)
    assert point["accuracy_answered"] == 1.0 and point["reached"] and point["accuracy_all"] == pytest.approx(0.7)
    lenient = op.fit_operating_point(probs, labels, target_accuracy=0.7)
    assert lenient["coverage"] == 1.0 and lenient["min_top_probability"] == pytest.approx(0.5)


def test_operating_point_when_the_target_is_out_of_reach():
    top = np.linspace(0.9, 0.6, 20)
    probs = np.stack([top, 1 - top], 1)
    labels = np.array([1, 0] * 10)  # half wrong everywhere: never 0.99
    point = op.fit_operating_point(probs, labels, target_accuracy=0.99, min_coverage=0.25)
    assert not point["reached"] and point["coverage"] >= 0.25


def test_ties_at_the_threshold_are_answered_together():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    thresholds, coverage, _ = op.coverage_curve(probs, np.array([0, 0, 1, 0]))
    assert thresholds.tolist() == [0.9, 0.8, 0.6] and coverage.tolist() == [0.25, 0.75, 1.0]


def test_calibration_round_trips(tmp_path):
    cal = C.Calibration(
        temperature=1.3, operating_point={"min_top_probability": 0.7}, input_gate={"raw_threshold": 4.0}
    )
    cal.save(tmp_path, {"means": np.zeros((3, 2)), "whitening": np.eye(2), "shrinkage": np.array(0.1)})
    assert C.Calibration.load(tmp_path) == cal
    assert set(C.Calibration.gate_arrays(tmp_path)) == {"means", "whitening", "shrinkage"}
    with pytest.raises(FileNotFoundError, match="cxr evaluate"):
        C.Calibration.load(tmp_path / "never-evaluated")

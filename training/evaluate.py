"""Evaluation of trained runs on their validation split: accuracy, macro one-vs-rest ROC AUC, per-class and macro
precision/recall/F1, confusion matrix, calibration before/after temperature scaling, per-source results, 95% bootstrap
intervals, PNG plots, metrics.json; and the markdown table that compares runs (and their ensemble)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support, roc_curve

from training import calibrate as C
from training.metrics import binary_auc, macro_auc
from training.runs import RunDir

log = logging.getLogger("cxr.training")
BOOTSTRAP_ROUNDS = 1000
NOT_CLINICAL = "Research software: not for clinical use."


def core_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro AUC, macro precision/recall/F1 (sklearn's definitions, zero_division=0), in numpy for speed."""
    pred = probs.argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(num_classes), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(num_classes), where=cm.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=(precision + recall) > 0
    )
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "macro_auc": macro_auc(labels, probs, list(range(num_classes))),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


def bootstrap_ci(
    labels: np.ndarray, probs: np.ndarray, num_classes: int, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> dict:
    """95% percentile intervals over resamples of the validation images."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        idx = rng.integers(0, len(labels), len(labels))
        for key, value in core_metrics(labels[idx], probs[idx], num_classes).items():
            draws.setdefault(key, []).append(value)
    with warnings.catch_warnings():  # AUC is undefined in a resample that lacks a class: those draws are left out
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


CONSISTENT_SUBSET = "consistent_subset"
CONSISTENT_DEFINITION = (
    "the validation images whose label no radiologist contradicted (radiologist_labels.csv "
    "rsna_verdict != 'contradicts'); the same temperature as the whole split"
)


def evaluate_predictions(
    labels: np.ndarray,
    logits: np.ndarray,
    classes: list[str],
    sources: list[str],
    temperature: float | None = None,
    probs: np.ndarray | None = None,
    contradicted: np.ndarray | None = None,
) -> dict:
    """All metrics for one set of predictions, overall and per source. `probs` (calibrated) may be given directly
    (the ensemble's). `contradicted` (bool per image): the same metrics again on the radiologist-consistent subset."""
    raw = C.softmax(logits.astype(np.float64))
    if probs is None:
        temperature = C.fit_temperature(logits, labels) if temperature is None else temperature
        probs = C.softmax(logits.astype(np.float64), temperature)
    metrics = _metrics(labels, raw, probs, classes, np.array(sources))
    metrics["temperature"] = temperature
    if temperature is not None:
        # T is fitted on this same split: the cross-fitted ECE is the honest "after" number
        metrics["ece_after_cross_fitted"] = C.cross_fitted_ece(logits, labels)
    if contradicted is not None:
        keep = ~np.asarray(contradicted, dtype=bool)
        metrics[CONSISTENT_SUBSET] = {
            "definition": CONSISTENT_DEFINITION,
            "excluded": int((~keep).sum()),
            **_metrics(labels[keep], raw[keep], probs[keep], classes, np.array(sources)[keep]),
        }
        if temperature is not None and keep.any():
            metrics[CONSISTENT_SUBSET]["ece_after_cross_fitted"] = C.cross_fitted_ece(logits[keep], labels[keep])
    return metrics


def _metrics(labels: np.ndarray, raw: np.ndarray, probs: np.ndarray, classes: list[str], src: np.ndarray) -> dict:
    n = len(classes)
    pred = probs.argmax(1)
    per_class_p, per_class_r, per_class_f, support = precision_recall_fscore_support(
        labels, pred, labels=list(range(n)), zero_division=0
    )
    metrics = core_metrics(labels, probs, n)
    metrics.update(
        {
            "n": int(len(labels)),
            "per_class": {
                classes[c]: {
                    "precision": float(per_class_p[c]),
                    "recall": float(per_class_r[c]),
                    "f1": float(per_class_f[c]),
                    "support": int(support[c]),
                    "auc": macro_auc(labels, probs, [c]),
                }
                for c in range(n)
            },
            "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(n))).tolist(),
            "classification_report": classification_report(
                labels, pred, labels=list(range(n)), target_names=classes, digits=3, zero_division=0
            ),
            "ece_before": C.expected_calibration_error(raw, labels),
            "ece_after": C.expected_calibration_error(probs, labels),
            "ci95": bootstrap_ci(labels, probs, n),
            "per_source": {},
        }
    )
    for source in sorted(set(src.tolist())):
        m = src == source
        present = sorted(set(labels[m].tolist()))
        core = core_metrics(labels[m], probs[m], n)
        metrics["per_source"][source] = {
            "n": int(m.sum()),
            "accuracy": core["accuracy"],
            "accuracy_ci95": bootstrap_ci(labels[m], probs[m], n, rounds=300)["accuracy"],
            "classes": [classes[c] for c in present],
            # one source often holds two classes (NIH: Normal and Lung_Opacity): the AUC between those
            "auc_among_its_classes": macro_auc(labels[m], probs[m], present) if len(present) > 1 else None,
            "per_class_recall": {classes[c]: float((pred[m][labels[m] == c] == c).mean()) for c in present},
            "predicted": {classes[c]: int((pred[m] == c).sum()) for c in range(n)},
            "confusion_matrix": confusion_matrix(labels[m], pred[m], labels=list(range(n))).tolist(),
            "ece_after": C.expected_calibration_error(probs[m], labels[m]),
        }
    return metrics


# --- plots --------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    b.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    b.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    b.plot(epochs, [h["val_macro_auc"] for h in history], label="val macro AUC", linestyle="--")
    b.set(xlabel="epoch", title="Accuracy / AUC", ylim=(0, 1.02))
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} — {NOT_CLINICAL}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        if (labels == c).any() and not (labels == c).all():
            fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {binary_auc(labels == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC one-vs-rest: {title}")
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.005, NOT_CLINICAL, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    plt = _plt()
    cm_arr = np.array(cm)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm_arr, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(cm_arr[i, j]),
                ha="center",
                va="center",
                color="white" if cm_arr[i, j] > cm_arr.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix: {title}")
    fig.text(0.01, 0.005, NOT_CLINICAL, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probs in (("before (T=1)", raw), ("after temperature scaling", calibrated)):
        conf, acc, _ = C.reliability_curve(probs, labels)
        ax.plot(conf, acc, marker="o", label=f"{name}, ECE {C.expected_calibration_error(probs, labels):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(
        xlabel="confidence (top-class probability)",
        ylabel="accuracy",
        title=f"Reliability: {title}",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.text(0.01, 0.005, NOT_CLINICAL, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- runs -------------------------------------------------------------------------------------------------------


def validation_predictions(run_dir: Path, data_dir: str | None = None):
    """(logits, val ImageSet, cfg) of a run's best checkpoint on its own validation split."""
    from training.train import load_model, predict_logits, prepare_split

    model, cfg = load_model(run_dir)
    if data_dir:
        cfg.data = str(data_dir)
    _, val = prepare_split(cfg, Path(run_dir))
    if len(val.labels) == 0:
        raise FileNotFoundError(
            f"none of {run_dir}'s validation images could be read under {cfg.data}: if the data moved, pass --data DIR"
        )
    return predict_logits(model, val.images), val, cfg


def evaluate_run(
    run_dir: Path, data_dir: str | None = None, plots: bool = True, target_accuracy: float | None = None
) -> dict:
    """Evaluate one run: fits its calibration (training/calibrate.py: calibration.json, input_gate.npz), writes
    metrics.json and the PNG plots into the run folder."""
    run_dir = Path(run_dir)
    calibration, logits, val, cfg = C.fit_run(run_dir, data_dir, target_accuracy)
    metrics = evaluate_predictions(
        val.labels,
        logits,
        cfg.classes,
        val.sources,
        temperature=calibration.temperature,
        contradicted=_contradicted(val),
    )
    metrics.update(operating_point=calibration.operating_point, input_gate=calibration.input_gate)
    run = RunDir(run_dir)
    history = run.history()
    metrics.update(_run_facts(run_dir, cfg, history, val))
    _write(
        run_dir,
        metrics,
        val.labels,
        C.softmax(logits.astype(np.float64)),
        C.softmax(logits.astype(np.float64), metrics["temperature"]),
        cfg.classes,
        history,
        cfg.architecture,
        plots,
    )
    np.save(run / RunDir.VAL_LOGITS, logits)
    return metrics


def _contradicted(val) -> np.ndarray | None:
    """Per validation image: did a radiologist contradict its label? None when the run has no radiologist labels."""
    if not any(s.radiologist for s in val.samples):
        return None
    return np.array([s.contradicted for s in val.samples], dtype=bool)


def _run_facts(run_dir: Path, cfg, history: list[dict], val) -> dict:
    import torch

    run = RunDir(run_dir)
    best = torch.load(run / RunDir.BEST, map_location="cpu", weights_only=False)
    split = (run / RunDir.SPLIT).read_text().splitlines()[1:]
    data_facts, pretrained = run.data_facts(), run.pretrained()
    train_images = (
        sum(sum(c.values()) for c in data_facts["train"].values())
        if "train" in data_facts
        else sum(1 for r in split if ",train," in r)
    )
    return {
        # the run's folder name too when it says more than the architecture (two runs of one architecture)
        "model": cfg.architecture if run_dir.name == cfg.architecture else f"{cfg.architecture} ({run_dir.name})",
        "architecture": cfg.architecture,
        "run_dir": str(run_dir),
        "data": cfg.data,
        "manifest": cfg.manifest,
        "classes": cfg.classes,
        "synthetic_demo": cfg.synthetic_demo,
        "split": {
            "file": RunDir.SPLIT,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "patient_disjoint": cfg.manifest is not None,
            "train_images": train_images,
            "val_images": len(val.labels),
        },
        "label_policy": cfg.label_policy,
        "data_summary": data_facts,
        "pretrained": pretrained,
        "image_size": cfg.image_size,
        "weights": cfg.weights,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "wall_seconds": sum(h["epoch_seconds"] + h.get("cache_seconds", 0.0) for h in history),
        "train_images_per_second": float(np.median([h["train_images_per_second"] for h in history])),
        "evaluated_on": "validation split (also used for early stopping and to fit the temperature)",
        "note": NOT_CLINICAL,
    }


def _write(out: Path, metrics: dict, labels, raw, calibrated, classes, history, title, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RunDir.METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    if not plots:
        return
    if history:
        plot_curves(history, out / "curves.png", title)
    plot_roc(labels, calibrated, classes, out / "roc.png", title)
    plot_confusion(metrics["confusion_matrix"], classes, out / "confusion_matrix.png", title)
    plot_reliability(labels, raw, calibrated, out / "reliability.png", title)
    if metrics.get("operating_point"):
        from training.operating_point import plot_coverage

        plot_coverage(calibrated, labels, metrics["operating_point"], out / "coverage.png", title, NOT_CLINICAL)


def evaluate_ensemble(
    run_dirs: list[Path],
    out_dir: Path,
    data_dir: str | None = None,
    plots: bool = True,
    target_accuracy: float | None = None,
) -> dict:
    """The ensemble's metrics: the mean of the members' calibrated probabilities, on their shared validation split.
    Its own operating point and input-gate threshold are fitted too and saved in `out_dir` (what export reads)."""
    members, first = [], None
    for run_dir in run_dirs:
        # each member's own temperature (a member never evaluated is refused here, before any forward pass)
        t = C.Calibration.load(Path(run_dir)).temperature
        logits, val, cfg = validation_predictions(Path(run_dir), data_dir)
        files = [s.file for s in val.samples]
        if first is None:
            first = (files, val, cfg)
        elif files != first[0]:
            raise ValueError(f"{run_dir} was validated on a different split; ensemble members must share one split")
        members.append((logits, t, cfg))
    _, val, cfg = first
    probs = np.mean([C.softmax(lg.astype(np.float64), t) for lg, t, _ in members], axis=0)
    logits = np.mean([lg for lg, _, _ in members], axis=0)
    metrics = evaluate_predictions(
        val.labels, logits, cfg.classes, val.sources, probs=probs, contradicted=_contradicted(val)
    )
    metrics.update(
        {
            "model": "ensemble",
            "architecture": "ensemble",
            "members": [str(r) for r in run_dirs],
            "data": cfg.data,
            "classes": cfg.classes,
            "image_size": cfg.image_size,
            "synthetic_demo": any(c.synthetic_demo for _, _, c in members),
            "note": NOT_CLINICAL,
            "evaluated_on": "validation split shared by all members",
            "epochs_run": None,
            "wall_seconds": None,
            "train_images_per_second": None,
        }
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    calibration = C.fit_ensemble(list(map(Path, run_dirs)), Path(out_dir), probs, val, target_accuracy)
    metrics.update(operating_point=calibration.operating_point, input_gate=calibration.input_gate)
    _write(
        Path(out_dir),
        metrics,
        val.labels,
        C.softmax(logits.astype(np.float64)),
        probs,
        cfg.classes,
        [],
        "ensemble",
        plots,
    )
    return metrics


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def comparison_table(all_metrics: list[dict]) -> str:
    """The seed's table (Model, Val Accuracy, ROC AUC, Precision, Recall, F1) plus the facts that qualify it: the
    radiologist-consistent subset, per-source accuracy (and NIH's Normal-vs-Lung_Opacity AUC), calibration, cost."""
    sources = sorted({s for m in all_metrics for s in m["per_source"]})
    head = [
        "Model",
        "Val Accuracy (95% CI)",
        "ROC AUC (95% CI)",
        "Precision",
        "Recall",
        "F1",
        "Consistent subset: acc. / AUC / ECE",
        "NIH AUC (whole / consistent)",
        *[f"Acc. {s}" for s in sources],
        "ECE before → after",
        "Image size",
        "Epochs (best)",
        "Train wall time",
        "Train images/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in all_metrics:
        ci = m["ci95"]
        src = [
            f"{_fmt(m['per_source'][s]['accuracy'])} (n={m['per_source'][s]['n']})" if s in m["per_source"] else "–"
            for s in sources
        ]
        ece_after = m.get("ece_after_cross_fitted", m["ece_after"])
        epochs = f"{m['epochs_run']} ({m['best_epoch']})" if m.get("epochs_run") else "–"
        wall = f"{m['wall_seconds'] / 60:.1f} min" if m.get("wall_seconds") else "–"
        sub = m.get(CONSISTENT_SUBSET)
        consistent = (
            f"{_fmt(sub['accuracy'])} / {_fmt(sub['macro_auc'])} / "
            f"{_fmt(sub.get('ece_after_cross_fitted', sub['ece_after']))} (n={sub['n']})"
            if sub
            else "–"
        )
        nih = [x["per_source"].get("nih", {}).get("auc_among_its_classes") for x in (m, sub) if x]
        lines.append(
            "| "
            + " | ".join(
                [
                    m["model"],
                    f"{_fmt(m['accuracy'])} ({_fmt(ci['accuracy'][0])}–{_fmt(ci['accuracy'][1])})",
                    f"{_fmt(m['macro_auc'])} ({_fmt(ci['macro_auc'][0])}–{_fmt(ci['macro_auc'][1])})",
                    _fmt(m["macro_precision"]),
                    _fmt(m["macro_recall"]),
                    _fmt(m["macro_f1"]),
                    consistent,
                    " / ".join(_fmt(v) for v in nih) if any(v is not None for v in nih) else "–",
                    *src,
                    f"{_fmt(m['ece_before'])} → {_fmt(ece_after)}",
                    str(m["image_size"]),
                    epochs,
                    wall,
                    _fmt(m.get("train_images_per_second"), 1),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"

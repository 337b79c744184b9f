"""Measure the input gate of an exported model: the share of each kind of non-radiograph it refuses, and the share of
the validation radiographs it refuses; beside it, the energy score with a threshold fitted the same way.

    python -m training.gate_report --repository REPO --model NAME --run RUN_DIR [--out report.json]

RUN_DIR gives the validation split (its split.csv): for an ensemble, any member's run. Images go through the same
reader and resize as the gateway (cxr.imaging), and DICOM headers through the gateway's own policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr import repository
from cxr.imaging import read_image, resize_for_model
from training import gate_corpus, ood


def _session(version_dir: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ood_score [N] (the graph's [N, 1]), logits [N,C]) of uint8 [N,S,S] images."""
    scores, logits = [], []
    for i in range(0, len(images), 32):
        s, lg = session.run(["ood_score", "logits"], {"image": images[i : i + 32, None]})
        scores.append(s.reshape(-1))
        logits.append(lg)
    return np.concatenate(scores), np.concatenate(logits)


def measure(version_dir: Path, run_dir: Path, data_dir: str | None = None) -> dict:
    from services.gateway.input_gate import header_refusals
    from training.train import TrainConfig, prepare_split

    config = repository.read_config(version_dir.parent)
    size = int(config.parameters["cxr.image_size"].string_value)
    threshold = float(config.parameters["cxr.ood_threshold"].string_value)
    session = _session(version_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    cfg.data = data_dir or cfg.data
    cfg.image_size = size
    _, val = prepare_split(cfg, run_dir)
    val_scores, val_logits = _run(session, val.images)
    val_energy = ood.energy(val_logits)
    energy_threshold = ood.fit_threshold(val_energy)
    kinds: dict[str, list[np.ndarray]] = {}
    header_refused: dict[str, list[bool]] = {}
    for kind, items in gate_corpus.non_radiographs().items():
        for _, data in items:
            decoded = read_image(data)
            kinds.setdefault(kind, []).append(resize_for_model(decoded.pixels, size))
            header_refused.setdefault(kind, []).append(bool(header_refusals(decoded.header)))
    for kind, images in gate_corpus.transformed_radiographs(val.images).items():
        kinds[kind] = images
        header_refused[kind] = [False] * len(images)
    rows = {}
    all_out_scores, all_out_energy = [], []
    for kind, images in kinds.items():
        scores, logits = _run(session, np.stack(images))
        energy = ood.energy(logits)
        pixel = scores > threshold
        header = np.array(header_refused[kind])
        rows[kind] = {
            "n": len(images),
            "refused": float((pixel | header).mean()),
            "refused_by_pixels": float(pixel.mean()),
            "refused_by_header": float(header.mean()),
            "energy_refused": float((energy > energy_threshold).mean()),
            "median_score": float(np.median(scores)),
            "min_score": float(scores.min()),
        }
        if kind not in gate_corpus.transformed_radiographs(val.images[:1]):
            all_out_scores.append(scores)
            all_out_energy.append(energy)
    out_scores, out_energy = np.concatenate(all_out_scores), np.concatenate(all_out_energy)
    return {
        "model": f"{version_dir.parent.name}/{version_dir.name}",
        "image_size": size,
        "threshold": threshold,
        "validation": {
            "n": int(len(val_scores)),
            "refused": float((val_scores > threshold).mean()),
            "energy_refused": float((val_energy > energy_threshold).mean()),
        },
        "kinds": rows,
        "non_radiographs": {
            "n": int(len(out_scores)),
            "refused_by_pixels": float((out_scores > threshold).mean()),
            "energy_refused": float((out_energy > energy_threshold).mean()),
            "auc_mahalanobis": ood.separation_auc(val_scores, out_scores),
            "auc_energy": ood.separation_auc(val_energy, out_energy),
        },
    }


def markdown(report: dict) -> str:
    lines = [
        f"Input gate of {report['model']} ({report['image_size']} px), ood_score threshold {report['threshold']}:",
        "",
        "| Kind | n | refused (header or pixels) | by pixels (Mahalanobis) | energy score instead |",
        "|---|---|---|---|---|",
    ]
    v = report["validation"]
    lines.append(
        f"| validation radiographs | {v['n']} | {v['refused']:.3f} | {v['refused']:.3f} | {v['energy_refused']:.3f} |"
    )
    for kind, r in report["kinds"].items():
        lines.append(
            f"| {kind} | {r['n']} | {r['refused']:.3f} | {r['refused_by_pixels']:.3f} | {r['energy_refused']:.3f} |"
        )
    nr = report["non_radiographs"]
    lines += [
        "",
        f"All non-radiographs by pixels alone: {nr['refused_by_pixels']:.3f} refused (energy: "
        f"{nr['energy_refused']:.3f}); separation AUC Mahalanobis {nr['auc_mahalanobis']:.3f}, energy {nr['auc_energy']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default=None, help="default: the newest")
    parser.add_argument("--run", required=True, type=Path, help="a run folder whose validation split to use")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    model_dir = args.repository / args.model
    version = args.version or str(repository.list_versions(model_dir)[-1])
    report = measure(model_dir / version, args.run, args.data)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

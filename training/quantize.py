"""int8 variants of exported graphs: static QDQ quantization of the backbone, accepted only when it agrees with fp32.

What is quantized: the backbone, after its first Conv up to the feature map the head reads: int8 weights per output
channel, uint8 activations whose ranges are calibrated (MinMax) on training-split radiographs. onnxruntime fuses the
QuantizeLinear/DequantizeLinear pairs around each Conv into integer kernels. What stays float:
- the stem: the preprocessing (the uint8 pixel rescaled and ImageNet-normalised in the graph) and the first Conv,
  which reads those pixels at full precision (one uint8 scale cannot hold three differently normalised copies of an
  8-bit pixel: quantizing it too cut efficientnet_lite0's agreement from 94.8% to 93.5% and multiplied the gate's
  refusals of validation images by 7; the first Conv is ~3% of the multiply-adds);
- the head after the feature map (pooling, classifier, class activation maps, temperature, softmax): well under 1%
  of the multiply-adds, and quantizing it would round the calibrated probabilities to steps of 1/256;
- the input gate (`ood_score`): float64 Mahalanobis distances (training/ood.py) that float32 already cannot hold.

The int8 graph is accepted only when, on the run's whole validation split, its top class agrees with the fp32
graph's on at least MIN_AGREEMENT of the images and its macro AUC (training/metrics.py) is at most MAX_AUC_DROP
below fp32's; otherwise QuantizationRefused and nothing is written. The numbers go into the model card.
It works on ONNX files and images; training/export.py calls it with the run's checked fp32 graph and its split.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.export import OOD_OUTPUT, ExportError
from training.metrics import macro_auc

MIN_AGREEMENT = 0.99  # share of validation images whose top class is the fp32 graph's
MAX_AUC_DROP = 0.005  # macro one-vs-rest AUC, fp32 minus int8
CALIBRATION_IMAGES = 256  # training-split images for the activation ranges (MinMax: more did not help)
FORMAT = "QDQ (QuantizeLinear/DequantizeLinear), int8 weights per channel, uint8 activations, MinMax calibration"
BATCH = 32


class QuantizationRefused(ExportError):
    """The int8 graph does not agree well enough with fp32 on the validation split: nothing was written."""


@dataclass(frozen=True)
class Int8Settings:
    """What `cxr export --int8` accepts, and how many training images calibrate it."""

    min_agreement: float = MIN_AGREEMENT
    max_auc_drop: float = MAX_AUC_DROP
    calibration_images: int = CALIBRATION_IMAGES


def float_parts(model) -> dict[str, set[str]]:
    """Names of the nodes that must stay float, by part: gate, stem, head (see the module docstring).
    Found from the graph's shape, not from node names (the exporter's names follow module call paths)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def upstream(tensors) -> set[str]:
        seen, stack = set(), list(tensors)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    def downstream(tensors) -> set[str]:
        seen, stack = set(), list(tensors)
        while stack:
            for node in consumers.get(stack.pop(), []):
                if node.name not in seen:
                    seen.add(node.name)
                    stack.extend(node.output)
        return seen

    outputs = [o.name for o in graph.output]
    # the gate: what only ood_score needs (its inputs, the backbone's taps, are the backbone's own outputs)
    gate = (
        upstream([OOD_OUTPUT]) - upstream([o for o in outputs if o != OOD_OUTPUT]) if OOD_OUTPUT in outputs else set()
    )
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # the stem: everything a Conv needs that no Conv feeds, the first Conv included
    stem = upstream([c.input[0] for c in convs]) - downstream([c.output[0] for c in convs])
    # the head: everything after the feature map the class activation maps read (an Einsum, one per network)
    head = downstream([n.input[0] for n in graph.node if n.op_type == "Einsum"])
    return {"gate": gate, "stem": stem, "head": head}


class _Images:
    """onnxruntime's CalibrationDataReader over uint8 [N,S,S] images, in batches."""

    def __init__(self, images: np.ndarray):
        self._batches = iter([images[i : i + BATCH, None] for i in range(0, len(images), BATCH)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"image": np.ascontiguousarray(batch)}


def quantize(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Write the int8 QDQ graph of `fp32_path` to `int8_path`, calibrated on `calibration` (uint8 [N,S,S])."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Images, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        # shape inference and constant folding first, as onnxruntime recommends: the quantizer needs every shape
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        keep_float = set().union(*float_parts(onnx.load(str(prepared))).values())
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(keep_float),
        )
    model = onnx.load(str(int8_path))
    onnx.checker.check_model(model, full_check=True)


def _outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N,C], ood_score [N] or None) of one graph, CPU, in batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ["probabilities"] + ([OOD_OUTPUT] if OOD_OUTPUT in {o.name for o in session.get_outputs()} else [])
    runs = [session.run(names, {"image": images[i : i + BATCH, None]}) for i in range(0, len(images), BATCH)]
    probabilities = np.concatenate([r[0] for r in runs])
    return probabilities, np.concatenate([r[1] for r in runs])[:, 0] if len(names) == 2 else None


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """The int8 graph against the fp32 one on the same validation images (uint8 [N,S,S], labels [N])."""
    p32, gate32 = _outputs(fp32_path, images)
    p8, gate8 = _outputs(int8_path, images)
    auc32, auc8 = macro_auc(labels, p32), macro_auc(labels, p8)
    report = {
        "validation_images": int(len(images)),
        "agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "auc_fp32": auc32,
        "auc_int8": auc8,
        "auc_drop": auc32 - auc8,
        "accuracy_fp32": float((p32.argmax(1) == labels).mean()),
        "accuracy_int8": float((p8.argmax(1) == labels).mean()),
        "max_abs_diff_probabilities": float(np.abs(p32 - p8).max()),
    }
    if gate32 is not None and gate8 is not None:
        # the gate's threshold was fitted on fp32 scores: does int8 refuse the same validation images?
        report["gate_agreement"] = float(((gate32 >= 1.0) == (gate8 >= 1.0)).mean())
        report["gate_refused_fp32"] = int((gate32 >= 1.0).sum())
        report["gate_refused_int8"] = int((gate8 >= 1.0).sum())
    return report


def accept(report: dict, settings: Int8Settings) -> dict:
    """The report with the verdict; QuantizationRefused when it misses either bar."""
    failures = []
    if not report["agreement"] >= settings.min_agreement:
        failures.append(f"top-class agreement with fp32 {report['agreement']:.4f} < {settings.min_agreement}")
    if not report["auc_drop"] <= settings.max_auc_drop:
        failures.append(f"macro AUC drop {report['auc_drop']:.4f} > {settings.max_auc_drop}")
    if failures:
        raise QuantizationRefused(
            f"int8 refused on {report['validation_images']} validation images: {'; '.join(failures)} "
            f"(fp32 AUC {report['auc_fp32']:.4f}, int8 {report['auc_int8']:.4f}); serve the fp32 model"
        )
    return {**report, "min_agreement": settings.min_agreement, "max_auc_drop": settings.max_auc_drop, "accepted": True}


def quantize_and_check(
    fp32_path: Path,
    int8_path: Path,
    train_images: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    settings: Int8Settings,
) -> dict:
    """Quantize, compare on the validation split, accept or refuse. Returns the model card's `quantization` block."""
    if len(train_images) == 0 or len(val_images) == 0:
        raise ExportError("int8 needs readable training images (calibration) and validation images (the check)")
    # evenly spaced over the training split, which lists the classes in turn: every class calibrates
    pick = np.linspace(0, len(train_images) - 1, min(settings.calibration_images, len(train_images)))
    quantize(fp32_path, int8_path, train_images[pick.round().astype(int)])
    report = accept(compare(fp32_path, int8_path, val_images, val_labels), settings)
    return {
        "format": FORMAT,
        "per_channel": True,
        "calibration_images": int(len(pick)),
        "calibration_split": "train",
        **report,
        "note": "metrics and onnx.parity are the fp32 graph's; this block compares the int8 graph with it on the "
        "same validation split",
    }

"""Export trained runs to ONNX and write them into a Triton-layout model repository (via `cxr.repository`).

The graph: input `image` uint8 [N,1,H,W]; outputs `probabilities` (softmax(logits / T), T fitted on the validation
split), `logits`, `cam` [N,C,H/32,W/32] and `ood_score` [N,1] (the input gate's score, training/ood.py: 1.0 = the
threshold fitted on the validation split); dynamic batch axis; opset 17. `onnx.checker` must pass, and onnxruntime must
agree with PyTorch on real validation images (max |diff| of probabilities < 1e-4), or nothing is written.
An ensemble is one graph holding its members, averaging their outputs, so it is served like any other model.
`--int8` (training/quantize.py) quantizes that checked graph and writes it, as its own model `<arch>_int8`, only when
it agrees with fp32 on the whole validation split.

Export only packages what `cxr evaluate` fitted and stored (training/calibrate.py): it evaluates nothing itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cxr import repository
from training import ood
from training.calibrate import Calibration
from training.evaluate import NOT_CLINICAL
from training.train import TrainConfig, load_model

if TYPE_CHECKING:
    from training.quantize import Int8Settings

log = logging.getLogger("cxr.training")
OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16
OUTPUTS = ("probabilities", "logits", "cam")
OOD_OUTPUT = "ood_score"
# ood_score in units of its threshold (1.0 = the gate). Measured |diff| on trained models: < 1e-3; a barely trained
# network (the one-epoch test models) has near-degenerate deep features that onnxruntime's fused kernels round
# differently, up to ~0.1. Beyond this bound the served gate would not be the fitted one: nothing is written.
OOD_TOLERANCE = 0.15


class ExportError(RuntimeError):
    """The exported graph is not valid or does not match PyTorch: nothing was written to the repository."""


class GateParityError(ExportError):
    """onnxruntime does not reproduce the input gate's score (a barely trained network's near-degenerate features)."""


class Calibrated(nn.Module):
    """A trained network with its temperature, and the input gate's score when one was fitted:
    image -> (probabilities, logits, cam[, ood_score])."""

    def __init__(self, net: nn.Module, temperature: float, gate: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.gate = gate
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, image: torch.Tensor):
        logits, cam, taps = self.net.forward_all(image)
        probabilities = torch.softmax(logits * self.inv_temperature, dim=1)
        if self.gate is None:
            return probabilities, logits, cam
        return probabilities, logits, cam, self.gate(taps)


class Ensemble(nn.Module):
    """Mean of the members' calibrated probabilities (and of their logits and class maps); its ood_score is the
    largest of the members' (each in units of its own threshold), divided by the ensemble's own threshold."""

    def __init__(self, members: list[Calibrated], ood_threshold: float | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.gated = ood_threshold is not None and all(m.gate is not None for m in members)
        self.register_buffer("inv_threshold", torch.tensor(1.0 / (ood_threshold or 1.0), dtype=torch.float32))

    def forward(self, image: torch.Tensor):
        outs = [m(image) for m in self.members]
        mean = tuple(torch.stack([o[i] for o in outs]).mean(0) for i in range(3))
        if not self.gated:
            return mean
        return (*mean, torch.stack([o[3] for o in outs]).max(0).values * self.inv_threshold)


def _calibrated(run_dir: Path) -> tuple[Calibrated, TrainConfig, Calibration]:
    """A run's network with what `cxr evaluate` fitted for it; ExportError when it was never evaluated."""
    try:
        calibration = Calibration.load(run_dir)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    if not (run_dir / "metrics.json").is_file():
        raise ExportError(f"{run_dir} has no metrics.json: run `cxr evaluate {run_dir}` first")
    net, cfg = load_model(run_dir)
    gate = None
    if calibration.input_gate is not None:
        gate = ood.score_module(ood.Gate.from_arrays(Calibration.gate_arrays(run_dir)))
    else:
        log.warning(
            "%s was evaluated before the input gate existed: exported without ood_score "
            "(run `cxr evaluate %s` again to fit it)",
            run_dir,
            run_dir,
        )
    return Calibrated(net, calibration.temperature, gate).eval(), cfg, calibration


def ensemble_evaluation_dir(run_dirs: list[Path]) -> Path:
    """Where `cxr evaluate --ensemble RUN...` writes the ensemble's evaluation: `ensemble/` beside the runs."""
    return Path(os.path.commonpath([str(Path(r).resolve()) for r in run_dirs])) / "ensemble"


def _parity_images(cfg: TrainConfig, run_dir: Path, count: int = PARITY_IMAGES) -> np.ndarray:
    """Real radiographs from the run's validation split, read by the shared reader: uint8 [n,1,S,S]."""
    from training import data as D

    samples, split = D.read_split(run_dir / D.SPLIT_FILE, cfg.classes)
    val = [s for s, side in zip(samples, split) if side == "val"]
    # evenly spaced over the split (which lists the classes in turn), so every class is in the check
    val = [val[i] for i in np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)] if val else []
    images, _ = D.load_images(D.data_roots(cfg.data, cfg.extra_data), val, cfg.image_size)
    if len(images.images) == 0:
        raise ExportError(f"no readable validation images in {cfg.data} for the parity check")
    return images.images[:, None]


def _outputs(module: nn.Module) -> tuple[str, ...]:
    gated = module.gated if isinstance(module, Ensemble) else getattr(module, "gate", None) is not None
    return (*OUTPUTS, OOD_OUTPUT) if gated else OUTPUTS


def to_onnx(module: nn.Module, image_size: int, path: Path) -> None:
    module.eval()
    example = torch.zeros(2, 1, image_size, image_size, dtype=torch.uint8)
    batch_axis = {0: "batch"}
    outputs = _outputs(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript-based exporter writes opset 17 directly; the dynamo one only targets 18+ (and converting down fails).
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["image"],
            output_names=list(outputs),
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={n: batch_axis for n in ("image", *outputs)},
        )
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    model.doc_string = NOT_CLINICAL
    onnx.save(model, str(path))


def check_parity(module: nn.Module, onnx_path: Path, images: np.ndarray) -> dict:
    """onnxruntime vs PyTorch on the same uint8 images, batched and one by one (the batch axis is dynamic)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = _outputs(module)
    with torch.no_grad():
        expected = [t.numpy() for t in module(torch.from_numpy(images))]
    got = session.run(list(outputs), {"image": images})
    single = session.run(["probabilities"], {"image": images[:1]})[0]
    diffs = {name: float(np.abs(e - g).max()) for name, e, g in zip(outputs, expected, got)}
    diffs["probabilities_batch_of_one"] = float(np.abs(expected[0][:1] - single).max())
    report = {
        "images": int(len(images)),
        "max_abs_diff": diffs,
        "tolerance_probabilities": PARITY_TOLERANCE,
        "cam_shape": list(got[2].shape[1:]),
    }
    worst = max(diffs["probabilities"], diffs["probabilities_batch_of_one"])
    if not worst < PARITY_TOLERANCE:
        raise ExportError(
            f"onnxruntime differs from PyTorch: max |diff| of probabilities {worst:.2e} >= {PARITY_TOLERANCE}"
        )
    if OOD_OUTPUT in outputs:
        worst = diffs[OOD_OUTPUT]
        report["tolerance_ood_score"] = OOD_TOLERANCE
        if not worst < OOD_TOLERANCE:
            raise GateParityError(
                f"onnxruntime differs from PyTorch: max |diff| of ood_score {worst:.2e} >= "
                f"{OOD_TOLERANCE} (in units of the threshold)"
            )
    return report


def _metrics_summary(metrics: dict) -> dict:
    keys = (
        "accuracy",
        "macro_auc",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "ci95",
        "per_class",
        "per_source",
        "confusion_matrix",
        "ece_before",
        "ece_after",
        "ece_after_cross_fitted",
        "temperature",
        "n",
        "evaluated_on",
        "consistent_subset",
    )
    return {k: metrics[k] for k in keys if k in metrics}


def _card(cfg: TrainConfig, metrics: dict, parity: dict, calibration: Calibration, extra: dict) -> dict:
    synthetic = bool(metrics.get("synthetic_demo") or cfg.synthetic_demo)
    outputs = {
        "probabilities": "softmax(logits / temperature), calibrated on the validation split",
        "logits": "uncalibrated",
        "cam": f"class activation maps [N, C, {cfg.image_size // 32}, {cfg.image_size // 32}]",
    }
    if calibration.has_gate:
        outputs[OOD_OUTPUT] = (
            "[N, 1] out-of-distribution score, higher = less like the training radiographs; 1.0 is the "
            "threshold fitted on the validation split (see input_gate)"
        )
    return {
        "intended_use": NOT_CLINICAL
        + (
            " SYNTHETIC DEMO: trained on generated phantoms, not a medical model."
            if synthetic
            else " Research-grade labels; see data_source caveats."
        ),
        "synthetic_demo": synthetic,
        "classes": cfg.classes,
        "image_size": cfg.image_size,
        "input": {
            "name": "image",
            "datatype": "UINT8",
            "shape": [-1, 1, cfg.image_size, cfg.image_size],
            "preprocessing": "cxr.imaging.load_for_model (decode to 8-bit grayscale, resize); rescaling, channel "
            "replication and ImageNet mean/std are inside the graph",
        },
        "outputs": outputs,
        "temperature": metrics.get("temperature"),
        "operating_point": calibration.operating_point,
        "input_gate": calibration.input_gate,
        "metrics": _metrics_summary(metrics),
        "data_source": {
            "folder": Path(cfg.data).name,
            "manifest": Path(cfg.manifest).name if cfg.manifest else None,
            "synthetic_demo": synthetic,
        },
        "split": metrics.get("split"),
        "onnx": {"opset": OPSET, "parity": parity},
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _data_card(run_dir: Path, cfg: TrainConfig) -> dict:
    """The model card's account of the training data: label cleaning, counts per source, pretrained weights, caveats."""
    from training.caveats import caveats

    facts = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    pretrained = run_dir / "pretrained.json"
    return {
        "label_policy": cfg.label_policy,
        "training_data": facts,
        "pretrained": json.loads(pretrained.read_text()) if pretrained.is_file() else None,
        "caveats": caveats(cfg.classes, facts, cfg.label_policy),
    }


def int8_name(architecture: str) -> str:
    """The default model name of an int8 export: its own model beside the fp32 one (`resnet50_int8`), so both are
    served side by side and chosen by name, as with Triton; versions of one model stay successive trainings."""
    return f"{architecture}_int8"


def _int8_images(cfg: TrainConfig, run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training images for calibration, the whole validation split, its labels), read as `cxr evaluate` reads them."""
    from training.train import prepare_split

    train_set, val_set = prepare_split(cfg, run_dir)
    return train_set.images, val_set.images, val_set.labels


def export_run(
    run_dir: Path,
    repo: Path,
    name: str | None = None,
    data_dir: str | None = None,
    int8: Int8Settings | None = None,
    cpus: int | None = None,
) -> Path:
    """Export one evaluated run as a new version of model `name` (default: its architecture, `<arch>_int8` with
    `int8`). Returns the version folder. With `int8`, the fp32 graph is quantized and written only if it passes
    the accuracy check (training/quantize.py), else QuantizationRefused. A new model's config.pbtxt gets the
    serving shape for `cpus` CPUs (default: this machine's)."""
    run_dir = Path(run_dir)
    module, cfg, calibration = _calibrated(run_dir)
    cfg.data = data_dir or cfg.data
    if int8 is not None:
        name = name or int8_name(cfg.architecture)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    settings = {
        k: v for k, v in json.loads((run_dir / "config.json").read_text()).items() if k not in ("data", "manifest")
    }
    return _write(
        module,
        cfg,
        _parity_images(cfg, run_dir),
        repo,
        name or cfg.architecture,
        metrics,
        calibration,
        {
            "architecture": cfg.architecture,
            "training": settings,
            **_data_card(run_dir, cfg),
            "training_history": {
                "epochs_run": metrics.get("epochs_run"),
                "best_epoch": metrics.get("best_epoch"),
                "wall_seconds": metrics.get("wall_seconds"),
                "train_images_per_second": metrics.get("train_images_per_second"),
            },
        },
        cpus,
        int8=(int8, _int8_images(cfg, run_dir)) if int8 is not None else None,
    )


def export_ensemble(
    run_dirs: list[Path],
    repo: Path,
    name: str = "ensemble",
    data_dir: str | None = None,
    evaluation: Path | None = None,
    cpus: int | None = None,
) -> Path:
    """Export the members as one graph that averages them. They must share classes, image size and split, and the
    ensemble must have been evaluated (`cxr evaluate --ensemble`; its folder: `evaluation`, default `ensemble/`
    beside the runs), which fitted its operating point and input-gate threshold."""
    run_dirs = [Path(r) for r in run_dirs]
    evaluation = Path(evaluation) if evaluation else ensemble_evaluation_dir(run_dirs)
    try:
        calibration = Calibration.load(evaluation)
    except FileNotFoundError:
        raise ExportError(
            f"the ensemble was not evaluated ({evaluation / 'calibration.json'} not found): run "
            f"`cxr evaluate --ensemble {' '.join(map(str, run_dirs))}` first"
        ) from None
    if [str(Path(m).resolve()) for m in calibration.members or []] != [str(r.resolve()) for r in run_dirs]:
        raise ExportError(
            f"{evaluation} evaluated the members {calibration.members}, not {[str(r) for r in run_dirs]}: "
            "evaluate this ensemble first"
        )
    members, cfgs = [], []
    for run_dir in run_dirs:
        member, cfg, _ = _calibrated(run_dir)
        cfg.data = data_dir or cfg.data
        members.append(member)
        cfgs.append(cfg)
    first = cfgs[0]
    for cfg, run_dir in zip(cfgs, run_dirs):
        if cfg.classes != first.classes or cfg.image_size != first.image_size:
            raise ExportError(
                f"{run_dir}: ensemble members need the same classes and image size "
                f"({cfg.classes}, {cfg.image_size} vs {first.classes}, {first.image_size})"
            )
    metrics = json.loads((evaluation / "metrics.json").read_text())
    gate = calibration.input_gate
    module = Ensemble(members, gate["raw_threshold"] if gate else None).eval()
    if gate and not module.gated:
        raise ExportError("the ensemble's input gate was fitted but a member has none: evaluate the members again")
    extra = {
        "architecture": "ensemble",
        "members": [
            {
                "architecture": c.architecture,
                "temperature": float(m.inv_temperature.reciprocal()),
                "val_accuracy": json.loads((r / "metrics.json").read_text())["accuracy"],
            }
            for c, m, r in zip(cfgs, members, run_dirs)
        ],
        "combination": "mean of the members' calibrated probabilities (logits and cam: mean too); ood_score: "
        "the largest member score over the ensemble's own threshold",
        **_data_card(Path(run_dirs[0]), first),
    }
    if len({c.label_policy for c in cfgs}) > 1:  # say each member's, not only the first's
        extra["label_policy"] = [c.label_policy for c in cfgs]
        extra["caveats"].append(
            "Members differ in label cleaning: "
            + ", ".join(f"{Path(r).name}: {c.label_policy}" for r, c in zip(run_dirs, cfgs))
            + "."
        )
    metrics.setdefault("split", json.loads((Path(run_dirs[0]) / "metrics.json").read_text()).get("split"))
    return _write(
        module, first, _parity_images(first, Path(run_dirs[0])), repo, name, metrics, calibration, extra, cpus
    )


def _check_compatible(repo: Path, name: str, cfg: TrainConfig) -> None:
    """A new version must fit the model's existing config.pbtxt (same input size and classes)."""
    model_dir = Path(repo) / name
    if not (model_dir / repository.CONFIG_FILENAME).is_file():
        return
    params = repository.read_config(model_dir).parameters
    size = params["cxr.image_size"].string_value if "cxr.image_size" in params else None
    classes = params["cxr.classes"].string_value if "cxr.classes" in params else None
    if (size and int(size) != cfg.image_size) or (classes and classes.split(",") != cfg.classes):
        raise ExportError(
            f"model {name!r} in {repo} takes image size {size} and classes {classes}; this run has "
            f"{cfg.image_size} and {','.join(cfg.classes)}: export it under another --name"
        )


def fitted_parameters(calibration: Calibration) -> dict[str, str]:
    """The config parameters that follow the newest version's fit (the gateway reads them, with Triton too)."""
    params = {"cxr.operating_point": repr(float(calibration.operating_point["min_top_probability"]))}
    if calibration.has_gate:
        params["cxr.ood_threshold"] = repr(float(calibration.input_gate["threshold"]))
    return params


def _sync_config(model_dir: Path, onnx_path: Path, params: dict[str, str]) -> None:
    """An existing config.pbtxt (an operator's edits are kept) gets the new version's fitted parameters, and the
    outputs its graph adds (an older repository's config lacks ood_score)."""
    config = repository.read_config(model_dir)
    fresh = repository.default_config(
        config.name,
        onnx_path,
        max_batch_size=config.max_batch_size,
        parameters={"cxr.classes": config.parameters["cxr.classes"].string_value}
        if "cxr.classes" in config.parameters
        else None,
    )
    known = {o.name for o in config.output}
    for output in fresh.output:
        if output.name not in known:
            config.output.add().CopyFrom(output)
    for key in ("cxr.operating_point", "cxr.ood_threshold"):
        if key in params:
            config.parameters[key].string_value = params[key]
        elif key in config.parameters:
            del config.parameters[key]
    repository.write_config(model_dir, config)


def _drop_gate(module: nn.Module) -> None:
    if isinstance(module, Ensemble):
        module.gated = False
    else:
        module.gate = None


def _write(
    module: nn.Module,
    cfg: TrainConfig,
    images: np.ndarray,
    repo: Path,
    name: str,
    metrics: dict,
    calibration: Calibration,
    extra: dict,
    cpus: int | None = None,
    int8: tuple[Int8Settings, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Write one version. `int8`: (settings, (training, validation images, validation labels)): the checked fp32
    graph is quantized, compared with itself on the validation split, and only the accepted int8 graph is written."""
    _check_compatible(repo, name, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        to_onnx(module, cfg.image_size, onnx_path)
        try:
            parity = check_parity(module, onnx_path, images)
        except GateParityError as exc:
            # the classifier is fine, its gate would not be the fitted one: serve it without a gate, and say so
            log.warning("%s: exported WITHOUT the input gate: %s", name, exc)
            _drop_gate(module)
            calibration = dataclasses.replace(calibration, input_gate={"omitted": str(exc)})
            to_onnx(module, cfg.image_size, onnx_path)
            parity = check_parity(module, onnx_path, images)
        card = _card(cfg, metrics, parity, calibration, extra)
        params = {
            "cxr.architecture": extra["architecture"],
            "cxr.synthetic_demo": str(card["synthetic_demo"]).lower(),
            **fitted_parameters(calibration),
        }
        if int8 is not None:
            from training import quantize

            settings, (train_images, val_images, val_labels) = int8
            int8_path = Path(tmp) / "model_int8.onnx"
            card["quantization"] = quantize.quantize_and_check(
                onnx_path, int8_path, train_images, val_images, val_labels, settings
            )
            card["onnx"]["parity"]["graph"] = "fp32, before quantization"
            onnx_path = int8_path
            params["cxr.precision"] = "int8"
        existed = (Path(repo) / name / repository.CONFIG_FILENAME).is_file()
        version_dir = repository.write_model(
            repo,
            name,
            onnx_path,
            classes=cfg.classes,
            image_size=cfg.image_size,
            model_card=card,
            parameters=params,
            cpus=cpus,
        )
        if existed:
            _sync_config(Path(repo) / name, onnx_path, params)
    log.info(
        "exported %s -> %s (parity on %d real images: max |diff| probabilities %.1e)",
        name,
        version_dir,
        parity["images"],
        parity["max_abs_diff"]["probabilities"],
    )
    return version_dir

"""A few-kilobyte ONNX classifier built with onnx.helper, shaped like the models our training exports:
input `image` uint8 [N,1,16,16]; outputs `probabilities`, `logits` [N,3] and `cam` [N,3,2,2]; dynamic batch axis.

The serving unit tests (batcher, sessions, tensor codec, repository format) run on it, so they need neither torch
nor data (MLServer tests its batcher on a toy model too). Every row's answer depends on that row's pixels only and
differs between images, so a batch split back to the wrong caller is caught. The trained models stay for the
end-to-end tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 16
CLASSES = ["Normal", "Lung_Opacity", "Viral Pneumonia"]


def build(path: Path, *, size: int = SIZE, classes: int = len(CLASSES), seed: int = 0) -> Path:
    """Write the toy classifier to `path` (opset 17) and return it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cells = 4  # average-pooled to 4x4 = 16 features
    features = cells * cells
    weights = numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np.float32), "weights")
    bias = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "bias")
    cam_weights = numpy_helper.from_array(rng.normal(size=(features, classes * 4)).astype(np.float32), "cam_weights")
    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")
    cam_shape = numpy_helper.from_array(np.array([-1, classes, 2, 2], np.int64), "cam_shape")
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
        helper.make_node(
            "AveragePool", ["scaled"], ["pooled"], kernel_shape=[size // cells] * 2, strides=[size // cells] * 2
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weights", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("MatMul", ["flat", "cam_weights"], ["cam_flat"]),
        helper.make_node("Reshape", ["cam_flat", "cam_shape"], ["cam"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_classifier",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", classes, 2, 2]),
        ],
        initializer=[weights, bias, cam_weights, scale, cam_shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cxr-tests")
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def images(count: int, *, size: int = SIZE, seed: int = 1) -> np.ndarray:
    """`count` different uint8 [count,1,size,size] images."""
    return np.random.default_rng(seed).integers(0, 256, (count, 1, size, size), dtype=np.uint8)

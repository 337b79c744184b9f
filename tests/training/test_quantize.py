"""`cxr export --int8` on the fixture's real (tiny) custom_cnn run: the int8 graph's shape, what stays float, the
model card's quantization block, and the refusal that writes nothing. The tiny model's agreement with fp32 means
nothing, so the bars are set by flag: one that any graph passes, one that none can."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cxr import repository
from cxr.cli import main
from training.quantize import Int8Settings, QuantizationRefused, accept, float_parts

INTEGER_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}


def _report(agreement: float, auc_drop: float) -> dict:
    return {
        "agreement": agreement,
        "auc_drop": auc_drop,
        "auc_fp32": 0.9,
        "auc_int8": 0.9 - auc_drop,
        "validation_images": 300,
    }


def test_accept_holds_both_bars():
    settings = Int8Settings()
    assert accept(_report(0.99, 0.005), settings)["accepted"] is True
    with pytest.raises(QuantizationRefused, match="agreement with fp32 0.9867 < 0.99"):
        accept(_report(0.9867, 0.0), settings)
    with pytest.raises(QuantizationRefused, match="AUC drop 0.0060 > 0.005"):
        accept(_report(1.0, 0.006), settings)
    with pytest.raises(QuantizationRefused):
        accept(_report(float("nan"), 0.0), settings)  # an undefined agreement is no agreement


def test_export_int8_writes_a_quantized_model_beside_fp32_with_the_gate_in_float(trained_repository, tmp_path):
    run = trained_repository.parent / "runs" / "custom_cnn"
    repo = tmp_path / "repo"
    args = ["export", str(run), "--repository", str(repo), "--int8"]
    assert main([*args, "--int8-min-agreement", "0", "--int8-max-auc-drop", "1"]) == 0
    version = repo / "custom_cnn_int8" / "1"
    assert repository.list_models(repo) == ["custom_cnn_int8"]
    config = repository.read_config(repo / "custom_cnn_int8")
    assert [o.name for o in config.output] == ["probabilities", "logits", "cam", "ood_score"]
    assert config.parameters["cxr.precision"].string_value == "int8"
    assert repository.read_labels(repo / "custom_cnn_int8") == repository.read_labels(trained_repository / "custom_cnn")

    card = repository.read_model_card(version)
    q = card["quantization"]
    assert q["accepted"] is True and q["per_channel"] is True and q["format"].startswith("QDQ")
    assert 0 < q["calibration_images"] <= 256 and q["validation_images"] == card["metrics"]["n"]  # all of it
    assert 0 <= q["agreement"] <= 1 and q["auc_drop"] == pytest.approx(q["auc_fp32"] - q["auc_int8"])
    assert 0 <= q["gate_agreement"] <= 1

    model = onnx.load(str(version / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert INTEGER_OPS & set(ops) and ops.count("QuantizeLinear") >= 3
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    parts = float_parts(model)
    assert parts["gate"] and parts["head"] and parts["stem"]
    # the gate and the head read the backbone's dequantized outputs and compute in float from there: none of their
    # results is quantized, and the gate's Mahalanobis matrices stay float64 initializers
    for name in parts["gate"] | parts["head"]:
        assert not set(nodes[name].output) & quantized, name
    gate_matmuls = [nodes[n] for n in parts["gate"] if nodes[n].op_type == "MatMul"]
    assert gate_matmuls
    initializers = {i.name: i for i in model.graph.initializer}
    assert all(initializers[n.input[1]].data_type == onnx.TensorProto.DOUBLE for n in gate_matmuls)
    # the uint8 pixels are rescaled and read by the first Conv in float: nothing there reads a dequantized tensor
    for name in parts["stem"]:
        node = nodes[name]
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input), name
    # every backbone Conv after the stem reads dequantized int8 weights
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in parts["stem"]]
    assert len(convs) >= 4 and all(producer[c.input[1]].op_type == "DequantizeLinear" for c in convs)

    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    image = np.zeros((2, 1, 64, 64), np.uint8)
    probs, cam, score = session.run(["probabilities", "cam", "ood_score"], {"image": image})
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert cam.shape == (2, 3, 2, 2) and score.shape == (2, 1) and score.dtype == np.float32


def test_export_int8_refuses_below_its_bar_and_writes_nothing(trained_repository, tmp_path, capsys):
    run = trained_repository.parent / "runs" / "custom_cnn"
    repo = tmp_path / "repo"
    assert main(["export", str(run), "--repository", str(repo), "--int8", "--int8-min-agreement", "1.01"]) == 1
    out = capsys.readouterr().out
    assert "export failed" in out and "int8 refused" in out and "< 1.01" in out
    assert repository.list_models(repo) == []


def test_int8_flags_are_checked_before_anything_is_written(tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(SystemExit, match="one run's graph"):
        main(["export", "a", "b", "--ensemble", "--int8", "--repository", str(repo)])
    with pytest.raises(SystemExit, match="need --int8"):
        main(["export", "a", "--int8-min-agreement", "0.5", "--repository", str(repo)])
    assert not repo.exists()

"""cxr.datatypes: the one datatype table (onnxruntime <-> config <-> KServe v2 <-> numpy), the batch-axis rule and
the tensor byte codec. The table is checked against onnxruntime itself: a one-node graph of every type."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from cxr import datatypes
from cxr.datatypes import TensorError
from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference.model_config_pb2 import DataType

SAMPLES = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 2, 127, 200, 255],
    "UINT16": [0, 1, 2, 300, 40000, 65535],
    "UINT32": [0, 1, 2, 70000, 2**31, 2**32 - 1],
    "UINT64": [0, 1, 2, 2**33, 2**40, 2**63],
    "INT8": [-128, -1, 0, 1, 5, 127],
    "INT16": [-32768, -1, 0, 1, 300, 32767],
    "INT32": [-(2**31), -1, 0, 1, 70000, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2**40, 2**63 - 1],
    "FP16": [-1.5, 0.0, 0.25, 1.0, 2.0, 65504.0],
    "FP32": [-1.5, 0.0, 0.25, 1.0, 1e-3, 3.0e38],
    "FP64": [-1.5, 0.0, 0.25, 1.0, 1e-300, 1e300],
}


def _identity_model(kind: datatypes.Datatype) -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(kind.dtype) if kind.dtype is not None else onnx.TensorProto.STRING
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, ["N", 3])],
        [helper.make_tensor_value_info("y", elem, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_every_config_datatype_has_one_entry_under_unique_names():
    declared = {v for v in DataType.values() if v != DataType.TYPE_INVALID}
    assert {d.config for d in datatypes.DATATYPES} == declared
    for attribute in ("name", "config", "onnx"):
        values = [getattr(d, attribute) for d in datatypes.DATATYPES]
        assert len(values) == len(set(values)), f"{attribute} repeats"
    for d in datatypes.DATATYPES:
        assert datatypes.by_name(d.name) is datatypes.by_config(d.config) is datatypes.by_onnx(d.onnx) is d
        if d.contents is not None:
            assert d.contents in pb.InferTensorContents.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("kind", [d for d in datatypes.DATATYPES if d.servable], ids=lambda d: d.name)
def test_onnxruntime_agrees_with_the_table_and_raw_bytes_round_trip(kind):
    session = ort.InferenceSession(_identity_model(kind), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == kind.onnx
    if kind.name == "BYTES":
        array = np.array([[b"", b"a", b"\x00\xff"], [b"Normal", b"x" * 300, b"z"]], dtype=object)
    else:
        array = np.array(SAMPLES[kind.name], dtype=kind.dtype).reshape(2, 3)
    feed = array if kind.name != "BYTES" else np.array([["a", "b", "c"]], dtype=object)
    (answer,) = session.run(None, {"x": feed})
    assert answer.tolist() == feed.tolist() and (kind.dtype is None or answer.dtype == kind.dtype)
    decoded = datatypes.to_array(kind.name, [2, 3], raw=datatypes.to_raw(array, kind.name))
    assert decoded.shape == (2, 3)
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("name", [n for n in SAMPLES if datatypes.by_name(n).contents])
def test_typed_contents_decode_with_their_range_checked(name):
    kind = datatypes.by_name(name)
    contents = pb.InferTensorContents()
    getattr(contents, kind.contents).extend(SAMPLES[name])
    array = datatypes.to_array(name, [2, 3], contents=contents)
    assert array.dtype == kind.dtype and array.reshape(-1).tolist() == np.array(SAMPLES[name], kind.dtype).tolist()
    if kind.dtype.kind in "iu" and name not in ("UINT64", "INT64", "UINT32", "INT32"):
        wide = pb.InferTensorContents()
        getattr(wide, kind.contents).extend([int(np.iinfo(kind.dtype).max) + 1])
        with pytest.raises(TensorError, match=f"out of range for {name}"):
            datatypes.to_array(name, [1], contents=wide)


def test_counts_and_byte_lengths_are_checked_with_a_message_that_says_what_was_expected():
    with pytest.raises(TensorError, match=r"input 'image': expected 12 bytes for FP32 \[1,3\], received 8 bytes"):
        datatypes.to_array("FP32", [1, 3], raw=b"\0" * 8, tensor="input 'image'")
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0])
    with pytest.raises(TensorError, match=r"expected 3 values in contents.fp32_contents"):
        datatypes.to_array("FP32", [1, 3], contents=contents)
    with pytest.raises(TensorError, match="FP16 has no typed contents field; send it in raw contents"):
        datatypes.to_array("FP16", [1], contents=pb.InferTensorContents())
    with pytest.raises(TensorError, match="negative dimension"):
        datatypes.to_array("UINT8", [-1, 2], raw=b"")
    with pytest.raises(TensorError, match="unknown datatype"):
        datatypes.to_array("FLOAT", [1], raw=b"\0" * 4)
    with pytest.raises(TensorError, match="bytes left over"):
        datatypes.to_array("BYTES", [1], raw=datatypes.to_raw(np.array([b"ab", b"c"], object), "BYTES"))
    with pytest.raises(TensorError, match="claims 9 bytes"):
        datatypes.to_array("BYTES", [1], raw=b"\x09\0\0\0abc")


def test_the_batch_axis_rule():
    assert datatypes.config_dims(["N", 1, 224, 224], 32, "image") == [1, 224, 224]
    assert datatypes.config_dims([None, 3, "h", 7], 8, "cam") == [3, -1, 7], "symbolic dimensions become -1"
    assert datatypes.config_dims([1, 3], 0, "x") == [1, 3], "without batching the first axis stays"
    with pytest.raises(TensorError, match="needs a dynamic first"):
        datatypes.config_dims([1, 3], 32, "x")
    with pytest.raises(TensorError, match="needs a dynamic first"):
        datatypes.config_dims([], 32, "scalar")

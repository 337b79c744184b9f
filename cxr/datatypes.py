"""Tensor datatypes and shapes, the one table: onnxruntime <-> Triton config <-> KServe v2 wire <-> numpy.

    onnxruntime     config.pbtxt      KServe v2 / Triton    numpy    typed contents field
    tensor(float)   TYPE_FP32         "FP32"                <f4      fp32_contents

The model repository writes config.pbtxt from an ONNX graph with it, the inference service checks a graph against
its config and encodes and decodes tensors with it, and the gateway builds its requests and reads the responses
with it (KServe's `numpy_codec` has the same place). Also here, once: the dynamic batch axis rule
(`config_dims`), and tensor bytes <-> arrays (`to_array`, `to_raw`), raw or typed.

Ground floor: imports numpy and the generated protobuf enums only (no grpc, no onnxruntime, no torch).
Errors are `TensorError` (a ValueError) with a message that names the tensor and what was expected.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxr.generated.inference.model_config_pb2 import DataType


class TensorError(ValueError):
    """A tensor whose datatype, shape or bytes do not fit; the message says what was expected and received."""


@dataclass(frozen=True)
class Datatype:
    """One datatype under each of its names. `dtype` is None where numpy has none (BYTES: length-prefixed
    strings; BF16); `contents` is the InferTensorContents field of the typed form, None where KServe has none."""

    name: str  # KServe v2 / Triton wire name, e.g. "FP32"
    config: int  # config.pbtxt DataType, e.g. DataType.TYPE_FP32
    onnx: str  # onnxruntime's NodeArg.type, e.g. "tensor(float)"
    dtype: np.dtype | None
    contents: str | None

    @property
    def servable(self) -> bool:
        """Whether tensors of this type can be decoded and encoded here (numpy has it, or it is BYTES)."""
        return self.dtype is not None or self.name == "BYTES"


DATATYPES: tuple[Datatype, ...] = (
    Datatype("BOOL", DataType.TYPE_BOOL, "tensor(bool)", np.dtype(np.bool_), "bool_contents"),
    Datatype("UINT8", DataType.TYPE_UINT8, "tensor(uint8)", np.dtype(np.uint8), "uint_contents"),
    Datatype("UINT16", DataType.TYPE_UINT16, "tensor(uint16)", np.dtype("<u2"), "uint_contents"),
    Datatype("UINT32", DataType.TYPE_UINT32, "tensor(uint32)", np.dtype("<u4"), "uint_contents"),
    Datatype("UINT64", DataType.TYPE_UINT64, "tensor(uint64)", np.dtype("<u8"), "uint64_contents"),
    Datatype("INT8", DataType.TYPE_INT8, "tensor(int8)", np.dtype(np.int8), "int_contents"),
    Datatype("INT16", DataType.TYPE_INT16, "tensor(int16)", np.dtype("<i2"), "int_contents"),
    Datatype("INT32", DataType.TYPE_INT32, "tensor(int32)", np.dtype("<i4"), "int_contents"),
    Datatype("INT64", DataType.TYPE_INT64, "tensor(int64)", np.dtype("<i8"), "int64_contents"),
    Datatype("FP16", DataType.TYPE_FP16, "tensor(float16)", np.dtype("<f2"), None),  # raw only, as in KServe
    Datatype("FP32", DataType.TYPE_FP32, "tensor(float)", np.dtype("<f4"), "fp32_contents"),
    Datatype("FP64", DataType.TYPE_FP64, "tensor(double)", np.dtype("<f8"), "fp64_contents"),
    Datatype("BYTES", DataType.TYPE_STRING, "tensor(string)", None, "bytes_contents"),
    Datatype("BF16", DataType.TYPE_BF16, "tensor(bfloat16)", None, None),  # in configs; not served here
)
_BY_NAME = {d.name: d for d in DATATYPES}
_BY_CONFIG = {d.config: d for d in DATATYPES}
_BY_ONNX = {d.onnx: d for d in DATATYPES}


def by_name(name: str) -> Datatype:
    """The datatype of a KServe v2 name ("FP32")."""
    return _look_up(_BY_NAME, name, f"unknown datatype {name or '(empty)'!r}; known: {sorted(_BY_NAME)}")


def by_config(data_type: int) -> Datatype:
    """The datatype of a config.pbtxt DataType value (TYPE_FP32)."""
    return _look_up(_BY_CONFIG, data_type, f"unsupported config data_type {data_type}")


def by_onnx(ort_type: str) -> Datatype:
    """The datatype of an onnxruntime type string ("tensor(float)")."""
    return _look_up(_BY_ONNX, ort_type, f"unsupported ONNX tensor type {ort_type}")


def _look_up(table: dict, key, message: str) -> Datatype:
    found = table.get(key)
    if found is None:
        raise TensorError(message)
    return found


def format_shape(shape: Sequence) -> str:
    """[1,3,-1]: how every message here writes a shape."""
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def config_dims(onnx_shape: Sequence, max_batch_size: int, tensor: str) -> list[int]:
    """An ONNX graph's shape as config.pbtxt dims: symbolic dimensions become -1, and with max_batch_size > 0 the
    first axis must be the dynamic batch axis and is left out (Triton's rule). Raises TensorError otherwise."""
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in onnx_shape]
    if max_batch_size > 0:
        if not dims or dims[0] != -1:
            raise TensorError(
                f"tensor {tensor!r} has shape {list(onnx_shape)}: max_batch_size {max_batch_size} > 0 "
                "needs a dynamic first (batch) axis"
            )
        dims = dims[1:]
    return dims


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)  # Python ints: no overflow, and a tenth of np.prod's cost per request


def to_array(
    datatype: str, shape: Sequence[int], *, raw: bytes | None = None, contents=None, tensor: str = "tensor"
) -> np.ndarray:
    """One tensor as an array: from its raw bytes (`raw`, little-endian, BYTES length-prefixed) or, without them,
    from its typed `contents` (an InferTensorContents). Every count and range is checked against `shape`."""
    kind = by_name(datatype)
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise TensorError(f"{tensor}: shape {format_shape(shape)} has a negative dimension")
    count = element_count(shape)
    if raw is not None:
        if kind.name == "BYTES":
            return _parse_bytes(raw, count, tensor).reshape(shape)
        if kind.dtype is None:
            raise TensorError(f"{tensor}: datatype {kind.name} cannot be decoded here")
        expected = count * kind.dtype.itemsize
        if len(raw) != expected:
            raise TensorError(
                f"{tensor}: expected {expected} bytes for {kind.name} {format_shape(shape)}, received {len(raw)} bytes"
            )
        return np.frombuffer(raw, dtype=kind.dtype).reshape(shape)
    if kind.contents is None:
        raise TensorError(f"{tensor}: {kind.name} has no typed contents field; send it in raw contents")
    values = getattr(contents, kind.contents) if contents is not None else []
    if len(values) != count:
        raise TensorError(
            f"{tensor}: expected {count} values in contents.{kind.contents} for {kind.name} "
            f"{format_shape(shape)}, received {len(values)}"
        )
    if kind.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if kind.dtype.kind in "iu":
        wide = np.asarray(values, dtype=np.int64 if kind.name != "UINT64" else np.uint64)
        info = np.iinfo(kind.dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise TensorError(f"{tensor}: values out of range for {kind.name} ({info.min}..{info.max})")
        return wide.astype(kind.dtype).reshape(shape)
    return np.asarray(values, dtype=kind.dtype).reshape(shape)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """An array as KServe v2 raw contents of `datatype`: little-endian bytes, or for BYTES each element as a 4-byte
    little-endian length followed by its bytes."""
    kind = by_name(datatype)
    if kind.name == "BYTES":
        items = [item if isinstance(item, bytes) else str(item).encode() for item in np.asarray(array).reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    if kind.dtype is None:
        raise TensorError(f"datatype {kind.name} cannot be encoded here")
    return np.ascontiguousarray(array, dtype=kind.dtype).tobytes()


def _parse_bytes(raw: bytes, count: int, tensor: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"{tensor}: BYTES raw contents end after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"{tensor}: BYTES element {i} claims {length} bytes, {len(raw) - offset} remain")
        out[i] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise TensorError(f"{tensor}: {len(raw) - offset} bytes left over after {count} BYTES elements")
    return out

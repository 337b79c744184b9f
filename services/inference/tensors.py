"""KServe v2 tensors <-> numpy: datatype names, request decoding with validation, response encoding,
and the classification extension.

Every check names the expected and the received value, so a client can fix its request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference.model_config_pb2 import DataType
from services.inference.errors import invalid as _invalid

# config DataType -> (KServe datatype name, numpy dtype); BYTES has no fixed-size numpy dtype
DATATYPES: dict[int, tuple[str, np.dtype | None]] = {
    DataType.TYPE_BOOL: ("BOOL", np.dtype(np.bool_)),
    DataType.TYPE_UINT8: ("UINT8", np.dtype(np.uint8)),
    DataType.TYPE_UINT16: ("UINT16", np.dtype("<u2")),
    DataType.TYPE_UINT32: ("UINT32", np.dtype("<u4")),
    DataType.TYPE_UINT64: ("UINT64", np.dtype("<u8")),
    DataType.TYPE_INT8: ("INT8", np.dtype(np.int8)),
    DataType.TYPE_INT16: ("INT16", np.dtype("<i2")),
    DataType.TYPE_INT32: ("INT32", np.dtype("<i4")),
    DataType.TYPE_INT64: ("INT64", np.dtype("<i8")),
    DataType.TYPE_FP16: ("FP16", np.dtype("<f2")),
    DataType.TYPE_FP32: ("FP32", np.dtype("<f4")),
    DataType.TYPE_FP64: ("FP64", np.dtype("<f8")),
    DataType.TYPE_STRING: ("BYTES", None),
}
NAME_TO_DTYPE = {name: dtype for name, dtype in DATATYPES.values()}

# KServe datatype -> the InferTensorContents field that carries it in typed form
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def datatype_name(data_type: int) -> str:
    return DATATYPES.get(data_type, ("INVALID", None))[0]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, KServe datatype, and shape without the batch axis (-1 variable)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return NAME_TO_DTYPE[self.datatype]

    def full_shape(self, max_batch_size: int) -> list[int]:
        return ([-1] if max_batch_size > 0 else []) + list(self.dims)


def _fmt(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def decode_inputs(
    request: pb.ModelInferRequest, specs: list[TensorSpec], max_batch_size: int, model: str
) -> tuple[dict[str, np.ndarray], int]:
    """Validate the request's inputs against the model and return them as arrays, plus the batch size (rows)."""
    by_name = {s.name: s for s in specs}
    seen = set()
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(f"model {model!r}: {len(request.inputs)} inputs but {len(raw)} raw_input_contents entries; "
                       "expected one raw entry per input")
    arrays: dict[str, np.ndarray] = {}
    rows = None
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise _invalid(f"model {model!r} has no input {tensor.name!r}; expected inputs: {sorted(by_name)}")
        if tensor.name in seen:
            raise _invalid(f"model {model!r}: input {tensor.name!r} given twice")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise _invalid(f"model {model!r} input {tensor.name!r}: expected datatype {spec.datatype}, "
                           f"received {tensor.datatype or '(empty)'}")
        shape = [int(d) for d in tensor.shape]
        expected = spec.full_shape(max_batch_size)
        ok = len(shape) == len(expected) and all(e == -1 or e == s for e, s in zip(expected, shape))
        if not ok or any(d < 0 for d in shape):
            raise _invalid(f"model {model!r} input {tensor.name!r}: expected shape {_fmt(expected)} "
                           f"(-1 any size), received {_fmt(shape)}")
        if max_batch_size > 0:
            batch = shape[0]
            if not 1 <= batch <= max_batch_size:
                raise _invalid(f"model {model!r} input {tensor.name!r}: batch size must be 1..{max_batch_size} "
                               f"(max_batch_size), received {batch}")
            if rows is not None and batch != rows:
                raise _invalid(f"model {model!r}: inputs disagree on the batch size ({rows} vs {batch})")
            rows = batch
        count = int(np.prod(shape, dtype=np.int64))
        dtype = spec.dtype
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise _invalid(f"model {model!r} input {tensor.name!r}: expected {count * dtype.itemsize} bytes "
                               f"for {spec.datatype} {_fmt(shape)}, received {len(data)} bytes")
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            field = CONTENTS_FIELD[spec.datatype]
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise _invalid(f"model {model!r} input {tensor.name!r}: expected {count} values in contents.{field} "
                               f"for {spec.datatype} {_fmt(shape)}, received {len(values)}")
            array = np.asarray(values, dtype=np.int64 if dtype.kind in "iu" else dtype)
            if dtype.kind in "iu":
                info = np.iinfo(dtype)
                if array.size and (array.min() < info.min or array.max() > info.max):
                    raise _invalid(f"model {model!r} input {tensor.name!r}: values out of range for {spec.datatype} "
                                   f"({info.min}..{info.max})")
            array = array.astype(dtype).reshape(shape)
        arrays[tensor.name] = array
    missing = [s.name for s in specs if s.name not in seen]
    if missing:
        raise _invalid(f"model {model!r}: missing inputs {missing}; expected inputs: {[s.name for s in specs]}")
    return arrays, (rows if max_batch_size > 0 else 1)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; `classification` > 0 asks for the top-K classes instead of the tensor."""

    name: str
    classification: int = 0


def decode_outputs(request: pb.ModelInferRequest, specs: list[TensorSpec], num_labels: int, model: str
                   ) -> list[RequestedOutput]:
    """The outputs to return: those requested, or every model output when none is requested."""
    names = [s.name for s in specs]
    if not request.outputs:
        return [RequestedOutput(n) for n in names]
    result = []
    for out in request.outputs:
        if out.name not in names:
            raise _invalid(f"model {model!r} has no output {out.name!r}; expected outputs: {names}")
        k = 0
        if "classification" in out.parameters:
            param = out.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise _invalid(f"output {out.name!r}: the classification parameter must be an integer, received {kind}")
            k = int(getattr(param, kind))
            spec = next(s for s in specs if s.name == out.name)
            classes = spec.dims[-1] if spec.dims else 0
            if len(spec.dims) != 1 or not 1 <= k:
                raise _invalid(f"output {out.name!r} of shape {_fmt(spec.dims)}: classification needs a [classes] "
                               f"output and K >= 1, received K={k}")
            k = min(k, classes) if classes > 0 else k
        result.append(RequestedOutput(out.name, k))
    return result


def classify(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: per row, the top-k as b"score:index:label" (label omitted without labels)."""
    scores = scores.reshape(scores.shape[0], -1)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty((scores.shape[0], k), dtype=object)
    for r in range(scores.shape[0]):
        for j, idx in enumerate(top[r]):
            text = f"{float(scores[r, idx]):f}:{int(idx)}"
            if idx < len(labels):
                text += f":{labels[idx]}"
            out[r, j] = text.encode()
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    """KServe raw BYTES layout: each element as a 4-byte little-endian length followed by its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))


def encode_output(response: pb.ModelInferResponse, name: str, array: np.ndarray, datatype: str) -> None:
    """Append one output tensor to the response in raw form (as Triton answers)."""
    # raw_output_contents[i] belongs to outputs[i]
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if datatype == "BYTES":
        response.raw_output_contents.append(serialize_bytes(array))
    else:
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=NAME_TO_DTYPE[datatype]).tobytes())

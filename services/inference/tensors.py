"""A ModelInferRequest's tensors checked against the model (names, datatypes, shapes, batch size, requested
outputs), the response's encoding, and the classification extension. The datatype table and the byte codec are
`cxr.datatypes`.

Every check names the expected and the received value, so a client can fix its request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr import datatypes
from cxr.datatypes import TensorError, format_shape
from cxr.generated.inference import grpc_service_pb2 as pb
from services.common.errors import invalid as _invalid


def datatype_name(data_type: int) -> str:
    """The KServe name of a config DataType ("INVALID" for one we do not know)."""
    try:
        return datatypes.by_config(data_type).name
    except TensorError:
        return "INVALID"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, KServe datatype, and shape without the batch axis (-1 variable)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype | None:
        return datatypes.by_name(self.datatype).dtype

    def full_shape(self, max_batch_size: int) -> list[int]:
        return ([-1] if max_batch_size > 0 else []) + list(self.dims)


def decode_inputs(
    request: pb.ModelInferRequest, specs: list[TensorSpec], max_batch_size: int, model: str
) -> tuple[dict[str, np.ndarray], int]:
    """Validate the request's inputs against the model and return them as arrays, plus the batch size (rows)."""
    by_name = {s.name: s for s in specs}
    seen = set()
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(
            f"model {model!r}: {len(request.inputs)} inputs but {len(raw)} raw_input_contents entries; "
            "expected one raw entry per input"
        )
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
            raise _invalid(
                f"model {model!r} input {tensor.name!r}: expected datatype {spec.datatype}, "
                f"received {tensor.datatype or '(empty)'}"
            )
        shape = [int(d) for d in tensor.shape]
        expected = spec.full_shape(max_batch_size)
        ok = len(shape) == len(expected) and all(e == -1 or e == s for e, s in zip(expected, shape))
        if not ok or any(d < 0 for d in shape):
            raise _invalid(
                f"model {model!r} input {tensor.name!r}: expected shape {format_shape(expected)} "
                f"(-1 any size), received {format_shape(shape)}"
            )
        if max_batch_size > 0:
            batch = shape[0]
            if not 1 <= batch <= max_batch_size:
                raise _invalid(
                    f"model {model!r} input {tensor.name!r}: batch size must be 1..{max_batch_size} "
                    f"(max_batch_size), received {batch}"
                )
            if rows is not None and batch != rows:
                raise _invalid(f"model {model!r}: inputs disagree on the batch size ({rows} vs {batch})")
            rows = batch
        try:
            array = datatypes.to_array(
                spec.datatype,
                shape,
                raw=raw[i] if raw else None,
                contents=tensor.contents,
                tensor=f"model {model!r} input {tensor.name!r}",
            )
        except TensorError as e:
            raise _invalid(str(e)) from None
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


def parse_requested_outputs(
    request: pb.ModelInferRequest, specs: list[TensorSpec], model: str
) -> list[RequestedOutput]:
    """The outputs the request asks for, checked against the model (every output when it names none)."""
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
                raise _invalid(
                    f"output {out.name!r} of shape {format_shape(spec.dims)}: classification needs a [classes] "
                    f"output and K >= 1, received K={k}"
                )
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


def encode_output(response: pb.ModelInferResponse, name: str, array: np.ndarray, datatype: str) -> None:
    """Append one output tensor to the response in raw form (as Triton answers)."""
    # raw_output_contents[i] belongs to outputs[i]
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    response.raw_output_contents.append(datatypes.to_raw(array, datatype))

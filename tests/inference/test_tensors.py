"""services/inference/tensors.py: a ModelInferRequest checked against the toy classifier's config (names, datatypes,
shapes, batch size, requested outputs) and the response's encoding, in-process, without a server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cxr import datatypes, repository
from cxr.generated.inference import grpc_service_pb2 as pb
from services.common.errors import ServiceError
from services.inference.model_manager import _specs
from services.inference.tensors import classify, decode_inputs, encode_output, parse_requested_outputs
from tests import toy_model


@pytest.fixture(scope="module")
def specs(toy_repository):
    config = repository.read_config(toy_repository / "toy")
    return _specs(config.input), _specs(config.output), config.max_batch_size


def _request(
    images: np.ndarray, *, raw: bool = True, datatype: str = "UINT8", name: str = "image", shape=None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="toy")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(images.shape if shape is None else shape))
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    return request


def _refused(call, match: str) -> ServiceError:
    with pytest.raises(ServiceError, match=match) as refused:
        call()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.reason == "invalid_argument"
    return refused.value


def test_raw_and_typed_inputs_decode_to_the_same_rows(specs):
    inputs, _, max_batch = specs
    images = toy_model.images(3)
    for raw in (True, False):
        arrays, rows = decode_inputs(_request(images, raw=raw), inputs, max_batch, "toy")
        assert rows == 3 and arrays["image"].dtype == np.uint8
        np.testing.assert_array_equal(arrays["image"], images)


def test_a_request_that_does_not_fit_the_model_is_refused_with_what_was_expected(specs):
    inputs, _, max_batch = specs
    one = toy_model.images(1)
    _refused(
        lambda: decode_inputs(_request(one, datatype="FP32"), inputs, max_batch, "toy"),
        "expected datatype UINT8, received FP32",
    )
    _refused(
        lambda: decode_inputs(_request(one, shape=[1, 1, 8, 32]), inputs, max_batch, "toy"),
        r"expected shape \[-1,1,16,16\] \(-1 any size\), received \[1,1,8,32\]",
    )
    _refused(
        lambda: decode_inputs(_request(one, name="pixels"), inputs, max_batch, "toy"),
        "has no input 'pixels'; expected inputs: \\['image'\\]",
    )
    many = toy_model.images(max_batch + 1)
    _refused(lambda: decode_inputs(_request(many), inputs, max_batch, "toy"), f"batch size must be 1..{max_batch}")
    short = _request(one)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    _refused(lambda: decode_inputs(short, inputs, max_batch, "toy"), r"expected 256 bytes for UINT8 \[1,1,16,16\]")
    _refused(
        lambda: decode_inputs(pb.ModelInferRequest(model_name="toy"), inputs, max_batch, "toy"),
        r"missing inputs \['image'\]",
    )


def test_requested_outputs_default_to_all_and_classification_asks_for_the_top_k(specs):
    _, outputs, _ = specs
    assert [o.name for o in parse_requested_outputs(pb.ModelInferRequest(), outputs, "toy")] == [
        "probabilities",
        "logits",
        "cam",
    ]
    request = pb.ModelInferRequest()
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
    (wanted,) = parse_requested_outputs(request, outputs, "toy")
    assert (wanted.name, wanted.classification) == ("probabilities", 3), "K is capped at the class count"
    request.outputs.add(name="heatmap")
    _refused(lambda: parse_requested_outputs(request, outputs, "toy"), "has no output 'heatmap'")
    cam = pb.ModelInferRequest()
    cam.outputs.add(name="cam").parameters["classification"].int64_param = 1
    _refused(lambda: parse_requested_outputs(cam, outputs, "toy"), "classification needs a \\[classes\\] output")


def test_the_response_carries_raw_tensors_and_classification_strings():
    response = pb.ModelInferResponse()
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    encode_output(response, "probabilities", scores, "FP32")
    encode_output(response, "top", classify(scores, 2, toy_model.CLASSES), "BYTES")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [2, 3]),
        ("top", "BYTES", [2, 2]),
    ]
    np.testing.assert_array_equal(datatypes.to_array("FP32", [2, 3], raw=response.raw_output_contents[0]), scores)
    top = datatypes.to_array("BYTES", [2, 2], raw=response.raw_output_contents[1])
    assert top.tolist() == [
        [b"0.700000:1:Lung_Opacity", b"0.200000:2:Viral Pneumonia"],
        [b"0.500000:0:Normal", b"0.300000:2:Viral Pneumonia"],
    ]

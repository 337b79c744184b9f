"""What the tritonclient checks share: building an input tensor, and expecting an error from a call."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def image_input(images: np.ndarray, name: str = "image", datatype: str = "UINT8") -> triton.InferInput:
    tensor = triton.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def expect_error(code: str, call, *fragments: str) -> str:
    """`call()` must fail with gRPC status CODE and a message holding every fragment; returns the message."""
    with pytest.raises(InferenceServerException) as error:
        call()
    assert error.value.status() == f"StatusCode.{code}", error.value.message()
    for fragment in fragments:
        assert fragment in error.value.message(), error.value.message()
    return error.value.message()

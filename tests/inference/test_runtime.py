"""onnxruntime sessions: provider choice from settings and config, instances, warm-up, on a trained model."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cxr import repository
from cxr.generated.inference.model_config_pb2 import ModelInstanceGroup
from services.inference import runtime


def test_kind_cpu_runs_on_the_cpu_only(served_repository):
    config = repository.read_config(served_repository / "mobilenet")
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=ModelInstanceGroup.KIND_CPU)
    assert runtime.choose_providers([], config) == ["CPUExecutionProvider"]


def test_without_a_gpu_cuda_falls_back_to_the_cpu_with_a_logged_reason(served_repository, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)
    config = repository.read_config(served_repository / "mobilenet")
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=ModelInstanceGroup.KIND_GPU)
    with caplog.at_level(logging.WARNING):
        assert runtime.choose_providers([], config) == ["CPUExecutionProvider"]
    assert "falling back to CPU" in caplog.text


def test_operator_providers_keep_their_order_with_the_cpu_last(served_repository, caplog):
    config = repository.read_config(served_repository / "mobilenet")
    with caplog.at_level(logging.WARNING):
        chosen = runtime.choose_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"], config)
    assert chosen == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


@pytest.mark.parametrize("count", [1, 2])
def test_instance_group_count_sessions_all_answer_alike(served_repository, radiographs, count):
    model_dir = served_repository / "mobilenet"
    config = repository.read_config(model_dir)
    config.instance_group[0].count = count
    config.parameters["intra_op_thread_count"].string_value = "1"
    pool = runtime.SessionPool(repository.model_path(model_dir, 1), config, providers=["CPUExecutionProvider"],
                               intra_op_threads=0, inter_op_threads=0, graph_optimization="all")
    assert pool.count == count and pool.providers == ["CPUExecutionProvider"]
    pool.warm_up({"image": np.zeros((1, 1, 64, 64), np.uint8)})
    answers = [pool.sessions[i].run(["probabilities"], {"image": radiographs})[0] for i in range(count)]
    via_pool = pool.run({"image": radiographs}, ["probabilities", "logits"])
    assert sorted(via_pool) == ["logits", "probabilities"]
    for answer in answers:
        np.testing.assert_allclose(answer, via_pool["probabilities"], rtol=1e-5, atol=1e-6)


def test_cuda_comes_first_where_a_gpu_is_visible(served_repository, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    monkeypatch.setattr(runtime, "gpu_visible", lambda: True)
    config = repository.read_config(served_repository / "mobilenet")
    assert runtime.choose_providers([], config) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    expected = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.choose_providers([], config) == expected


def test_a_cuda_session_without_a_usable_gpu_falls_back_to_the_cpu_and_says_so(served_repository, caplog):
    if runtime.gpu_visible():
        pytest.skip("a GPU is visible here: CUDA would be used, not fallen back from")
    model_dir = served_repository / "mobilenet"
    config = repository.read_config(model_dir)
    with caplog.at_level(logging.WARNING):
        pool = runtime.SessionPool(repository.model_path(model_dir, 1), config,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                   intra_op_threads=1, inter_op_threads=0, graph_optimization="all")
    assert pool.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider could not be used" in caplog.text
    assert pool.run({"image": np.zeros((1, 1, 64, 64), np.uint8)}, ["logits"])["logits"].shape == (1, 3)

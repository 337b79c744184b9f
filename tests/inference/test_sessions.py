"""onnxruntime sessions (services/inference/sessions.py): provider choice from settings and config, instances,
warm-up, on the toy classifier (tests/toy_model.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cxr import repository
from cxr.generated.inference.model_config_pb2 import ModelInstanceGroup
from services.inference import sessions
from tests import toy_model


def test_kind_cpu_runs_on_the_cpu_only(toy_repository):
    config = repository.read_config(toy_repository / "toy")
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=ModelInstanceGroup.KIND_CPU)
    assert sessions.choose_providers([], config) == ["CPUExecutionProvider"]


def test_without_a_gpu_cuda_falls_back_to_the_cpu_with_a_logged_reason(toy_repository, monkeypatch, caplog):
    monkeypatch.setattr(sessions, "gpu_visible", lambda: False)
    config = repository.read_config(toy_repository / "toy")
    del config.instance_group[:]
    config.instance_group.add(count=1, kind=ModelInstanceGroup.KIND_GPU)
    with caplog.at_level(logging.WARNING):
        assert sessions.choose_providers([], config) == ["CPUExecutionProvider"]
    assert "falling back to CPU" in caplog.text


def test_operator_providers_keep_their_order_with_the_cpu_last(toy_repository, caplog):
    config = repository.read_config(toy_repository / "toy")
    with caplog.at_level(logging.WARNING):
        chosen = sessions.choose_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"], config)
    assert chosen == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


@pytest.mark.parametrize("count", [1, 2])
def test_instance_group_count_sessions_all_answer_alike(toy_repository, count):
    model_dir = toy_repository / "toy"
    config = repository.read_config(model_dir)
    config.instance_group[0].count = count
    config.parameters["intra_op_thread_count"].string_value = "1"
    pool = sessions.SessionPool(
        repository.model_path(model_dir, 1),
        config,
        providers=["CPUExecutionProvider"],
        intra_op_threads=0,
        inter_op_threads=0,
        graph_optimization="all",
    )
    assert pool.count == count and pool.providers == ["CPUExecutionProvider"]
    pool.warm_up({"image": np.zeros((1, 1, 16, 16), np.uint8)})
    images = toy_model.images(6)
    answers = [pool.sessions[i].run(["probabilities"], {"image": images})[0] for i in range(count)]
    via_pool = pool.run({"image": images}, ["probabilities", "logits"])
    assert sorted(via_pool) == ["logits", "probabilities"]
    for answer in answers:
        np.testing.assert_allclose(answer, via_pool["probabilities"], rtol=1e-5, atol=1e-6)


def test_cuda_comes_first_where_a_gpu_is_visible(toy_repository, monkeypatch):
    """As with the CUDA build on a GPU machine (this one has the CPU build and no GPU: both are stood in for)."""
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: gpu_build)
    monkeypatch.setattr(sessions, "gpu_visible", lambda: True)
    config = repository.read_config(toy_repository / "toy")
    assert sessions.choose_providers([], config) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    expected = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert sessions.choose_providers([], config) == expected


def test_a_cuda_session_without_a_usable_gpu_falls_back_to_the_cpu_and_says_so(toy_repository, caplog):
    if sessions.gpu_visible():
        pytest.skip("a GPU is visible here: CUDA would be used, not fallen back from")
    model_dir = toy_repository / "toy"
    config = repository.read_config(model_dir)
    with caplog.at_level(logging.WARNING):
        pool = sessions.SessionPool(
            repository.model_path(model_dir, 1),
            config,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            intra_op_threads=1,
            inter_op_threads=0,
            graph_optimization="all",
        )
    assert pool.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider could not be used" in caplog.text
    assert pool.run({"image": np.zeros((1, 1, 16, 16), np.uint8)}, ["logits"])["logits"].shape == (1, 3)


def test_threads_default_to_the_usable_cpus_shared_out_and_oversubscription_is_logged(
    toy_repository, monkeypatch, caplog
):
    model_dir = toy_repository / "toy"
    config = repository.read_config(model_dir)
    del config.parameters["intra_op_thread_count"]
    config.instance_group[0].count = 2
    monkeypatch.setattr(sessions, "available_cpus", lambda: 4)

    def pool():
        return sessions.SessionPool(
            repository.model_path(model_dir, 1),
            config,
            providers=["CPUExecutionProvider"],
            intra_op_threads=0,
            inter_op_threads=0,
            graph_optimization="all",
        )

    with caplog.at_level(logging.WARNING, logger="services.inference.sessions"):
        assert pool().threads == 2, "4 usable CPUs for 2 instances: 2 threads each, not onnxruntime's every core"
        assert "oversubscribed" not in caplog.text
        config.parameters["intra_op_thread_count"].string_value = "4"
        assert pool().threads == 4
    assert "2 instance(s) x 4 intra-op thread(s) on 4 usable CPU(s): oversubscribed" in caplog.text
    assert "cxr export --cpus 4" in caplog.text

"""onnxruntime sessions for one model version: providers, threads, graph optimisation, instances, warm-up."""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cxr.cpus import available_cpus
from cxr.generated.inference.model_config_pb2 import ModelConfig, ModelInstanceGroup

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Triton's execution accelerator names -> onnxruntime providers
_ACCELERATORS = {"tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process (without asking onnxruntime, which logs errors when not)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def choose_providers(requested: list[str], config: ModelConfig) -> list[str]:
    """Providers for a model: the operator's list if given, else CUDA first where usable, CPU always last.

    A model whose instance_group asks for KIND_CPU runs on the CPU only, as in Triton.
    """
    available = ort.get_available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning("providers %s are not in this onnxruntime build (%s); using %s", missing, available, chosen)
        return chosen + [CPU] if CPU not in chosen else chosen  # the CPU stays the last resort
    kinds = {g.kind for g in config.instance_group}
    accelerators = config.optimization.execution_accelerators
    cpu_first = [
        _ACCELERATORS[a.name.lower()]
        for a in accelerators.cpu_execution_accelerator
        if _ACCELERATORS.get(a.name.lower()) in available
    ]
    if kinds and kinds <= {ModelInstanceGroup.KIND_CPU}:
        return [*cpu_first, CPU]
    if CUDA in available and gpu_visible():
        # Triton's gpu_execution_accelerator [{name: "tensorrt"}] puts TensorRT in front of CUDA.
        gpu_first = [
            _ACCELERATORS[a.name.lower()]
            for a in accelerators.gpu_execution_accelerator
            if _ACCELERATORS.get(a.name.lower()) in available
        ]
        return [*gpu_first, CUDA, CPU]
    if kinds & {ModelInstanceGroup.KIND_GPU}:
        log.warning(
            "model %s asks for KIND_GPU but no usable CUDA provider/GPU is present: falling back to CPU", config.name
        )
    return [*cpu_first, CPU]


def _graph_level(config: ModelConfig, default: str) -> ort.GraphOptimizationLevel:
    # Triton's onnxruntime backend: optimization.graph.level -1 basic, 1 extended, 0/unset the default (all).
    level = config.optimization.graph.level
    if level < 0:
        return _LEVELS["basic"]
    if level == 1:
        return _LEVELS["extended"]
    return _LEVELS[default]


def _int_parameter(config: ModelConfig, key: str, default: int) -> int:
    value = config.parameters[key].string_value if key in config.parameters else ""
    return int(value) if value.strip() else default


def instance_shape(config: ModelConfig, intra_op_threads: int = 0) -> tuple[int, int]:
    """(instances, intra-op threads per instance) a model runs with: instance_group.count sessions; threads from its
    config parameter intra_op_thread_count (as Triton's onnxruntime backend reads it), else `intra_op_threads` (the
    service's setting), else this process's CPUs shared out between the instances (onnxruntime's own default is
    every core of the node for each session, whatever the container's CPU limit)."""
    count = sum(max(g.count, 1) for g in config.instance_group) or 1
    threads = _int_parameter(config, "intra_op_thread_count", intra_op_threads) or max(1, available_cpus() // count)
    return count, threads


class SessionPool:
    """`instance_group.count` onnxruntime sessions of one model file; `run` borrows a free one.

    The batcher runs at most `count` batches at once, so a free session is always there when `run` is called.
    """

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        *,
        providers: list[str],
        intra_op_threads: int,
        inter_op_threads: int,
        graph_optimization: str,
        spin_wait: bool = False,
    ):
        count, threads = instance_shape(config, intra_op_threads)
        cpus = available_cpus()
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = _int_parameter(config, "inter_op_thread_count", inter_op_threads)
        options.graph_optimization_level = _graph_level(config, graph_optimization)
        options.log_severity_level = 3  # errors only: onnxruntime's warnings would flood the service log
        if CPU in providers[:1] and count * threads > cpus:
            log.warning(
                "model %s: %d instance(s) x %d intra-op thread(s) on %d usable CPU(s): oversubscribed, batches will "
                "slow each other down; re-export with `cxr export --cpus %d` or edit instance_group / "
                "intra_op_thread_count in its config.pbtxt",
                config.name,
                count,
                threads,
                cpus,
                cpus,
            )
        self.threads = threads
        self.sessions = [
            ort.InferenceSession(str(path), sess_options=options, providers=providers) for _ in range(count)
        ]
        self.providers = self.sessions[0].get_providers()
        if providers[0] != CPU and providers[0] not in self.providers:
            log.warning(
                "model %s: %s could not be used (see onnxruntime's message); falling back to %s",
                config.name,
                providers[0],
                self.providers,
            )
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)

    @property
    def count(self) -> int:
        return len(self.sessions)

    def inputs(self) -> list[ort.NodeArg]:
        return self.sessions[0].get_inputs()

    def outputs(self) -> list[ort.NodeArg]:
        return self.sessions[0].get_outputs()

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        session = self._free.get()
        try:
            return dict(zip(names, session.run(names, feeds)))
        finally:
            self._free.put(session)

    def warm_up(self, feeds: dict[str, np.ndarray]) -> None:
        """Run every session once, so the first real request does not pay for allocations and kernel choices."""
        names = [o.name for o in self.outputs()]
        for session in self.sessions:
            session.run(names, feeds)

"""Check a model repository against NVIDIA Triton's rules, with Triton's own ModelConfig message.

    python tests/deploy/triton_repository_check.py REPO      # prints a JSON list of problems; exit 1 if any

The config.pbtxt files are parsed with `tritonclient.grpc.model_config_pb2`, the ModelConfig that NVIDIA
publishes in the tritonclient package, not with our own proto/inference/model_config.proto: a field or value
that Triton does not know fails here even if our own text of the message has it. Runs as its own process
because tritonclient's generated `inference` package and ours register the same protobuf symbols.

The rules (Triton docs: model_repository.md, model_configuration.md, the onnxruntime backend):
- every model folder has config.pbtxt; `name`, when set, is the folder's name;
- versions are subfolders named by a positive integer without a leading zero (others are ignored by Triton,
  so we flag them); each version holds the default file name of its platform (model.onnx);
- platform onnxruntime_onnx (or backend onnxruntime);
- inputs and outputs name the graph's tensors, with the same data types, and dims equal to the graph's shape
  without the batch axis when max_batch_size > 0 (whose first axis must then be dynamic);
- label_filename exists, with one line per element of that output;
- dynamic batching needs max_batch_size > 0, and preferred batch sizes must not exceed it;
- a `specific` version policy names versions that exist; instance groups have count >= 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as triton

ONNX_TO_TRITON = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
DEFAULT_MODEL_FILENAME = {"onnxruntime_onnx": "model.onnx"}


def graph_tensors(model_file: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton data type, shape with -1 for symbolic axes) of the graph's inputs and outputs."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    tensors = {}
    for value in [*graph.input, *graph.output]:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        tensors[value.name] = (
            ONNX_TO_TRITON.get(tensor_type.elem_type, f"onnx elem_type {tensor_type.elem_type}"),
            shape,
        )
    return tensors


def check_model(model_dir: Path) -> list[str]:
    name = model_dir.name
    problems: list[str] = []
    config_file = model_dir / "config.pbtxt"
    if not config_file.is_file():
        return [f"{name}: config.pbtxt is missing"]
    config = triton.ModelConfig()
    try:
        text_format.Parse(config_file.read_text(), config)
    except text_format.ParseError as e:
        return [f"{name}: config.pbtxt is not a valid Triton ModelConfig: {e}"]

    if config.name and config.name != name:
        problems.append(f"{name}: config name {config.name!r} differs from its folder name")
    if config.platform != "onnxruntime_onnx" and config.backend != "onnxruntime":
        problems.append(f"{name}: platform {config.platform!r} / backend {config.backend!r} is not onnxruntime")

    subdirs = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    versions = sorted(int(p.name) for p in subdirs if p.name.isdigit() and not p.name.startswith("0"))
    for p in subdirs:
        if not (p.name.isdigit() and not p.name.startswith("0")):
            problems.append(
                f"{name}: folder {p.name!r} is not a version Triton serves (positive integer, no leading 0)"
            )
    if not versions:
        problems.append(f"{name}: no version folder")
    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME.get(config.platform, "model.onnx")

    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        missing = sorted(set(config.version_policy.specific.versions) - set(versions))
        if missing:
            problems.append(f"{name}: version_policy names versions {missing} that have no folder")

    batching = config.max_batch_size > 0
    if config.max_batch_size < 0:
        problems.append(f"{name}: max_batch_size {config.max_batch_size} is negative")
    if config.HasField("dynamic_batching"):
        if not batching:
            problems.append(f"{name}: dynamic_batching needs max_batch_size > 0")
        too_big = [b for b in config.dynamic_batching.preferred_batch_size if b > config.max_batch_size or b < 1]
        if too_big:
            problems.append(f"{name}: preferred_batch_size {too_big} outside 1..max_batch_size")
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"{name}: instance_group {group.name!r} has count {group.count}")
    if not config.input or not config.output:
        problems.append(f"{name}: config must declare its inputs and outputs")

    for version in versions:
        model_file = model_dir / str(version) / filename
        if not model_file.is_file():
            problems.append(f"{name}/{version}: {filename} is missing")
            continue
        tensors = graph_tensors(model_file)
        for kind, declared in (("input", config.input), ("output", config.output)):
            for tensor in declared:
                where = f"{name}/{version} {kind} {tensor.name!r}"
                if tensor.name not in tensors:
                    problems.append(f"{where}: not a tensor of the ONNX graph ({sorted(tensors)})")
                    continue
                graph_type, shape = tensors[tensor.name]
                config_type = triton.DataType.Name(tensor.data_type)
                if config_type != graph_type:
                    problems.append(f"{where}: data_type {config_type} but the graph has {graph_type}")
                if batching:
                    if not shape or shape[0] != -1:
                        problems.append(f"{where}: max_batch_size > 0 needs a dynamic first axis, graph has {shape}")
                    shape = shape[1:]
                dims = list(tensor.dims)
                if len(dims) != len(shape) or any(d != s and -1 not in (d, s) for d, s in zip(dims, shape)):
                    problems.append(f"{where}: dims {dims} do not match the graph's shape {shape}")

    for output in config.output:
        if not output.label_filename:
            continue
        labels_file = model_dir / output.label_filename
        if not labels_file.is_file():
            problems.append(f"{name}: output {output.name!r} names {output.label_filename}, which is missing")
            continue
        labels = [line for line in labels_file.read_text().splitlines() if line.strip()]
        if list(output.dims)[-1:] != [len(labels)]:
            problems.append(
                f"{name}: {output.label_filename} has {len(labels)} labels, output dims are {list(output.dims)}"
            )
    return problems


def check_repository(repository: Path) -> list[str]:
    models = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        return [f"{repository}: no model folders"]
    return [problem for model in models for problem in check_model(model)]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    found = check_repository(Path(sys.argv[1]))
    print(json.dumps(found, indent=1))
    raise SystemExit(1 if found else 0)

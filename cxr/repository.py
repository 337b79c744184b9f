"""The model repository format (NVIDIA Triton's layout): the one module that reads and writes it.

    REPO/NAME/config.pbtxt              ModelConfig in protobuf text format (Triton's message, our own .proto)
    REPO/NAME/labels.txt                one class per line, in output order
    REPO/NAME/<version>/model.onnx      versions are positive integers; the newest is the largest
    REPO/NAME/<version>/model_card.json metrics, data source, settings, and the sha256 of model.onnx

Training writes with `write_model`; the inference service reads with `read_config`, `read_labels`,
`list_versions` and `select_versions`. NVIDIA Triton serves the same folder unchanged.
This module sits on the ground floor: it imports neither torch, nor training, nor the services.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from google.protobuf import text_format

from cxr import datatypes
from cxr.cpus import available_cpus, serving_shape
from cxr.generated.inference.model_config_pb2 import ModelConfig, ModelInstanceGroup

PLATFORM = "onnxruntime_onnx"
CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
MODEL_CARD_FILENAME = "model_card.json"
MODEL_FILENAME = "model.onnx"

# Defaults written into a new config.pbtxt; operators tune them in the file (Triton's names and meanings).
DEFAULT_MAX_QUEUE_DELAY_US = 500
DEFAULT_MAX_QUEUE_SIZE = 256


class RepositoryError(ValueError):
    """The repository (or one model in it) does not have the expected layout or content."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_models(repository: str | Path) -> list[str]:
    """Names of the model folders in a repository (every non-hidden subfolder, as Triton sees it)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} is not a folder")
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_versions(model_dir: str | Path) -> list[int]:
    """The version numbers present in a model folder (positive integer subfolders), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def next_version(model_dir: str | Path) -> int:
    """One more than the newest version present (1 for a new model)."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def read_config(model_dir: str | Path) -> ModelConfig:
    """Parse NAME/config.pbtxt. An empty `name` is the folder's name, as in Triton; a different one is an error."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RepositoryError(f"{path} is missing") from None
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise RepositoryError(f"{path} is not a valid ModelConfig: {e}") from None
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise RepositoryError(f"{path} names the model {config.name!r} but its folder is {model_dir.name!r}")
    return config


def write_config(model_dir: str | Path, config: ModelConfig) -> Path:
    """Write NAME/config.pbtxt atomically (a reader never sees half a file)."""
    path = Path(model_dir) / CONFIG_FILENAME
    _write_text_atomic(path, text_format.MessageToString(config))
    return path


def read_labels(model_dir: str | Path) -> list[str]:
    """The class labels of NAME/labels.txt, in output order (empty list when there is no file)."""
    path = Path(model_dir) / LABELS_FILENAME
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_model_card(version_dir: str | Path) -> dict:
    """NAME/<version>/model_card.json as a dict (empty when absent)."""
    path = Path(version_dir) / MODEL_CARD_FILENAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def model_path(model_dir: str | Path, version: int, config: ModelConfig | None = None) -> Path:
    """The model file of one version (config's default_model_filename, else model.onnx)."""
    filename = (config.default_model_filename if config is not None else "") or MODEL_FILENAME
    return Path(model_dir) / str(version) / filename


def select_versions(config: ModelConfig, available: Iterable[int]) -> list[int]:
    """The versions the config's version policy serves, ascending (Triton's default: the newest one).

    `specific` versions that are not present are left out; the caller reports them.
    """
    available = sorted(set(available))
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    num = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(num, 1) :] if available else []


def write_model(
    repository: str | Path,
    name: str,
    onnx_path: str | Path,
    *,
    classes: list[str],
    image_size: int,
    model_card: Mapping,
    max_batch_size: int = 32,
    parameters: Mapping[str, str] | None = None,
    version: int | None = None,
    cpus: int | None = None,
) -> Path:
    """Add `onnx_path` to the repository as a new version of model `name`; returns the version folder.

    The version folder (model.onnx + model_card.json with "sha256" added) appears atomically. labels.txt is
    written from `classes` (an existing one must agree: classes are shared by all versions). config.pbtxt is
    written only when absent, so an operator's edits survive new versions; its inputs and outputs are read
    from the ONNX graph itself. `parameters` go into config parameters (use "cxr." keys, e.g.
    "cxr.architecture"); "cxr.classes" and "cxr.image_size" are always set. `cpus`: the CPUs the new config's
    serving shape is sized for (default: this process's).
    """
    if not name or "/" in name or name.startswith("."):
        raise RepositoryError(f"invalid model name {name!r}")
    if not classes:
        raise RepositoryError("classes must not be empty")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RepositoryError(f"ONNX file {onnx_path} not found")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)

    existing_labels = read_labels(model_dir)
    if existing_labels and existing_labels != list(classes):
        raise RepositoryError(
            f"{model_dir / LABELS_FILENAME} lists {existing_labels}, but this model has classes {list(classes)}; "
            "every version of a model must share its classes (use another model name)"
        )
    version = next_version(model_dir) if version is None else int(version)
    if version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version}")
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise RepositoryError(f"{version_dir} already exists; versions are never overwritten")

    config_path = model_dir / CONFIG_FILENAME
    if not config_path.exists():
        all_parameters = {"cxr.classes": ",".join(classes), "cxr.image_size": str(int(image_size))}
        all_parameters.update(parameters or {})
        config = default_config(name, onnx_path, max_batch_size=max_batch_size, parameters=all_parameters, cpus=cpus)
        write_config(model_dir, config)

    # Build the version in a hidden folder, then rename: a server scanning the repository never sees half a version.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        shutil.copyfile(onnx_path, staging / MODEL_FILENAME)
        card = dict(model_card)
        card.update(
            {
                "name": name,
                "version": version,
                "model_file": MODEL_FILENAME,
                "sha256": sha256_file(staging / MODEL_FILENAME),
            }
        )
        (staging / MODEL_CARD_FILENAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
        os.chmod(staging, 0o755)
        os.rename(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not existing_labels:
        _write_text_atomic(model_dir / LABELS_FILENAME, "".join(f"{c}\n" for c in classes))
    return version_dir


def default_config(
    name: str,
    onnx_path: str | Path,
    *,
    max_batch_size: int = 32,
    parameters: Mapping[str, str] | None = None,
    cpus: int | None = None,
) -> ModelConfig:
    """A Triton config for an ONNX classifier: tensors as the graph declares them, dynamic batching, and the CPU
    serving shape for `cpus` CPUs (default: the CPUs this process may use), as instance_group.count and
    onnxruntime's intra_op_thread_count (both read by Triton's onnxruntime backend too).

    Outputs whose last dimension is the class count get `label_filename: "labels.txt"` (classification extension).
    """
    import onnxruntime  # light enough, and only needed when writing a new config

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    config = ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    config.version_policy.latest.num_versions = 1
    num_classes = None
    if parameters and parameters.get("cxr.classes"):
        num_classes = len(parameters["cxr.classes"].split(","))
    for meta in session.get_inputs():
        config.input.add(
            name=meta.name, data_type=_datatype(meta.type), dims=_dims(meta.shape, max_batch_size, meta.name)
        )
    for meta in session.get_outputs():
        dims = _dims(meta.shape, max_batch_size, meta.name)
        out = config.output.add(name=meta.name, data_type=_datatype(meta.type), dims=dims)
        if len(dims) == 1 and num_classes is not None and dims[0] == num_classes:
            out.label_filename = LABELS_FILENAME
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = DEFAULT_MAX_QUEUE_DELAY_US
    batching.default_queue_policy.max_queue_size = DEFAULT_MAX_QUEUE_SIZE
    # KIND_AUTO: the GPU where there is one (CUDA provider), else the CPU; Triton reads it the same way.
    instances, threads = serving_shape(cpus or available_cpus())
    config.instance_group.add(count=instances, kind=ModelInstanceGroup.KIND_AUTO)
    config.parameters["intra_op_thread_count"].string_value = str(threads)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    return config


def _datatype(ort_type: str) -> int:
    try:
        return datatypes.by_onnx(ort_type).config
    except datatypes.TensorError as e:
        raise RepositoryError(str(e)) from None


def _dims(shape: list, max_batch_size: int, tensor: str) -> list[int]:
    try:
        return datatypes.config_dims(shape, max_batch_size, tensor)
    except datatypes.TensorError as e:
        raise RepositoryError(str(e)) from None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

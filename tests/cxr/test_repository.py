"""cxr.repository: the one reader and writer of the Triton model repository layout, on two toy classifiers
(tests/toy_model.py: the shape of what our training exports, no torch). Training's own export into it is tested in
tests/training/test_train_export.py."""

from __future__ import annotations

import hashlib
import json

import pytest

from cxr import repository
from cxr.cpus import available_cpus, serving_shape
from cxr.generated.inference.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup
from tests import toy_model

CLASSES = toy_model.CLASSES


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {
        name: toy_model.build(folder / f"{name}.onnx", seed=seed)
        for name, seed in (("custom_cnn", 0), ("mobilenet", 1))
    }


def test_write_model_adds_versions_with_config_labels_and_card(onnx_files, tmp_path):
    repo = tmp_path / "repo"
    card = {"architecture": "custom_cnn", "metrics": {"accuracy": 0.5}, "data_source": "cxr-raw"}
    v1 = repository.write_model(
        repo,
        "cnn",
        onnx_files["custom_cnn"],
        classes=CLASSES,
        image_size=16,
        model_card=card,
        parameters={"cxr.architecture": "custom_cnn"},
    )
    v2 = repository.write_model(repo, "cnn", onnx_files["mobilenet"], classes=CLASSES, image_size=16, model_card=card)
    assert (v1, v2) == (repo / "cnn" / "1", repo / "cnn" / "2")
    assert repository.list_versions(repo / "cnn") == [1, 2] and repository.next_version(repo / "cnn") == 3
    assert repository.list_models(repo) == ["cnn"]
    assert not [p for p in (repo / "cnn").iterdir() if p.name.startswith(".")], "no staging folder left behind"

    written = json.loads((v2 / "model_card.json").read_text())
    assert written["sha256"] == hashlib.sha256((v2 / "model.onnx").read_bytes()).hexdigest()
    assert written["sha256"] == repository.sha256_file(onnx_files["mobilenet"])
    assert (written["version"], written["metrics"], written["data_source"]) == (2, {"accuracy": 0.5}, "cxr-raw")
    assert repository.read_model_card(v2) == written
    assert repository.read_labels(repo / "cnn") == CLASSES

    config = repository.read_config(repo / "cnn")
    assert (config.name, config.platform, config.max_batch_size) == ("cnn", "onnxruntime_onnx", 32)
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", DataType.TYPE_UINT8, [1, 16, 16])
    outputs = {o.name: (o.data_type, list(o.dims), o.label_filename) for o in config.output}
    assert outputs == {
        "probabilities": (DataType.TYPE_FP32, [3], "labels.txt"),
        "logits": (DataType.TYPE_FP32, [3], "labels.txt"),
        "cam": (DataType.TYPE_FP32, [3, 2, 2], ""),
    }  # the toy model has no input gate
    assert config.HasField("dynamic_batching") and config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert config.parameters["cxr.classes"].string_value == ",".join(CLASSES)
    assert config.parameters["cxr.image_size"].string_value == "16"
    assert config.parameters["cxr.architecture"].string_value == "custom_cnn"


def test_an_operators_config_edits_survive_new_versions(onnx_files, tmp_path):
    repo = tmp_path / "repo"
    repository.write_model(repo, "m", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card={})
    config = repository.read_config(repo / "m")
    config.dynamic_batching.max_queue_delay_microseconds = 1234
    config.version_policy.all.SetInParent()
    repository.write_config(repo / "m", config)
    repository.write_model(repo, "m", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card={})
    again = repository.read_config(repo / "m")
    assert again.dynamic_batching.max_queue_delay_microseconds == 1234 and again.version_policy.HasField("all")


def test_write_model_refuses_what_would_corrupt_the_repository(onnx_files, tmp_path):
    repo = tmp_path / "repo"
    repository.write_model(repo, "m", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card={})
    with pytest.raises(repository.RepositoryError, match="already exists"):
        repository.write_model(
            repo, "m", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card={}, version=1
        )
    with pytest.raises(repository.RepositoryError, match="share its classes"):
        repository.write_model(
            repo, "m", onnx_files["custom_cnn"], classes=["a", "b", "c"], image_size=16, model_card={}
        )
    with pytest.raises(repository.RepositoryError, match="not found"):
        repository.write_model(repo, "m", tmp_path / "missing.onnx", classes=CLASSES, image_size=16, model_card={})
    with pytest.raises(repository.RepositoryError, match="invalid model name"):
        repository.write_model(
            repo, "../escape", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card={}
        )
    assert repository.list_versions(repo / "m") == [1]


def test_read_config_reports_what_is_wrong(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(repository.RepositoryError, match="config.pbtxt is missing"):
        repository.read_config(model)
    (model / "config.pbtxt").write_text("max_batch_size: 8\n")
    assert repository.read_config(model).name == "m", "an empty name is the folder's name, as in Triton"
    (model / "config.pbtxt").write_text('name: "other"\n')
    with pytest.raises(repository.RepositoryError, match="folder is 'm'"):
        repository.read_config(model)
    (model / "config.pbtxt").write_text("max_batch_size: lots\n")
    with pytest.raises(repository.RepositoryError, match="not a valid ModelConfig"):
        repository.read_config(model)


def test_version_listing_and_policies(tmp_path):
    model = tmp_path / "m"
    for name in ("1", "3", "10", "0", "latest", ".staging-4-x"):
        (model / name).mkdir(parents=True)
    assert repository.list_versions(model) == [1, 3, 10]
    config = ModelConfig()
    assert repository.select_versions(config, [1, 3, 10]) == [10], "Triton's default: the newest version"
    config.version_policy.latest.num_versions = 2
    assert repository.select_versions(config, [1, 3, 10]) == [3, 10]
    config.version_policy.all.SetInParent()
    assert repository.select_versions(config, [1, 3, 10]) == [1, 3, 10]
    config.version_policy.specific.versions.extend([1, 7])
    assert repository.select_versions(config, [1, 3, 10]) == [1]
    assert repository.select_versions(ModelConfig(), []) == []


def test_a_graph_without_a_dynamic_batch_axis_is_refused_when_batching(tmp_path):
    import onnx

    path = toy_model.build(tmp_path / "toy.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch of one
    onnx.save(model, str(path))
    with pytest.raises(repository.RepositoryError, match="dynamic first"):
        repository.write_model(tmp_path / "repo", "fixed", path, classes=CLASSES, image_size=16, model_card={})
    config = repository.default_config("fixed", path, max_batch_size=0)
    assert list(config.input[0].dims) == [1, 1, 16, 16], "without batching the dims are the whole shape"


def test_a_new_config_carries_the_shape_for_the_cpus_asked(onnx_files, tmp_path):
    card = {"architecture": "custom_cnn"}
    repository.write_model(
        tmp_path, "cnn", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card=card, cpus=4
    )
    config = repository.read_config(tmp_path / "cnn")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, ModelInstanceGroup.KIND_AUTO)]
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    repository.write_model(tmp_path, "here", onnx_files["custom_cnn"], classes=CLASSES, image_size=16, model_card=card)
    instances, threads = serving_shape(available_cpus())
    config = repository.read_config(tmp_path / "here")
    assert config.instance_group[0].count == instances
    assert config.parameters["intra_op_thread_count"].string_value == str(threads)

"""The model repository that `cxr export` writes is one NVIDIA Triton accepts: layout, version folders, labels, and
a config.pbtxt that parses with Triton's own ModelConfig (tritonclient's model_config_pb2) and agrees with the
ONNX graph. The checks live in triton_repository_check.py, run as a subprocess (see its docstring for why).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECKER = Path(__file__).with_name("triton_repository_check.py")


def triton_problems(repository: Path) -> list[str]:
    done = subprocess.run([sys.executable, str(CHECKER), str(repository)], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    problems = json.loads(done.stdout)
    assert (done.returncode == 1) == bool(problems)
    return problems


@pytest.fixture
def repository(trained_repository: Path, tmp_path: Path) -> Path:
    """A private copy that a test may break."""
    return Path(shutil.copytree(trained_repository, tmp_path / "model_repository"))


def models(repository: Path) -> list[Path]:
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_exported_repository_follows_tritons_rules(trained_repository: Path):
    assert models(trained_repository), "the exported repository holds no model"
    assert triton_problems(trained_repository) == []


def test_config_uses_the_contracted_tensors(trained_repository: Path):
    """docs/contracts.md: uint8 [1,H,W] `image` in; probabilities (with labels), logits and cam out."""
    for model in models(trained_repository):
        config = (model / "config.pbtxt").read_text()
        assert re.search(r'platform: "onnxruntime_onnx"', config)
        size = re.search(r'key: "cxr.image_size"\s*value \{\s*string_value: "(\d+)"', config)
        assert size, f"{model.name}: no cxr.image_size parameter"
        h = int(size.group(1))
        assert re.search(
            rf'input \{{\s*name: "image"\s*data_type: TYPE_UINT8\s*dims: 1\s*dims: {h}\s*dims: {h}\s*\}}', config
        )
        labels = [line for line in (model / "labels.txt").read_text().splitlines() if line]
        assert re.search(
            rf'output \{{\s*name: "probabilities"\s*data_type: TYPE_FP32\s*dims: {len(labels)}\s*'
            r'label_filename: "labels.txt"',
            config,
        )
        assert re.search(
            rf'output \{{\s*name: "cam"\s*data_type: TYPE_FP32\s*dims: {len(labels)}\s*dims: {h // 32}\s*dims: {h // 32}',
            config,
        )
        for version in (p for p in model.iterdir() if p.is_dir() and p.name.isdigit()):
            card = json.loads((version / "model_card.json").read_text())
            assert re.fullmatch(r"[0-9a-f]{64}", card["sha256"])


def first_model(repository: Path) -> Path:
    return models(repository)[0]


def edit_config(model: Path, old: str, new: str) -> None:
    path = model / "config.pbtxt"
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "breakage,expected",
    [
        (
            lambda m: edit_config(m, "max_batch_size:", 'cxr_classes: "a,b"\nmax_batch_size:'),
            "not a valid Triton ModelConfig",
        ),
        (lambda m: edit_config(m, 'platform: "onnxruntime_onnx"', 'platform: "onnxruntime"'), "is not onnxruntime"),
        (lambda m: edit_config(m, "TYPE_UINT8", "TYPE_FP32"), "data_type TYPE_FP32 but the graph has TYPE_UINT8"),
        (lambda m: edit_config(m, "TYPE_UINT8", "TYPE_UINT7"), "not a valid Triton ModelConfig"),
        (lambda m: edit_config(m, "dims: 1\n", "dims: 3\n"), "do not match the graph's shape"),
        (lambda m: (m / "labels.txt").write_text("Normal\n"), "labels, output dims are"),
        (lambda m: next(p for p in m.iterdir() if p.name.isdigit()).rename(m / "v1"), "is not a version Triton serves"),
        (lambda m: next(m.glob("[0-9]*/model.onnx")).rename(m / "model.onnx"), "model.onnx is missing"),
        (lambda m: (m / "config.pbtxt").unlink(), "config.pbtxt is missing"),
    ],
)
def test_checker_rejects_what_triton_rejects(repository: Path, breakage, expected):
    """Each rule can fail: a broken copy of the exported repository is reported, with the reason."""
    model = first_model(repository)
    breakage(model)
    problems = triton_problems(repository)
    assert any(expected in p for p in problems), problems

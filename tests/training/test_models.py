"""The networks: uint8 in, normalisation inside, logits and an exact class activation map out."""

from __future__ import annotations

import pytest
import torch

from training.models import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, build_model, set_trainable_top


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uint8_in_logits_and_cam_out(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3).eval()
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
        logits2, cam = model.forward_with_cam(x)
        as_float = model(x.float())  # augmentation hands float [0,255]: same path
    assert logits.shape == (2, 3) and cam.shape == (2, 3, 2, 2)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-5)  # the CAM is the head, unpooled
    torch.testing.assert_close(as_float, logits)


def test_normalisation_is_rescale_replicate_imagenet():
    model = build_model("custom_cnn", 3)
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    out = model.normalize(x)
    expected = torch.stack([(torch.tensor([0.0, 1.0]) - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(
        1, 3, 1, 2
    )
    torch.testing.assert_close(out, expected)


def test_mobilenet_batchnorm_momentum_is_pytorch_default():
    model = build_model("mobilenet", 3)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_fine_tune_layers_freezes_all_but_the_top_blocks():
    model = build_model("resnet50", 3)
    set_trainable_top(model, 2)
    blocks = list(model.backbone.children())
    trainable = [any(p.requires_grad for p in b.parameters()) for b in blocks if list(b.parameters())]
    assert trainable[-2:] == [True, True] and not any(trainable[:-2])
    assert all(p.requires_grad for p in model.classifier.parameters())
    set_trainable_top(model, None)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_architecture_and_missing_weights_are_clear():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("vgg", 3)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("custom_cnn", 3, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model("resnet50", 3, weights="/nonexistent/weights.pt")

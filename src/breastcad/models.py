"""Model registry: name -> constructor, default input size, Grad-CAM layer.

``create_model(name, num_classes, in_chans, **options)`` builds any registered
model; ``list_models()`` lists them (a test walks it). Adding a model is one
``register(ModelSpec(...))`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from breastcad.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(num_classes=, in_chans=, **options)
    input_size: int
    gradcam_layer: str  # dotted attribute path of the layer Grad-CAM looks at
    description: str


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


def create_model(name: str, num_classes: int, in_chans: int = 1, **options: Any) -> nn.Module:
    return get_spec(name).build(num_classes=num_classes, in_chans=in_chans, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        gradcam_layer="features",
        description="the study's basic CNN (5 blocks by default, 3 in the study), from scratch",
    )
)

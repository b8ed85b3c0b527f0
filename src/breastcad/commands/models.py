"""``breastcad models``: the registered architectures, with their defaults."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    sub.add_parser(
        "models",
        help="list the registered models",
        description="Registered models with their default input size, batch size, "
        "Grad-CAM layer and whether ImageNet weights exist for them.",
    )


def run(args: argparse.Namespace) -> int:
    from breastcad.models import get_spec, list_models

    print(f"{'model':<16}{'input':>6}{'batch':>7}  {'imagenet':<9}{'grad-cam layer':<16}about")
    for name in list_models():
        s = get_spec(name)
        print(
            f"{name:<16}{s.input_size:>6}{s.batch_size:>7}  {'yes' if s.weights else 'no':<9}"
            f"{s.gradcam_layer:<16}{s.description}"
        )
    return 0

"""Fold checkpoints that describe themselves: safetensors weights + card.json.

Weights are stored as safetensors (no pickled code runs on load); everything
needed to use them (architecture, options, input size, preprocessing, class
names, temperature) is in the card, plain JSON.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from breastcad.errors import BreastcadError
from breastcad.io import atomic_write_bytes, atomic_write_json, read_json
from breastcad.models import create_model

WEIGHTS = "model.safetensors"
CARD = "card.json"


def save_fold_model(folder: Path, model: nn.Module, card: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, st_save(state))
    atomic_write_json(folder / CARD, card)


def load_fold_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    card = read_json(folder / CARD)
    model = create_model(
        card["architecture"], card["num_classes"], card["in_chans"], **card["model_options"]
    )
    try:
        state = st_load((folder / WEIGHTS).read_bytes())
    except FileNotFoundError:
        raise BreastcadError(f"{folder / WEIGHTS}: no such file") from None
    except Exception as err:  # safetensors raises its own error types
        raise BreastcadError(f"{folder / WEIGHTS}: not a valid safetensors file ({err})") from None
    model.load_state_dict(state)
    model.eval()
    return model, card


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Optimizer, RNG and loop state; tensors and plain containers only (loads weights_only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_resume_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise BreastcadError(f"{path}: cannot read resume state ({err})") from None

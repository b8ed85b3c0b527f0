"""Pretrained weights: found on local disk only, checked, adapted to gray input.

``pretrained`` (a model option) is one of:

* ``None``: train from scratch;
* ``"imagenet"``: torchvision's DEFAULT ImageNet weights for the architecture, read
  from the local torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>`` (the
  file name torchvision itself uses, e.g. ``resnet50-11ad3fa6.pth``; ``TORCH_HOME``
  moves it). Nothing is ever downloaded: when the file is missing the error says
  which file to put where and the URL it comes from;
* the path of a weights file: a plain state dict saved with
  ``torch.save(model.state_dict(), path)`` (read with ``weights_only=True``, so
  a file holding other pickled objects is refused), or a ``.safetensors`` file.

The file's classifier head is dropped (the model has a new ``num_classes`` head)
and its first convolution is adapted to ``in_chans`` channels by
:func:`adapt_first_conv`; every other key must match the architecture.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from breastcad.errors import BreastcadError, ConfigError, printable
from breastcad.models import StateDict, get_spec

IMAGENET = "imagenet"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_SHOWN_KEYS = 3  # keys named in a mismatch error


def imagenet_weights_location(name: str) -> tuple[Path, str]:
    """Where ``"imagenet"`` weights for model ``name`` are looked for, and their URL.

    Uses torchvision's weight registry (no network): the DEFAULT weights' URL and,
    as the file name, its last component, under ``torch.hub.get_dir()/checkpoints``
    like ``torch.hub.load_state_dict_from_url`` would store it.
    """
    spec = get_spec(name)
    if spec.weights is None:
        raise BreastcadError(
            f"model {name} has no ImageNet weights; use pretrained: null "
            "or the path of a weights file"
        )
    import torchvision

    url = torchvision.models.get_model_weights(spec.weights).DEFAULT.url
    filename = url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, url


def resolve_pretrained(name: str, spec: str | os.PathLike[str] | None) -> Path | None:
    """The weights file that ``spec`` means for model ``name``, or None (from scratch).

    Raises BreastcadError (one line) when the file is absent; never downloads.
    """
    if spec is None:
        return None
    if not isinstance(spec, str | os.PathLike):
        raise ConfigError(
            f"pretrained must be null, {IMAGENET!r} or a file path, not {type(spec).__name__}"
        )
    if isinstance(spec, str) and spec.strip().lower() == IMAGENET:
        path, url = imagenet_weights_location(name)
        if not path.is_file():
            raise BreastcadError(
                f"{name}: ImageNet weights not found: place {path.name} at "
                f"{printable(str(path))} (download it from {url}; breastcad never downloads)"
            )
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise BreastcadError(f"{printable(str(path))}: pretrained weights file not found")
    if not path.is_file():
        raise BreastcadError(f"{printable(str(path))}: pretrained weights path is not a file")
    return path


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """A plain state dict (parameter name -> tensor) from ``path``, on the CPU.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(..., weights_only=True)``. A dict wrapping the state dict under
    ``state_dict``/``model_state_dict``/``model`` is unwrapped and a DataParallel
    ``module.`` prefix removed. Anything else is refused with a one-line error.
    """
    path = Path(path)
    where = printable(str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BreastcadError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise BreastcadError(f"{where}: is a directory, not a weights file") from None
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise BreastcadError(
                f"{where}: refused: not a plain state dict (it holds a pickled "
                f"{printable(found.group(1))}, not only tensors); save model.state_dict() instead"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = printable(detail.group(1).strip()) if detail else _first_line(err)
        raise BreastcadError(f"{where}: not a readable PyTorch weights file ({reason})") from None
    except Exception as err:  # torch.load and safetensors raise many error types
        raise BreastcadError(
            f"{where}: not a readable PyTorch weights file ({_first_line(err)})"
        ) from None
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        found = f"an empty {type(obj).__name__}" if not obj else f"a {type(obj).__name__}"
        if isinstance(obj, dict) and obj:
            found += " holding values other than tensors"
        raise BreastcadError(
            f"{where}: not a state dict (expected parameter names mapped to tensors, found {found})"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _is_state_dict(obj: dict[object, object]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return printable(text[0]) if text else type(err).__name__


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weights ``(out, c, kh, kw)`` adapted to ``in_chans`` input channels.

    The filters are *summed* over the input channels. A gray image ``x`` given to
    the RGB network as ``(x, x, x)`` produces ``sum_c W_c * x``, so for
    ``in_chans == 1`` the summed filter is exactly the pretrained network looking
    at the gray image replicated into three channels: activations keep the scale
    the later layers (and their batch-norm statistics) were trained on, provided
    the gray image is normalised like one ImageNet channel (mean about 0.45, std
    about 0.23). Averaging instead would shrink them about threefold. For other
    channel counts every new channel gets ``sum_c W_c / in_chans``, which keeps
    the same property for an input replicated into ``in_chans`` channels.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    dtype = weight.dtype
    total = weight.float().sum(dim=1, keepdim=True)
    out = total if in_chans == 1 else (total / in_chans).repeat(1, in_chans, 1, 1)
    return out.to(dtype)


def _under(key: str, prefix: str) -> bool:
    return bool(prefix) and (key == prefix or key.startswith(prefix + "."))


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return f"{shown}, ... {more} more" if more > 0 else shown


def load_pretrained(model: nn.Module, name: str, state: StateDict, source: str = "") -> None:
    """Copy ``state`` (e.g. ImageNet weights) into ``model``, built by ``create_model(name, ...)``.

    The file's head (keys under the spec's ``classifier``) is dropped and the
    model's new head keeps its random init; the first conv is adapted from the
    file's channels to the model's (:func:`adapt_first_conv`). Missing
    ``num_batches_tracked`` buffers (old checkpoints) are tolerated; any other
    missing or unexpected key, or a shape mismatch, is a one-line BreastcadError.
    """
    spec = get_spec(name)
    where = printable(source) if source else "pretrained weights"
    if spec.remap_keys is not None:
        state = spec.remap_keys(state)
    target = model.state_dict()
    file_keys = {k for k in state if not _under(k, spec.classifier)}
    model_keys = {k for k in target if not _under(k, spec.classifier)}
    missing = sorted(k for k in model_keys - file_keys if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(file_keys - model_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_some(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_some(unexpected)})")
        raise BreastcadError(f"{where}: weights do not match model {name}: {'; '.join(parts)}")
    conv_key = f"{spec.first_conv}.weight" if spec.first_conv else ""
    new_state = dict(target)
    mismatched: list[str] = []
    for key in sorted(file_keys):
        value = state[key]
        want = target[key].shape
        if key == conv_key and value.ndim == 4 and value.shape[1] != want[1]:
            value = adapt_first_conv(value, want[1])
        if value.shape != want:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
            continue
        new_state[key] = value
    if mismatched:
        raise BreastcadError(
            f"{where}: weights do not fit model {name}: {len(mismatched)} shape mismatches "
            f"(file vs model: {_some(mismatched)})"
        )
    model.load_state_dict(new_state)

"""Grad-CAM heatmaps (Captum's ``LayerGradCam``) on each model's declared target layer.

``compute_gradcam`` explains one model, ``ensemble_gradcam`` a run's fold ensemble
(the deployable model, see docs/run-folder.md), ``overlay_rgb`` draws a heatmap over
an image. Heatmaps are computed in float32 (no bf16 autocast: gradients of a few
coarse cells are easily rounded away), on the model's own device, with the model
input prepared exactly as :func:`breastcad.engine.predict_logits` prepares it.

Resolution: Grad-CAM sees the target layer's grid, which differs between models
(basic_cnn at 128 px: 8 x 8 cells of 16 px; ResNet-50 at 224 px: 7 x 7 cells of
32 px; AlexNet at 224 px: 13 x 13). The grid is upsampled bilinearly to the model
input; :func:`gradcam_grid` tells which grid a model has, and every number computed
from heatmaps should say it (docs/explain.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from breastcad.data.augment import standardize, to_float
from breastcad.models import disable_inplace_relu, get_layer, get_spec

if TYPE_CHECKING:
    from breastcad.predict import Ensemble

#: Images per forward/backward pass (bounds memory for the large models).
BATCH = 16

__all__ = [
    "compute_gradcam",
    "ensemble_gradcam",
    "gradcam_grid",
    "normalise_heat",
    "overlay_rgb",
    "positive_index",
    "resize_heat",
]


def _model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S) -> the float network input, as ``engine.predict_logits`` builds it."""
    return standardize(to_float(images))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"images must be a uint8 tensor (N, S, S), got {images.dtype} {tuple(images.shape)}"
        )
    return images


def normalise_heat(heat: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum; a map with no positive value stays all zero."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.maximum(heat, 0.0)
    peak = heat.reshape(heat.shape[0], -1).max(axis=1) if heat.size else np.zeros(0)
    scale = np.where(peak > 1e-12, peak, 1.0).astype(np.float32)
    out = heat / scale.reshape(-1, *([1] * (heat.ndim - 1)))
    out[peak <= 1e-12] = 0.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def compute_gradcam(
    model: nn.Module,
    architecture: str,
    images: torch.Tensor,
    target: int | Sequence[int],
    tta: bool = False,
) -> np.ndarray:
    """Grad-CAM of class ``target`` for uint8 images (N, S, S): float32 (N, S, S) in [0, 1].

    The layer is the registered model's ``gradcam_layer``; in-place activations are
    switched off first (:func:`breastcad.models.disable_inplace_relu`; outputs are
    unchanged). Attributions are ReLU'd (evidence *for* the class), upsampled
    bilinearly from the layer's grid to S x S and divided by each map's maximum; a
    map without any positive evidence is all zero. ``target`` is one class index or
    one per image. With ``tta`` the map is the mean of the image's and its mirror
    image's (mirrored back), as the logits are averaged at prediction time.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    images = _check_images(images)
    n, size = images.shape[0], images.shape[-1]
    if n == 0:
        return np.zeros((0, images.shape[1], size), dtype=np.float32)
    targets = (
        [int(target)] * n if isinstance(target, int | np.integer) else [int(t) for t in target]
    )
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} images")
    layer = get_layer(model, get_spec(architecture).gradcam_layer)
    disable_inplace_relu(model)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    cam = LayerGradCam(model, layer)
    out = np.zeros((n, images.shape[1], size), dtype=np.float32)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for b in range(0, n, BATCH):
                x = _model_input(images[b : b + BATCH]).to(device)
                t = targets[b : b + BATCH]
                views = [(x, False), (torch.flip(x, dims=[3]), True)] if tta else [(x, False)]
                acc = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3])
                for view, mirrored in views:
                    attr = cam.attribute(
                        view.requires_grad_(True), target=t, relu_attributions=True
                    )
                    up = LayerAttribution.interpolate(
                        attr.detach().float(), tuple(x.shape[2:]), interpolate_mode="bilinear"
                    ).cpu()
                    acc += torch.flip(up, dims=[3]) if mirrored else up
                out[b : b + BATCH] = (acc[:, 0] / len(views)).numpy()
    finally:
        model.train(was_training)
    return normalise_heat(out)


def gradcam_grid(model: nn.Module, architecture: str, size: int) -> tuple[int, int]:
    """(rows, cols) of the Grad-CAM layer's output for an S x S input (the true resolution)."""
    layer = get_layer(model, get_spec(architecture).gradcam_layer)
    shape: list[tuple[int, int]] = []

    def hook(_m: nn.Module, _i: object, output: torch.Tensor) -> None:
        shape.append((int(output.shape[-2]), int(output.shape[-1])))

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 1)
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size, device=_device_of(model)))
    finally:
        handle.remove()
        model.train(was_training)
    return shape[0]


def positive_index(card: dict) -> int:
    return list(card["class_names"]).index(card["positive_class"])


def ensemble_gradcam(
    ens: Ensemble, images: torch.Tensor, target: int | Sequence[int] | None = None
) -> np.ndarray:
    """Grad-CAM of the fold ensemble: each fold model's map (normalised), averaged, renormalised.

    ``target`` defaults to the positive class (what the run's threshold decides on).
    Each fold's card decides its test-time augmentation, as in prediction.
    """
    images = _check_images(images)
    acc = np.zeros(images.shape, dtype=np.float32)
    for model, card in zip(ens.models, ens.cards, strict=True):
        cls = positive_index(card) if target is None else target
        tta = card.get("preprocessing", {}).get("tta", "none") != "none"
        acc += compute_gradcam(model, card["architecture"], images, cls, tta=tta)
    return normalise_heat(acc / max(1, len(ens.models)))


def resize_heat(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D heatmap resized bilinearly to ``shape`` (H, W), float32, clipped to [0, 1]."""
    from PIL import Image

    h = np.asarray(heat, dtype=np.float32)
    if h.shape == tuple(shape):
        return np.clip(h, 0.0, 1.0)
    pil = Image.fromarray(np.ascontiguousarray(h), mode="F")
    pil = pil.resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


def overlay_rgb(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "turbo"
) -> np.ndarray:
    """The heatmap (any size, [0, 1]) over the image (H, W), as uint8 (H, W, 3).

    The heat is resized to the image (bilinear), coloured with ``cmap`` and blended
    with a weight that grows with the heat (``0.15 + alpha * heat``), so cold
    regions keep the image readable (calipers and text stay visible) and hot ones
    are clearly coloured.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        base = img[..., :3].astype(np.float32)
    elif img.ndim == 2:
        base = np.repeat(img[..., None], 3, axis=-1).astype(np.float32)
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got {img.shape}")
    h = resize_heat(np.squeeze(np.asarray(heat, dtype=np.float32)), base.shape[:2])
    h = np.nan_to_num(h, nan=0.0)
    color = _lut(cmap)[np.clip(np.rint(h * 255), 0, 255).astype(np.intp)]
    weight = (0.15 + alpha * h)[..., None]
    out = base * (1 - weight) + color * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

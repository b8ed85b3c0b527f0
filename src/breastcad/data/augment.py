"""Augmentation on whole batches as tensor operations (CPU or GPU).

One affine warp per image (flip, rotation, shear, scale, shift) done for the
whole batch with a single ``affine_grid`` + ``grid_sample`` call, then
intensity changes (brightness, contrast, gamma) and multiplicative speckle,
the noise ultrasound images really have; optionally, site-style blur and a
lower resolution (``augment.blur``, ``augment.resolution``: off by default).
The per-sample definition is the same maths applied to a batch of one; a test
checks the two agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from breastcad.config import AugmentConfig


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) uint8 -> (B, 1, H, W) float32 in [0, 1]."""
    x = batch_u8.float().div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def standardize(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-image zero mean, unit variance: removes the scanner's overall gain and contrast."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def affine_matrices(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random (n, 2, 3) matrices in the normalised coordinates of ``affine_grid``."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180)
    shear = uniform(-cfg.shear_deg, cfg.shear_deg) * (math.pi / 180)
    scale = uniform(cfg.scale_min, cfg.scale_max)
    tx, ty = uniform(-cfg.translate, cfg.translate) * 2, uniform(-cfg.translate, cfg.translate) * 2
    flip = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # grid maps output coords to input coords: inverse scale, rotation, shear, then flip in x.
    a = torch.stack([cos, -sin + cos * tan], dim=1) / scale[:, None]
    b = torch.stack([sin, cos + sin * tan], dim=1) / scale[:, None]
    m = torch.zeros(n, 2, 3)
    m[:, 0, :2] = a * flip[:, None]
    m[:, 1, :2] = b
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment (B, 1, H, W) floats in [0, 1]; randomness comes only from ``gen`` (on the CPU)."""
    return _augment(x, None, cfg, gen)[0]


def augment_with_masks(
    x: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_batch` for segmentation: (B, 1, H, W) binary masks get the same
    geometric warp as their images (nearest at 0.5), and none of the intensity changes."""
    x, warped = _augment(x, masks.to(x.dtype), cfg, gen)
    assert warped is not None
    return x, (warped > 0.5).to(x.dtype)


def _augment(
    x: torch.Tensor, masks: torch.Tensor | None, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[0]
    theta = affine_matrices(n, cfg, gen).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zeros outside the image: like the black surround of an ultrasound frame.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # fmt: skip

    def per_image(lo: float, hi: float) -> torch.Tensor:
        r = lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)
        return r.to(x.device, x.dtype)

    gamma = torch.exp(per_image(-cfg.gamma, cfg.gamma))
    x = x.clamp(0, 1).pow(gamma)
    contrast = per_image(1 - cfg.contrast, 1 + cfg.contrast)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + per_image(-cfg.brightness, cfg.brightness)
    if cfg.speckle > 0:
        noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        x = x * (1 + per_image(0, cfg.speckle) * noise)
    # Site-style changes, drawn only when enabled (so default runs keep their random stream).
    if cfg.blur > 0:
        x = gaussian_blur(x, per_image(0, cfg.blur).flatten())
    if cfg.resolution > 1:
        x = down_up(x, per_image(1, cfg.resolution).flatten())
    return x.clamp_(0, 1), masks


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, 1, H, W) with its own Gaussian sigma (pixels): a softer probe.

    One separable depthwise convolution for the whole batch (each image a group).
    """
    n, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # sigma ~ 0: a delta, the image unchanged
    y = x.reshape(1, n, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n)
    y = F.conv2d(y, k[:, None, :, None], groups=n)
    return y.reshape(n, 1, h, w)


def down_up(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Down-sample each image by its own factor (area) and back up (bilinear): a
    lower-resolution export. A loop over the batch: sizes differ per image."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        f = float(factor[i])
        small = (max(4, round(h / f)), max(4, round(w / f)))
        y = F.interpolate(x[i : i + 1], size=small, mode="area")
        out[i : i + 1] = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    return out

"""Augmentation on whole batches as tensor operations (CPU or GPU).

One affine warp per image (flip, rotation, shear, scale, shift) done for the
whole batch with a single ``affine_grid`` + ``grid_sample`` call, then
intensity changes (brightness, contrast, gamma) and multiplicative speckle,
the noise ultrasound images really have. The per-sample definition is the
same maths applied to a batch of one; a test checks the two agree.
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
    n = x.shape[0]
    theta = affine_matrices(n, cfg, gen).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zeros outside the image: like the black surround of an ultrasound frame.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

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
    return x.clamp_(0, 1)

"""Tiny synthetic BUSI-like datasets made inside the tests (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def lesion_image(
    rng: np.random.Generator, size: int, malignant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A speckled background with a dark lesion: round for benign, spiky for malignant."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.12, 0.2) * size
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + (0.35 * np.sin(7 * angle + rng.uniform(0, 6)) if malignant else 0))
    mask = np.hypot(yy - cy, xx - cx) < radius
    img = 0.55 + 0.15 * rng.standard_normal((size, size))
    img[mask] = 0.15 + 0.05 * rng.standard_normal(int(mask.sum()))
    return np.clip(img, 0, 1), mask


def write_busi_like(
    root: Path, n_per_class: int = 12, size: int = 48, seed: int = 0, normals: int = 0
) -> Path:
    """BUSI layout: root/<class>/<class> (i).png plus <class> (i)_mask.png."""
    rng = np.random.default_rng(seed)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(1, n_per_class + 1):
            img, mask = lesion_image(rng, size, cls == "malignant")
            Image.fromarray((img * 255).astype(np.uint8)).save(root / cls / f"{cls} ({i}).png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / cls / f"{cls} ({i})_mask.png")
    if normals:
        (root / "normal").mkdir(parents=True, exist_ok=True)
        for i in range(1, normals + 1):
            img = np.clip(0.55 + 0.15 * rng.standard_normal((size, size)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(
                root / "normal" / f"normal ({i}).png"
            )
    return root

"""Synthetic full-field mammograms: a breast against one edge, a lesion, a marker outside.

Used by the mammogram tests and ``benchmarks/bench_mammo.py`` (no real data needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass
class Mammo:
    image: np.ndarray  # float32 [0, 1], (H, W)
    breast: np.ndarray  # bool
    lesion: np.ndarray  # bool
    marker: np.ndarray  # bool
    lesion_xy: tuple[float, float]  # centre (x, y), top-left origin
    lesion_r: float
    chest_right: bool


def synthetic_mammogram(
    h: int = 300,
    w: int = 200,
    *,
    seed: int = 0,
    chest_right: bool = False,
    malignant: bool = False,
    lesion: bool = True,
) -> Mammo:
    """A breast (half ellipse cut by the chest-wall edge), a bright lesion, a label marker."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # breast against the left edge; mirrored at the end for chest_right
    # women differ: size, shape (a superellipse) and density of the breast vary
    cy = h * rng.uniform(0.4, 0.6)
    a, b = w * rng.uniform(0.45, 0.8), h * rng.uniform(0.3, 0.45)
    p = rng.uniform(1.6, 2.6)
    r = (np.abs(xx / a) ** p + np.abs((yy - cy) / b) ** p) ** (1 / p)
    breast = r < 1.0
    texture = np.zeros((h, w), np.float32)
    for sigma, amp in ((1.0 + h / 300, 0.5), (h / 60, 1.0), (h / 25, 1.5)):  # parenchyma
        k = max(1, int(sigma // 2))  # smooth noise made on a coarse grid (fast for large images)
        t = ndimage.gaussian_filter(
            rng.standard_normal((-(-h // k), -(-w // k))).astype(np.float32), sigma / k
        )
        if k > 1:
            t = np.asarray(Image.fromarray(t).resize((w, h), Image.Resampling.BILINEAR))
        texture += amp * t / max(1e-6, float(np.abs(t).max()))
    img = 0.03 + 0.01 * rng.standard_normal((h, w)).astype(np.float32)
    tissue = rng.uniform(0.25, 0.35) + rng.uniform(0.2, 0.35) * (1 - r) + 0.2 * texture
    img[breast] = np.maximum(tissue, 0.12)[breast]  # fat is never as dark as air
    # lesion inside the breast, away from its edge
    lr = h * rng.uniform(0.035, 0.05)
    ang = rng.uniform(-0.6, 0.6)
    dist = rng.uniform(0.3, 0.55)
    lx, ly = a * dist * np.cos(ang), cy + b * dist * np.sin(ang)
    theta = np.arctan2(yy - ly, xx - lx)
    radius = lr * (1 + (0.4 * np.sin(7 * theta + rng.uniform(0, 6)) if malignant else 0))
    les = (np.hypot(yy - ly, xx - lx) < radius) if lesion else np.zeros((h, w), bool)
    img[les] = 0.85 + 0.03 * rng.standard_normal(int(les.sum())).astype(np.float32)
    # a label marker ("L CC"-like block with strokes) in the background, far corner
    marker = np.zeros((h, w), bool)
    y0, x0 = int(0.05 * h), int(0.72 * w)
    mh, mw = max(4, int(0.06 * h)), max(6, int(0.2 * w))
    marker[y0 : y0 + mh, x0 : x0 + mw] = True
    marker &= ~breast
    img[marker] = 1.0
    img[y0 + mh // 3 : y0 + 2 * mh // 3, x0 + mw // 4 : x0 + mw // 2] = 0.6
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    if chest_right:
        img, breast, les, marker = (
            np.ascontiguousarray(m[:, ::-1]) for m in (img, breast, les, marker)
        )
        lx = w - 1 - lx
    return Mammo(img, breast, les, marker, (float(lx), float(ly)), float(lr), chest_right)


def save_16bit_png(path: Path, img: np.ndarray, bits: int = 12) -> Path:
    """``img`` in [0, 1] stored as a 16-bit PNG using ``bits`` bits (12 like most detectors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.rint(img * (2**bits - 1)).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return path


def write_mammo_dataset(
    root: Path, n_per_class: int = 6, h: int = 300, w: int = 200, seed: int = 0
) -> Path:
    """A CSV manifest of 16-bit PNG mammograms (benign round / malignant spiky lesions),
    two views per woman (left and right breast) sharing a ``patient_id``, with lesion masks."""
    rows = ["path,label,patient_id,mask"]
    k = 0
    for cls in ("benign", "malignant"):
        for i in range(n_per_class):
            k += 1
            m = synthetic_mammogram(
                h, w, seed=seed * 1000 + k, chest_right=bool(i % 2), malignant=cls == "malignant"
            )
            name = f"{cls}_{i:02d}"
            save_16bit_png(root / "images" / f"{name}.png", m.image)
            Image.fromarray(m.lesion.astype(np.uint8) * 255).save(
                root / "images" / f"{name}_roi.png"
            )
            rows.append(f"images/{name}.png,{cls},{cls[0]}{i // 2},images/{name}_roi.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"

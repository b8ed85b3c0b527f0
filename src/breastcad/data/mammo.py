"""Whole-image mammogram preprocessing (``data.preprocess: breast-crop``).

A full-field mammogram is large (1024 to 5000 px a side), mostly background,
and carries burnt-in labels and markers (laterality letters, view, rulers)
outside the breast. The model input is built in five steps:

1. **Breast region**: on a copy whose longest side is at most
   ``SEG_MAX_SIDE`` pixels (box-filtered, so fast and denoised), threshold
   halfway between the background level (2nd percentile) and the Otsu
   threshold, keep the largest connected component, close it (a square of 3%
   of the side: dark fatty tissue at the skin line) and fill its holes. An
   image where no plausible region is found (under 1% or over 99.5% of the
   image, or constant) is used whole: the step never fails.
2. **Marker removal**: every pixel outside the region becomes background (0).
3. **Laterality normalisation**: the chest wall (the image edge the region
   touches most) is put on the left; right-facing images are mirrored.
4. **Crop** to the region's bounding box plus a 2% margin.
5. **Resize with aspect kept** (longest side = ``size``, bilinear with
   antialiasing) and **pad** with background to ``size`` x ``size``, chest
   wall against the left edge, vertically centred. Intensities are windowed
   to the breast's own 0.5th..99.9th percentiles before quantising to uint8.

numpy, PIL and scipy.ndimage only. The rule's version is ``MAMMO_VERSION``
(part of the cache key and of each fold's card).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

MAMMO_VERSION = "breast-crop-v1"
SEG_MAX_SIDE = 512
MARGIN = 0.02
MIN_AREA = 0.01
CLOSING = 0.015  # closing radius, share of the segmentation image's longest side
MAX_AREA = 0.995
WINDOW_PERCENTILES = (0.5, 99.9)


@dataclass(frozen=True)
class BreastRegion:
    """Where the breast is in a full-resolution image, and how to normalise it.

    ``mask`` is at segmentation resolution (``scale`` = its size / the image's);
    ``bbox`` is ``(x0, y0, x1, y1)`` in full-resolution pixels (floats, end
    exclusive); ``flip`` is True when the chest wall was on the right;
    ``window`` maps breast intensities to [0, 1]; ``found`` is False when the
    whole image is used because no breast region could be told apart.
    """

    mask: np.ndarray
    scale: float
    bbox: tuple[float, float, float, float]
    flip: bool
    window: tuple[float, float]
    found: bool


def _to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")


def downsample(img: np.ndarray, max_side: int = SEG_MAX_SIDE) -> tuple[np.ndarray, float]:
    """``img`` box-filtered to a longest side of at most ``max_side``, and the scale used."""
    h, w = img.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return np.asarray(img, dtype=np.float32), 1.0
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(_to_pil(img).resize((nw, nh), Image.Resampling.BOX), dtype=np.float32)
    return small, nw / w


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any float range); the midpoint when constant."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def segment_breast(small: np.ndarray) -> np.ndarray | None:
    """Boolean breast mask of a (downsampled) image, or None when none can be told apart."""
    smooth = ndimage.gaussian_filter(small, sigma=max(1.0, max(small.shape) / 400))
    background = float(np.percentile(smooth, 2))
    otsu = otsu_threshold(smooth)
    if otsu <= background:
        return None
    fg = smooth > background + 0.5 * (otsu - background)
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    # close notches where dark (fatty) tissue at the skin line fell under the threshold;
    # padded by edge replication so the chest-wall edge is not eroded
    r = max(2, round(CLOSING * max(mask.shape)))
    padded = np.pad(mask.astype(np.uint8), r + 1, mode="edge")
    closed = ndimage.minimum_filter(ndimage.maximum_filter(padded, 2 * r + 1), 2 * r + 1)
    mask = closed[r + 1 : -r - 1, r + 1 : -r - 1].astype(bool)  # (square: separable, fast)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_dilation(mask, iterations=1)
    frac = float(mask.mean())
    if not MIN_AREA <= frac <= MAX_AREA:
        return None
    return mask


def chest_wall_on_right(mask: np.ndarray) -> bool:
    """True when the region touches the right image edge more than the left one.

    The chest wall is the edge the breast is cut by; the nipple side floats in
    background. Ties (no contact on either side) go by the centre of mass.
    """
    h, w = mask.shape
    band = max(1, w // 20)
    left, right = int(mask[:, :band].sum()), int(mask[:, w - band :].sum())
    if left != right:
        return right > left
    cols = mask.sum(axis=0)
    if cols.sum() == 0:
        return False
    return float((cols * np.arange(w)).sum() / cols.sum()) > (w - 1) / 2


def find_breast(img: np.ndarray) -> BreastRegion:
    """Locate the breast in a [0, 1] float image (see the module docstring)."""
    h, w = img.shape
    small, scale = downsample(img)
    mask = segment_breast(small)
    if mask is None:
        lo, hi = (float(v) for v in np.percentile(small, WINDOW_PERCENTILES))
        full = np.ones(small.shape, dtype=bool)
        return BreastRegion(full, scale, (0.0, 0.0, float(w), float(h)), False, (lo, hi), False)
    ys, xs = np.nonzero(mask)
    sh, sw = mask.shape
    my, mx = MARGIN * sh, MARGIN * sw
    x0, x1 = max(0.0, xs.min() - mx), min(float(sw), xs.max() + 1 + mx)
    y0, y1 = max(0.0, ys.min() - my), min(float(sh), ys.max() + 1 + my)
    fx, fy = w / sw, h / sh  # exact factors from the small grid to the full one
    bbox = (float(x0 * fx), float(y0 * fy), float(x1 * fx), float(y1 * fy))
    lo, hi = (float(v) for v in np.percentile(small[mask], WINDOW_PERCENTILES))
    return BreastRegion(mask, scale, bbox, chest_wall_on_right(mask), (lo, hi), True)


def crop_resize(img: np.ndarray, region: BreastRegion, size: int) -> np.ndarray:
    """The breast crop as a float [0, 1] array, longest side ``size``, markers blanked, flipped.

    Not padded: the shape keeps the crop's aspect ratio.
    """
    h, w = img.shape
    x0, y0, x1, y1 = region.bbox
    cw, ch = x1 - x0, y1 - y0
    s = size / max(cw, ch)
    nw, nh = max(1, min(size, round(cw * s))), max(1, min(size, round(ch * s)))
    crop = _to_pil(img).resize((nw, nh), Image.Resampling.BILINEAR, box=region.bbox)
    arr = np.asarray(crop, dtype=np.float32)
    lo, hi = region.window
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    arr = np.clip(arr, 0.0, 1.0)
    if region.found:
        sh, sw = region.mask.shape
        fx, fy = sw / w, sh / h
        mbox = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
        m = _to_pil(region.mask.astype(np.float32)).resize(
            (nw, nh), Image.Resampling.BILINEAR, box=mbox
        )
        arr = arr * (np.asarray(m) >= 0.5)
    if region.flip:
        arr = arr[:, ::-1]
    return arr


def blank_outside(img: np.ndarray, region: BreastRegion) -> np.ndarray:
    """``img`` (full size) with every pixel outside the breast region set to 0."""
    if not region.found:
        return img
    h, w = img.shape
    mask = Image.fromarray(region.mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    return np.where(np.asarray(mask, dtype=bool), img, np.float32(0.0))


def pad_to_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Place ``arr`` (at most ``size`` a side) on a background square: left edge, centred rows."""
    out = np.zeros((size, size), dtype=arr.dtype)
    nh, nw = arr.shape
    top = (size - nh) // 2
    out[top : top + nh, :nw] = arr
    return out


def breast_crop(img: np.ndarray, size: int, region: BreastRegion | None = None) -> np.ndarray:
    """The ``breast-crop`` model input: ``size`` x ``size`` uint8 (see the module docstring)."""
    if region is None:
        region = find_breast(img)
    arr = pad_to_square(crop_resize(img, region, size), size)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def plot_examples(
    items: list[tuple[str, np.ndarray, np.ndarray]], out: str, title: str = ""
) -> None:
    """A figure of (name, original [0, 1] image, model input uint8) pairs, written to ``out``.

    The original is shown with the breast outline (red) and the crop box
    (yellow), as ``find_breast`` found them, beside the model input.
    """
    from breastcad.plots import _rc, _save, plt

    n = max(1, len(items))
    with _rc():
        fig, axes = plt.subplots(n, 2, figsize=(6.0, 3.0 * n), squeeze=False)
        try:
            for row, (name, img, model_in) in zip(axes, items, strict=False):
                small, _ = downsample(img, 400)
                region = find_breast(img)
                row[0].imshow(small, cmap="gray", vmin=0, vmax=1)
                if region.found:
                    mask = np.asarray(
                        _to_pil(region.mask.astype(np.float32)).resize(
                            (small.shape[1], small.shape[0]), Image.Resampling.NEAREST
                        )
                    )
                    row[0].contour(mask, levels=[0.5], colors="red", linewidths=1)
                k = small.shape[1] / img.shape[1]
                x0, y0, x1, y1 = (v * k for v in region.bbox)
                row[0].plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="yellow", lw=1)
                row[0].set_xlim(-0.5, small.shape[1] - 0.5)
                row[0].set_ylim(small.shape[0] - 0.5, -0.5)
                found = "" if region.found else " (no region: whole image)"
                side = ", mirrored" if region.flip else ""
                row[0].set_title(f"{name}{found}", fontsize=8)
                row[1].imshow(model_in, cmap="gray", vmin=0, vmax=255)
                row[1].set_title(f"model input {model_in.shape[1]} px{side}", fontsize=8)
                for ax in row:
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.grid(False)
            for row in axes[len(items) :]:
                for ax in row:
                    ax.axis("off")
            if title:
                fig.suptitle(title, fontsize=10)
        except BaseException:
            plt.close(fig)
            raise
        _save(fig, out)

"""Realistic appearance shifts: what another hospital's scanner does to an image.

Each shift is a small pure function ``fn(img, level, rng) -> img`` on a decoded
grayscale image (2-D float in [0, 1], at the image's own resolution, before any
preprocessing), with a ``level`` that sets its severity (``identity_level`` means
no change) and a seeded ``rng`` for the random ones. They simulate the other site's
image; the model's preprocessing (``prepare_for_model``, by the rule in the card)
is applied afterwards, exactly as it would be to a real image from that site.

=============  =======================================================  ==============
shift          what it simulates                                        level
=============  =======================================================  ==============
gain           overall receive gain (intensities scaled, clipped)       factor
gamma          another display/log-compression curve (``img ** g``)     exponent
blur           a softer transducer or more smoothing (Gaussian)         sigma, % of short side
speckle        more multiplicative speckle noise                        relative noise sd
resolution     a lower-resolution export (down-sampled, up again)       factor
fov            another depth / width setting (central crop, zoomed)    fraction of each side kept
calipers       measurement calipers ("+" marks) burnt into the image    number of marks
text           annotation text burnt into the image                     number of text lines
=============  =======================================================  ==============

Calipers and text are drawn with PIL in white, at sizes relative to the image, as
scanners do. Per-image standardisation (the models' input normalisation) removes a
pure linear gain; ``gain`` still changes the image where it clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from breastcad.errors import ConfigError

ShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _check(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"a shift takes a 2-D grayscale image, got shape {arr.shape}")
    return arr


def _short(img: np.ndarray) -> int:
    return int(min(img.shape))


def gain(img: np.ndarray, factor: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Intensities times ``factor``, clipped to [0, 1] (1 = unchanged)."""
    return np.clip(_check(img) * float(factor), 0.0, 1.0)


def gamma(img: np.ndarray, exponent: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``img ** exponent`` (1 = unchanged; < 1 brightens the dark range, > 1 darkens it)."""
    if exponent <= 0:
        raise ValueError(f"gamma exponent must be positive, got {exponent}")
    return np.power(np.clip(_check(img), 0.0, 1.0), float(exponent)).astype(np.float32)


def blur(img: np.ndarray, sigma_pct: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian blur, sigma = ``sigma_pct`` % of the short side (0 = unchanged)."""
    from scipy.ndimage import gaussian_filter

    arr = _check(img)
    sigma = float(sigma_pct) / 100.0 * _short(arr)
    if sigma <= 0:
        return arr.copy()
    return np.clip(gaussian_filter(arr, sigma=sigma, mode="nearest"), 0.0, 1.0).astype(np.float32)


def speckle(img: np.ndarray, sd: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Multiplicative noise ``img * (1 + sd * n)``; n slightly correlated (grain of ~1 px
    per 250 px of short side), unit variance (0 = unchanged)."""
    from scipy.ndimage import gaussian_filter

    arr = _check(img)
    if sd <= 0:
        return arr.copy()
    rng = rng if rng is not None else np.random.default_rng(0)
    noise = rng.standard_normal(arr.shape).astype(np.float32)
    grain = max(0.0, _short(arr) / 250.0 - 0.5)
    if grain > 0:
        noise = gaussian_filter(noise, grain)
        noise /= max(float(noise.std()), 1e-6)
    return np.clip(arr * (1.0 + float(sd) * noise), 0.0, 1.0).astype(np.float32)


def resolution(
    img: np.ndarray, factor: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Down-sampled by ``factor`` (box filter), then up-sampled back (bilinear); 1 = unchanged."""
    arr = _check(img)
    if factor <= 1:
        return arr.copy()
    h, w = arr.shape
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    pil = Image.fromarray(arr, mode="F").resize(small, Image.Resampling.BOX)
    out = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def fov_crop(img: np.ndarray, keep: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """The central ``keep`` fraction of each side (1 = unchanged): a narrower, shallower view.

    The result is smaller than the input; the model's preprocessing resizes it, so
    structures appear larger, as with another depth or width setting.
    """
    arr = _check(img)
    if not 0 < keep <= 1:
        raise ValueError(f"fov keep fraction must be in (0, 1], got {keep}")
    box = crop_box(arr.shape, keep)
    return arr[box[0] : box[2], box[1] : box[3]].copy()


def crop_box(shape: tuple[int, int], keep: float) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of the central ``keep`` fraction of an image."""
    h, w = shape
    ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
    top, left = (h - ch) // 2, (w - cw) // 2
    return top, left, top + ch, left + cw


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(6, px))
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _burn(arr: np.ndarray, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """Draw white marks on an overlay and burn them into the image (max of both)."""
    layer = Image.new("L", (arr.shape[1], arr.shape[0]), 0)
    draw_fn(ImageDraw.Draw(layer))
    marks = np.asarray(layer, dtype=np.float32) / 255.0
    return np.maximum(arr, marks).astype(np.float32)


def calipers(img: np.ndarray, n: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` caliper marks ("+", white, arm 2.5% of the short side) at random positions in
    the central 80% of the image, in pairs joined by a faint dotted line, as a
    measurement leaves them (0 = unchanged)."""
    arr = _check(img)
    count = int(round(n))
    if count <= 0:
        return arr.copy()
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = arr.shape
    arm = max(2, round(0.025 * min(h, w)))
    width = max(1, round(min(h, w) / 250))
    pts = [(rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h) for _ in range(count)]

    def draw(d: ImageDraw.ImageDraw) -> None:
        for x, y in pts:
            d.line([(x - arm, y), (x + arm, y)], fill=255, width=width)
            d.line([(x, y - arm), (x, y + arm)], fill=255, width=width)
        for (x0, y0), (x1, y1) in zip(pts[0::2], pts[1::2], strict=False):
            steps = max(2, int(np.hypot(x1 - x0, y1 - y0) / (3 * arm)))
            for t in np.linspace(0, 1, steps)[1:-1]:
                cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                d.ellipse([cx - width, cy - width, cx + width, cy + width], fill=160)

    return _burn(arr, draw)


ANNOTATIONS = (
    "LT BREAST 2:00 3CM FN", "RT BR 10:00 RADIAL", "L12-5 38mm", "GAIN 54 DR 60",
    "FR 22Hz 4.0cm", "ANTI-RADIAL", "MI 0.9 TIS 0.3", "LESION 1", "SUBAREOLAR",
    "DIST 1.24 cm", "D 0.87cm", "ARFI", "B-MODE", "COMPOUND ON",
)  # fmt: skip


def text(img: np.ndarray, lines: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``lines`` lines of annotation text (white, 4% of the short side high) at random places:
    half in the top or bottom band where scanners write, half anywhere (0 = unchanged)."""
    arr = _check(img)
    count = int(round(lines))
    if count <= 0:
        return arr.copy()
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = arr.shape
    px = max(6, round(0.04 * min(h, w)))
    font = _font(px)
    items = []
    for k in range(count):
        words = ANNOTATIONS[int(rng.integers(len(ANNOTATIONS)))]
        x = rng.uniform(0.02, 0.6) * w
        if k % 2 == 0:
            y = rng.choice([rng.uniform(0.01, 0.1), rng.uniform(0.85, 0.93)]) * h
        else:
            y = rng.uniform(0.05, 0.9) * h
        items.append(((x, y), words))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for xy, words in items:
            d.text(xy, words, fill=255, font=font)

    return _burn(arr, draw)


@dataclass(frozen=True)
class Shift:
    """One kind of shift, its severity levels (mildest first) and its unit."""

    name: str
    fn: ShiftFn
    levels: tuple[float, ...]
    identity_level: float
    unit: str
    what: str

    def apply(self, img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        return self.fn(img, level, rng)


BATTERY: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("gain", gain, (0.7, 1.3, 1.6), 1.0, "x", "overall gain (clipped)"),
        Shift("gamma", gamma, (0.7, 1.4, 2.0), 1.0, "exponent", "display / compression curve"),
        Shift("blur", blur, (0.5, 1.0, 2.0), 0.0, "% sigma", "Gaussian blur"),
        Shift("speckle", speckle, (0.1, 0.2, 0.35), 0.0, "sd", "multiplicative speckle"),
        Shift("resolution", resolution, (2.0, 4.0, 8.0), 1.0, "x down", "down/up-sampling"),
        Shift("fov", fov_crop, (0.9, 0.8, 0.65), 1.0, "kept", "field-of-view crop"),
        Shift("calipers", calipers, (2.0, 4.0, 8.0), 0.0, "marks", "caliper marks"),
        Shift("text", text, (1.0, 3.0, 6.0), 0.0, "lines", "burnt-in text"),
    )
}


def select(names: str | list[str] | None) -> list[Shift]:
    """Shifts by name (a comma-separated string or a list); None = the whole battery."""
    if names is None:
        return list(BATTERY.values())
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip().lower() for n in items if n.strip()]
    unknown = [n for n in items if n not in BATTERY]
    if unknown or not items:
        raise ConfigError(
            f"unknown shift(s) {', '.join(unknown) or '(none given)'}; "
            f"valid shifts: {', '.join(BATTERY)}"
        )
    return [BATTERY[n] for n in dict.fromkeys(items)]


def image_rng(
    seed: int, shift_index: int, level_index: int, sample_index: int
) -> np.random.Generator:
    """The random stream for one image under one shift level: the same on every run."""
    return np.random.default_rng([seed, shift_index, level_index, sample_index])

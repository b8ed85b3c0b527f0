"""Ultrasound scan-area crop (``data.preprocess: scan-crop``).

An exported ultrasound frame is the scan (a rectangle or a probe's sector) on a
black surround that carries the site's furniture: scanner name, depth and gain
readouts, body marks, colour bars, a text band above or below the scan. A
whole-image model can learn that furniture instead of the tissue, and it differs
from hospital to hospital. ``scan-crop`` keeps the scan and drops the surround:

1. Call foreground every pixel brighter than ``THRESHOLD``: the surround of an
   ultrasound export is black, tissue (even deep and dark, speckle) is mostly not.
2. The scan's core: from the first to the last row at least ``MIN_LINE`` foreground
   (a black band, or one crossing a line of text or a body mark, is less: glyphs are
   thin strokes with black between them). Then grow the core outwards over rows at
   least ``GROW_LINE`` foreground, so the dim deep part of a scan (the shadow under a
   mass, the chest wall) stays with it, and stop at the first nearly empty row: a
   band is dropped only when black separates it from the scan. The same for columns,
   within the rows kept. Only the edges are trimmed: a black cyst or an acoustic
   shadow inside the scan never cuts it.
3. Crop the full-resolution image to the box kept and resize it to the model input
   as ``stretch`` does.

Where no plausible scan is found (a box under ``MIN_AREA`` of the image, or a
constant image) the whole image is used: the step never fails. Limits: text, calipers
and marks drawn *inside* the scan are not removed (nothing can tell them from tissue
without a model), nor a band of text or a grey-scale bar that is more than
``MIN_LINE`` foreground; a sector scan loses the rows near its apex narrower than
``MIN_LINE`` of the width. The site-shift proxy (``breastcad robustness``) measures what
they cost. The rule's version ``SCAN_VERSION`` is part of the cache key and of each
fold's card.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCAN_VERSION = "scan-crop-v2"
THRESHOLD = 0.015  # foreground: brighter than about 4 of 255 grey levels
MIN_LINE = 0.3  # the scan's core: rows and columns at least this share foreground
GROW_LINE = 0.02  # the core grows over lines at least this share foreground
MIN_AREA = 0.2  # a smaller region is not trusted to be the scan


@dataclass(frozen=True)
class ScanArea:
    """``bbox`` = ``(x0, y0, x1, y1)`` in full-resolution pixels, end exclusive;
    ``found`` is False when the whole image is used."""

    bbox: tuple[int, int, int, int]
    found: bool


def find_scan_area(img: np.ndarray) -> ScanArea:
    """Where the scan is in a decoded [0, 1] grayscale image (see the module docstring)."""
    h, w = img.shape
    whole = ScanArea((0, 0, w, h), False)
    if h < 8 or w < 8 or float(img.max()) - float(img.min()) < 1e-6:
        return whole
    fg = img > THRESHOLD
    rows = _kept_span(fg.mean(axis=1))
    if rows is None:
        return whole
    cols = _kept_span(fg[rows[0] : rows[1]].mean(axis=0))
    if cols is None or (rows[1] - rows[0]) * (cols[1] - cols[0]) < MIN_AREA * h * w:
        return whole
    return ScanArea((cols[0], rows[0], cols[1], rows[1]), True)


def _kept_span(fraction: np.ndarray) -> tuple[int, int] | None:
    """From the first to the last line (row or column) at least ``MIN_LINE`` foreground,
    grown outwards over lines at least ``GROW_LINE`` foreground (see the module
    docstring, step 2)."""
    scan = np.flatnonzero(fraction >= MIN_LINE)
    if not scan.size:
        return None
    start, stop = int(scan[0]), int(scan[-1]) + 1
    while start > 0 and fraction[start - 1] >= GROW_LINE:
        start -= 1
    while stop < len(fraction) and fraction[stop] >= GROW_LINE:
        stop += 1
    return start, stop


def scan_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The ``scan-crop`` model input: the scan area stretched to ``size`` x ``size`` uint8."""
    from breastcad.data.cache import resize_to_uint8

    x0, y0, x1, y1 = find_scan_area(img).bbox
    return resize_to_uint8(img[y0:y1, x0:x1], size)

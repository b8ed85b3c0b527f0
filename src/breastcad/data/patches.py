"""ROI patches from whole mammograms: ``breastcad patches MANIFEST --out DIR``.

A whole mammogram shrunk to a model input loses most of a small lesion. Where
a manifest gives lesion coordinates (mask files, or mini-MIAS ``roi`` circles),
square patches are cut around each lesion at native resolution, plus random
"normal" patches from the breast away from every lesion, and written as a new
CSV manifest that ``breastcad train`` takes like any other. A model trained on
them classifies a whole image by sliding over it
(:mod:`breastcad.sliding_window`).

Rules (``PATCHES_VERSION``):

* **Lesions.** mini-MIAS ``roi`` circles (``x y r`` with the origin at the
  bottom-left, as in ``Info.txt``; ``;`` between findings) when the column is
  filled, else the union of the row's mask files: each connected component is
  a lesion, and components closer than a quarter of ``size`` are merged (a
  cluster of calcifications is one lesion, not one patch per speck).
* **Lesion patch.** A square centred on the lesion's bounding box, side
  ``max(size, extent x context)`` (extent = the box's longer side), labelled
  with the row's label. With ``jitter`` j > 0 the centre moves by up to
  j x (side - extent) / 2 along each axis (uniform), so the lesion stays whole
  inside but is not always in the middle, as in most sliding windows. At an
  image border the square is shifted inward, not padded: padding would exist
  only in lesion patches and could become the cue the model learns (normal
  patches and sliding windows lie inside the image).
  Only an image smaller than the side is padded (with background, 0).
* **Normal patches.** ``normal_per_image`` squares of side ``size`` per image,
  labelled ``normal``: centred on a random breast pixel, at least
  ``MIN_BREAST`` of their area inside the breast (``mammo.find_breast``), not
  overlapping any lesion patch nor each other. Fewer are taken when no such
  place is found in ``NORMAL_TRIES`` draws (counted).
* **Images without coordinates** give normal patches when labelled normal; a
  benign or malignant image without coordinates is skipped (counted): its
  lesion cannot be cut out, and a "normal" patch of it might contain it.
* **Intensity.** The whole image is read as training reads it (``read_image``:
  16-bit and DICOM windowed to their own range), every pixel outside the breast
  is set to background (labels and markers gone), the breast's own window
  (``BreastRegion.window``: 0.5th..99.9th percentile of the breast) maps it to
  [0, 1], and it is quantised to **8 bits**. Patches are stored as 8-bit PNG,
  so ``read_image`` gives them back unchanged (a 16-bit patch would be
  re-windowed to its own min..max, and a faint normal patch would get the
  contrast of a lesion). Sliding-window prediction applies the same steps, so a
  window and a patch at the same place are the same model input.

The patch manifest has ``path, label, patient_id`` (the split group of the
source image in an audit of the sources: its patient id, joined with those of
any exact or near-duplicate of it, else the source image itself; so all
patches of a woman, and of copies of her images, stay on one side of every
split), ``kind`` (lesion/normal), ``source`` (the original
image), ``box`` (``x0 y0 x1 y1`` in source pixels, end exclusive) and
``side``. A sidecar ``DIR/patches.json`` records the settings; ``train``
copies the patch side into every fold's card (``card_entry``), which is how
sliding-window prediction knows the scale.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from breastcad import __version__
from breastcad.data import mammo
from breastcad.data.audit import AuditReport, run_audit
from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image, read_mask
from breastcad.data.records import BadFile, Sample
from breastcad.data.sources import SourceResult, load_source
from breastcad.errors import BreastcadError, DataError, ImageReadError, printable
from breastcad.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, read_json_if_valid

PATCHES_VERSION = "roi-patches-v1"
SIDECAR_KIND = "breastcad-patches"
MANIFEST_NAME = "patches.csv"
MIN_BREAST = 0.5  # share of a normal patch (and of a sliding window) that must be breast
NORMAL_TRIES = 200  # random draws per normal patch before giving up
COLUMNS = ["path", "label", "patient_id", "kind", "source", "box", "side"]
INTENSITY = (
    "read_image (16-bit/DICOM windowed to own range), outside-breast pixels set to 0, "
    "breast window (0.5th..99.9th percentile of the breast) -> [0, 1], 8-bit"
)


# ------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """A square in image pixels: columns ``x0..x0+side``, rows ``y0..y0+side`` (end exclusive).

    It may reach outside the image only when the image is smaller than ``side``.
    """

    x0: int
    y0: int
    side: int

    @property
    def x1(self) -> int:
        return self.x0 + self.side

    @property
    def y1(self) -> int:
        return self.y0 + self.side

    def intersects(self, other: Box) -> bool:
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )

    def text(self) -> str:
        return f"{self.x0} {self.y0} {self.x1} {self.y1}"


@dataclass(frozen=True)
class Lesion:
    """A lesion's bounding-box centre (continuous coordinates: pixel i spans [i, i+1))
    and extent (the box's longer side, in pixels)."""

    cx: float
    cy: float
    extent: float


def place(cx: float, cy: float, side: int, shape: tuple[int, int]) -> Box:
    """The square of ``side`` centred on (cx, cy), shifted inward to lie inside the image.

    Along an axis shorter than ``side`` it is centred on the image instead (and
    then holds the whole axis, so whatever was to be centred is inside it).
    """
    h, w = shape

    def start(c: float, n: int) -> int:
        if side >= n:
            return (n - side) // 2
        return min(max(int(round(c - side / 2)), 0), n - side)

    return Box(start(cx, w), start(cy, h), side)


def lesion_side(lesion: Lesion, size: int, context: float) -> int:
    return max(size, math.ceil(lesion.extent * context))


def crop(arr: np.ndarray, box: Box) -> np.ndarray:
    """``arr[box]`` as a ``side`` x ``side`` array; parts outside the image are 0."""
    h, w = arr.shape
    if box.x0 >= 0 and box.y0 >= 0 and box.x1 <= w and box.y1 <= h:
        return arr[box.y0 : box.y1, box.x0 : box.x1]
    out = np.zeros((box.side, box.side), dtype=arr.dtype)
    ys, xs = max(box.y0, 0), max(box.x0, 0)
    ye, xe = min(box.y1, h), min(box.x1, w)
    if ye > ys and xe > xs:
        out[ys - box.y0 : ye - box.y0, xs - box.x0 : xe - box.x0] = arr[ys:ye, xs:xe]
    return out


def _merge_boxes(boxes: list[list[int]], gap: int) -> list[list[int]]:
    """Union of (x0, y0, x1, y1) boxes that come within ``gap`` pixels of each other."""
    boxes = [list(b) for b in boxes]
    merged = True
    while merged:
        merged = False
        out: list[list[int]] = []
        for b in boxes:
            for o in out:
                if (
                    b[0] < o[2] + gap
                    and o[0] < b[2] + gap
                    and b[1] < o[3] + gap
                    and o[1] < b[3] + gap
                ):
                    o[:] = [min(o[0], b[0]), min(o[1], b[1]), max(o[2], b[2]), max(o[3], b[3])]
                    merged = True
                    break
            else:
                out.append(b)
        boxes = out
    return boxes


def lesions_from_mask(mask: np.ndarray, gap: int) -> list[Lesion]:
    """One lesion per connected component of ``mask``, components within ``gap`` merged."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    boxes = [
        [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
        for sl in ndimage.find_objects(labels)
        if sl is not None
    ]
    return [
        Lesion((x0 + x1) / 2, (y0 + y1) / 2, float(max(x1 - x0, y1 - y0)))
        for x0, y0, x1, y1 in sorted(_merge_boxes(boxes, gap), key=lambda b: (b[1], b[0]))
    ]


def lesions_from_roi(roi: str, height: int) -> list[Lesion]:
    """mini-MIAS circles ``"x y r;x y r"``: origin bottom-left, as ``breastcad import mias``
    writes them (the mask it draws is centred on pixel column x, row ``height - 1 - y``).

    Raises ValueError on anything else.
    """
    out = []
    for part in filter(None, (p.strip() for p in roi.split(";"))):
        x, y, r = (float(v) for v in part.split())  # ValueError unless exactly three numbers
        if min(x, y) < 0 or r <= 0 or not all(map(math.isfinite, (x, y, r))):
            raise ValueError(part)
        # the drawn disc covers pixel indices x-r..x+r: centre x + 0.5, extent 2r + 1
        out.append(Lesion(x + 0.5, (height - 1 - y) + 0.5, 2 * math.floor(r) + 1.0))
    return out


# ------------------------------------------------------------------------- breast and intensity


def full_breast_mask(region: mammo.BreastRegion, shape: tuple[int, int]) -> np.ndarray:
    """The breast region at full resolution (as ``mammo.blank_outside`` scales it)."""
    h, w = shape
    if not region.found:
        return np.ones(shape, dtype=bool)
    small = Image.fromarray(region.mask.astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=bool)


class BreastFraction:
    """Share of any box that lies in the breast, in O(1) per box (summed-area table)."""

    def __init__(self, breast: np.ndarray) -> None:
        self.shape = breast.shape
        table = np.zeros((breast.shape[0] + 1, breast.shape[1] + 1), dtype=np.int64)
        np.cumsum(np.cumsum(breast, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
        self.table = table

    def __call__(self, box: Box) -> float:
        h, w = self.shape
        x0, y0 = min(max(box.x0, 0), w), min(max(box.y0, 0), h)
        x1, y1 = min(max(box.x1, 0), w), min(max(box.y1, 0), h)
        t = self.table
        inside = t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0]
        return float(inside) / (box.side * box.side)


def windowed_uint8(img: np.ndarray, region: mammo.BreastRegion, breast: np.ndarray) -> np.ndarray:
    """The image as patches store it: outside the breast 0, breast window -> 0..255."""
    lo, hi = region.window
    arr = (img - np.float32(lo)) * np.float32(1.0 / (hi - lo)) if hi > lo else np.zeros_like(img)
    arr = np.where(breast, arr, np.float32(0.0))
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


@dataclass
class PreparedImage:
    """A whole mammogram ready for patches or windows."""

    pixels: np.ndarray  # uint8, windowed, outside-breast 0
    breast: np.ndarray  # bool, full resolution
    region: mammo.BreastRegion
    fraction: BreastFraction


def prepare_image(img: np.ndarray) -> PreparedImage:
    region = mammo.find_breast(img)
    breast = full_breast_mask(region, img.shape)
    return PreparedImage(
        windowed_uint8(img, region, breast), breast, region, BreastFraction(breast)
    )


def patch_input(pixels: np.ndarray, box: Box) -> np.ndarray:
    """What ``read_image`` returns for the 8-bit PNG of this patch ([0, 1] float32)."""
    return crop(pixels, box).astype(np.float32) / 255.0


# ------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class PatchSettings:
    size: int = 256
    normal_per_image: int = 2
    context: float = 1.5
    seed: int = 0
    jitter: float = 0.0  # 0: lesion centred; 1: anywhere in the patch (kept whole inside)

    def check(self) -> None:
        if self.size < 16:
            raise BreastcadError(f"--size must be at least 16 pixels, got {self.size}")
        if self.normal_per_image < 0:
            raise BreastcadError(
                f"--normal-per-image must be 0 or more, got {self.normal_per_image}"
            )
        if not (math.isfinite(self.context) and self.context >= 1.0):
            raise BreastcadError(
                f"--context must be at least 1 (1 = the lesion's own box), got {self.context}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise BreastcadError(f"--jitter must be between 0 and 1, got {self.jitter}")


@dataclass
class Patch:
    box: Box
    label: str
    kind: str  # "lesion" or "normal"


def normal_boxes(
    prep: PreparedImage, avoid: list[Box], n: int, size: int, rng: np.random.Generator
) -> list[Box]:
    """Up to ``n`` squares of ``size``, mostly breast, clear of ``avoid`` and of each other."""
    ys, xs = np.nonzero(prep.region.mask)  # candidate centres at segmentation resolution
    if len(ys) == 0 or n == 0:
        return []
    h, w = prep.pixels.shape
    sh, sw = prep.region.mask.shape
    taken: list[Box] = []
    for _ in range(n * NORMAL_TRIES):
        if len(taken) == n:
            break
        i = int(rng.integers(len(ys)))
        cx = (xs[i] + rng.random()) * w / sw  # a random point inside that small pixel
        cy = (ys[i] + rng.random()) * h / sh
        box = place(cx, cy, size, (h, w))
        if prep.fraction(box) < MIN_BREAST:
            continue
        if any(box.intersects(o) for o in [*avoid, *taken]):
            continue
        taken.append(box)
    return taken


def image_patches(
    prep: PreparedImage,
    lesions: list[Lesion],
    label: str,
    s: PatchSettings,
    rng: np.random.Generator,
) -> list[Patch]:
    """Lesion patches (not for images labelled normal) and normal patches of one image."""
    shape = prep.pixels.shape
    centred, boxes = [], []
    for les in lesions:
        side = min(lesion_side(les, s.size, s.context), max(s.size, *shape))  # whole image at most
        centred.append(place(les.cx, les.cy, side, shape))
        dx = dy = 0.0
        if s.jitter > 0:  # shift the lesion off-centre, as a sliding window mostly sees it
            room = s.jitter * max(0.0, side - les.extent) / 2
            dx, dy = rng.uniform(-room, room, size=2)
        boxes.append(place(les.cx + dx, les.cy + dy, side, shape))
    out = [] if label == "normal" else [Patch(b, label, "lesion") for b in boxes]
    normals = normal_boxes(prep, centred + boxes, s.normal_per_image, s.size, rng)
    return out + [Patch(b, "normal", "normal") for b in normals]


# ------------------------------------------------------------------------- a manifest


@dataclass
class PatchResult:
    rows: list[list[str]] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    no_coordinates: int = 0  # benign/malignant images skipped: no lesion coordinates
    images_used: int = 0
    normal_short: int = 0  # normal patches that could not be placed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r[1]] = out.get(r[1], 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.counts().items()) or "none"
        text = (
            f"{len(self.rows)} patches ({per}) from {self.images_used} images; "
            f"{len(self.bad)} file(s) skipped"
        )
        if self.no_coordinates:
            text += (
                f"; {self.no_coordinates} benign/malignant image(s) without lesion coordinates "
                "skipped (no lesion to cut, and their normal patches might hold it)"
            )
        if self.normal_short:
            text += f"; {self.normal_short} normal patch(es) found no free place in the breast"
        return text


def _roi_column(manifest: Path) -> dict[str, str]:
    """Resolved image path -> ``roi`` cell of a CSV manifest (empty when it has none)."""
    if manifest.suffix.lower() != ".csv":
        return {}
    base = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        out = {}
        for row in reader:
            row = {
                (k or "").strip().lower(): (v or "").strip()
                for k, v in row.items()
                if isinstance(v, str) or v is None
            }
            path, roi = row.get("path", ""), row.get("roi", "")
            if path and roi:
                out[str(Path(path) if os.path.isabs(path) else base / path)] = roi
    return out


def _safe_stem(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:40] or "image"


def _where(path: str | Path, base: Path) -> str:
    """A path as the manifest at ``base`` writes it: relative when inside the folder."""
    p = Path(path).resolve()
    try:
        return p.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Done:
    """One source image's outcome (built in a worker thread)."""

    rows: list[list[str]] = field(default_factory=list)
    bad: BadFile | None = None
    no_coordinates: bool = False
    normal_short: int = 0


def _one_image(
    index: int,
    sample: Sample,
    roi: str,
    group: str,
    out_dir: Path,
    s: PatchSettings,
    max_pixels: int,
) -> _Done:
    done = _Done()
    label = sample.label
    try:
        img = read_image(sample.path, max_pixels=max_pixels)
        if roi:
            h, w = img.shape
            try:
                lesions = lesions_from_roi(roi, h)
            except ValueError:
                done.bad = BadFile(sample.path, f"invalid roi {roi!r} (expected 'x y r;...')")
                return done
            if any(not (0 <= les.cx <= w and 0 <= les.cy <= h) for les in lesions):
                done.bad = BadFile(sample.path, f"roi {roi!r} lies outside the {w} x {h} image")
                return done
        elif sample.mask_paths:
            lesions = lesions_from_mask(read_mask(sample.mask_paths, img.shape), s.size // 4)
        else:
            lesions = []
    except ImageReadError as err:
        done.bad = BadFile(err.path, err.problem)
        return done
    if not lesions and label != "normal":
        done.no_coordinates = True
        return done
    prep = prepare_image(img)
    rng = np.random.default_rng([s.seed, index])  # per image: same patches with any thread count
    patches = image_patches(prep, lesions, label, s, rng)
    if label == "normal" or lesions:
        done.normal_short = s.normal_per_image - sum(p.kind == "normal" for p in patches)
    stem = _safe_stem(sample.path)
    counters: dict[str, int] = {}
    for p in patches:
        k = counters[p.kind] = counters.get(p.kind, 0) + 1
        rel = f"images/{index:05d}-{stem}-{p.kind}{k}.png"
        atomic_write_bytes(out_dir / rel, _png(crop(prep.pixels, p.box)))
        done.rows.append(
            [
                rel,
                p.label,
                group,
                p.kind,
                _where(sample.path, out_dir),
                p.box.text(),
                str(p.box.side),
            ]
        )
    return done


def _refuse_repeated_paths(source: SourceResult, manifest: str | os.PathLike[str]) -> None:
    """One row per image: the normal patches of a row avoid only that row's lesions, so an
    image listed twice could get a "normal" patch over the other row's lesion."""
    seen: Counter[str] = Counter(s.path for s in source.samples)
    repeated = [p for p, n in seen.items() if n > 1]
    if repeated:
        first = repeated[0]
        raise DataError(
            f"{printable(str(manifest))}: {printable(first)} is listed on {seen[first]} "
            f"rows ({len(repeated)} image(s) repeated); give each image one row with all its "
            "lesions (roi circles separated by ';', or several masks separated by ';')"
        )


def patch_groups(source: SourceResult, audit: AuditReport, out_dir: Path) -> dict[str, str]:
    """Readable source image -> the group its patches carry.

    The audit's split group (patient ids joined by exact and near-duplicate links),
    named by its patient ids joined with ``+``, or, when none of its images has one,
    by its first image's path.
    """
    given = {s.path: str(s.group).strip() for s in source.samples if str(s.group or "").strip()}
    members: dict[str, list[str]] = defaultdict(list)
    for s in audit.samples:
        members[str(s.group)].append(s.path)
    names: dict[str, str] = {}
    for paths in members.values():
        ids = sorted({given[p] for p in paths if p in given})
        name = "+".join(ids) if ids else _where(min(paths), out_dir)
        names.update(dict.fromkeys(paths, name))
    return names


def sidecar_path(manifest: str | os.PathLike[str]) -> Path:
    """``DIR/patches.csv`` -> ``DIR/patches.json``."""
    return Path(manifest).with_suffix(".json")


def extract_patches(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PatchSettings,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    report: Callable[[BadFile], None] | None = None,
) -> PatchResult:
    """Cut the patches of every image in ``manifest`` into ``out_dir``; write its manifest last.

    A bad image, mask or row skips its row (in ``bad``, and passed to ``report``
    as soon as it is found); the others are processed. Raises DataError when not
    one patch could be made.
    """
    settings.check()
    source = load_source(manifest)
    _refuse_repeated_paths(source, manifest)
    out = Path(out_dir)
    rois = _roi_column(Path(manifest))
    # The sources' own audit (as `breastcad audit --preprocess breast-crop`): a copy or
    # near-copy of an image must share its group, or its normal patches, cut elsewhere,
    # would not be recognised as the same tissue by the audit of the patches.
    audit = run_audit(source, max_pixels=max_pixels, preprocess="breast-crop")
    groups = patch_groups(source, audit, out)
    result = PatchResult(bad=list(audit.bad_files))
    for b in result.bad if report else ():
        report(b)

    def work(i: int) -> _Done:
        sample = source.samples[i]
        if sample.path not in groups:  # unreadable: already in result.bad
            return _Done()
        roi = rois.get(sample.path, "")
        return _one_image(i, sample, roi, groups[sample.path], out, settings, max_pixels)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n, done in enumerate(pool.map(work, range(len(source.samples))), 1):
            if done.bad:
                result.bad.append(done.bad)
                if report:
                    report(done.bad)
            result.no_coordinates += done.no_coordinates
            result.normal_short += done.normal_short
            result.images_used += bool(done.rows)
            result.rows += done.rows
            if progress:
                progress(n, len(source.samples))
    if not result.rows:
        raise DataError(f"{printable(str(manifest))}: no patch could be made ({result.summary()})")
    atomic_write_json(
        sidecar_path(out / MANIFEST_NAME),
        {
            "kind": SIDECAR_KIND,
            "version": PATCHES_VERSION,
            "patch_side": settings.size,
            "context": settings.context,
            "jitter": settings.jitter,
            "normal_per_image": settings.normal_per_image,
            "seed": settings.seed,
            "min_breast_fraction": MIN_BREAST,
            "intensity": INTENSITY,
            "source_manifest": Path(manifest).name,
            "counts": result.counts(),
            "breastcad_version": __version__,
        },
    )
    atomic_write_csv(out / MANIFEST_NAME, COLUMNS, result.rows)
    return result


CARD_KEYS = ("version", "patch_side", "context", "jitter", "min_breast_fraction", "intensity")


def card_entry(data_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``{"patches": {...}}`` for a fold's card when training data came from ``breastcad
    patches`` (its sidecar lies next to the manifest), else ``{}``.

    The patch side is what sliding-window prediction needs to slide at the scale
    the model was trained at; keeping it in the card makes the run self-contained.
    """
    if not data_path or Path(data_path).suffix.lower() != ".csv":
        return {}
    doc = read_json_if_valid(sidecar_path(data_path))
    if not doc or doc.get("kind") != SIDECAR_KIND or "patch_side" not in doc:
        return {}
    return {"patches": {k: doc[k] for k in CARD_KEYS if k in doc}}

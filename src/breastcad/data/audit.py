"""Dataset audit: decode every file, find duplicates, assign split groups.

The audit reads every image once and keeps only small per-image summaries
(hashes and thumbnails), never the full images. It finds

* unreadable images and masks (listed with a one-line reason; the rest goes on),
* exact duplicates: identical decoded pixels (so a PNG re-encode still counts),
* near-duplicates: the same ultrasound frame re-exported, resized, cropped,
  annotated (calipers, text, boxes), or an adjacent frame taken at the same
  probe position. Candidates come from perceptual hashes of the whole image
  and of square windows (for crops); every candidate pair must then pass a
  pixel-level check, on the whole image or after registration (for crops),
* conflict groups: duplicate clusters whose members carry different labels,

and gives every readable sample a ``group``: the connected component of
duplicate links and manifest group (patient) ids. Cross-validation folds must
never split a group. Method and thresholds: docs/audit.md.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_bytes, read_image, read_mask
from breastcad.data.records import BadFile, Sample
from breastcad.data.sources import SourceResult
from breastcad.errors import ConfigError, ImageReadError, printable
from breastcad.io import atomic_write_json

__all__ = [
    "AUDIT_VERSION",
    "AuditReport",
    "DuplicateGroup",
    "DuplicateLink",
    "NearDupSettings",
    "run_audit",
]

# Bumped whenever a change to the method can change which images are grouped.
AUDIT_VERSION = 1

_HASH_KINDS = ("phash", "dhash", "ahash", "whash")
_CONFIRM_RULES = ("bandpass", "correlation", "mad")


@dataclass(frozen=True)
class NearDupSettings:
    """How near-duplicates are found. Defaults were chosen on real BUSI (docs/audit.md).

    A pair of images is a near-duplicate when it is a *candidate* and then
    *confirmed* at pixel level:

    candidate
        perceptual hashes (``hash_kind``, ``hash_size`` x ``hash_size`` bits)
        within ``max_hash_distance`` bits: the hash of the whole image, or
        (``crops``) of any of three square windows (both ends and the middle of
        the long side, side = the short side) against any window of the other;
        or (``crops``) a whole-image band-pass correlation of at least
        ``prefilter_threshold`` (one matrix product over all pairs), which
        catches crops that change the image's short side.
    confirmed
        the whole-image check on ``resize`` x ``resize`` thumbnails passes
        ``confirm_threshold`` under ``confirm_rule``, or (``crops``) the
        crop-aware registration check on band-passed thumbnails
        ``crop_confirm_height`` px high reaches ``crop_confirm_threshold``.

    ``confirm_rule``: ``bandpass`` (default) is the Pearson correlation of
    high-passed thumbnails (thumbnail minus its Gaussian blur), insensitive to
    brightness, contrast and shading changes; ``correlation`` is the plain
    Pearson correlation; ``mad`` is the mean absolute difference of the
    thumbnails in [0, 1] and passes when it is *at most* the threshold.
    """

    hash_kind: str = "phash"
    hash_size: int = 16
    max_hash_distance: int = 92
    confirm_rule: str = "bandpass"
    confirm_threshold: float = 0.5
    resize: int = 64
    crops: bool = True
    crop_confirm_height: int = 128
    crop_confirm_threshold: float = 0.5
    prefilter_threshold: float = 0.3
    workers: int = 2

    def __post_init__(self) -> None:
        if self.hash_kind not in _HASH_KINDS:
            raise ConfigError(
                f"near-duplicate hash_kind {self.hash_kind!r} is not one of "
                f"{', '.join(_HASH_KINDS)}"
            )
        if self.confirm_rule not in _CONFIRM_RULES:
            raise ConfigError(
                f"near-duplicate confirm_rule {self.confirm_rule!r} is not one of "
                f"{', '.join(_CONFIRM_RULES)}"
            )
        if self.hash_kind == "whash" and self.hash_size & (self.hash_size - 1):
            raise ConfigError("near-duplicate hash_size must be a power of 2 for whash")
        checks = [
            ("hash_size", 4 <= self.hash_size <= 64),
            ("max_hash_distance", 0 <= self.max_hash_distance <= self.hash_size**2),
            ("resize", 16 <= self.resize <= 512),
            ("crop_confirm_height", 32 <= self.crop_confirm_height <= 1024),
            ("workers", 1 <= self.workers <= 64),
            ("confirm_threshold", -1.0 <= self.confirm_threshold <= 1.0),
            ("crop_confirm_threshold", -1.0 <= self.crop_confirm_threshold <= 1.0),
            ("prefilter_threshold", -1.0 <= self.prefilter_threshold <= 1.0),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(
                    f"near-duplicate setting {name}={getattr(self, name)!r} is out of range"
                )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DuplicateLink:
    """One confirmed pair, with the scores that decided it (for the audit trail)."""

    a: str
    b: str
    kind: str  # "exact" or "near"
    hash_distance: int | None = None
    whole_score: float | None = None
    crop_score: float | None = None
    crop_scale: float | None = None
    via: str = ""  # which rule confirmed: "pixels", "whole", "crop"


@dataclass
class DuplicateGroup:
    """A cluster of images linked (transitively) by duplicate links."""

    id: str
    kind: str  # "exact" if every link is an identical-pixel link, else "near"
    members: list[Sample]
    links: list[DuplicateLink]

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.members]

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.members})

    @property
    def is_conflict(self) -> bool:
        return len(self.labels) > 1


@dataclass
class AuditReport:
    source_kind: str
    source_root: str
    settings: NearDupSettings
    samples: list[Sample]
    bad_files: list[BadFile]
    exact_groups: list[DuplicateGroup]
    duplicate_groups: list[DuplicateGroup]
    conflict_groups: list[DuplicateGroup]
    file_sha256: dict[str, str]
    pixel_sha256: dict[str, str]
    image_sizes: dict[str, tuple[int, int]]  # path -> (height, width)
    orphan_masks: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    n_found: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    # -- derived views -------------------------------------------------------------

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.label for s in self.samples).items()))

    def images_without_masks(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples if not s.mask_paths)
        return {label: counts.get(label, 0) for label in self.class_counts()}

    def size_stats(self) -> dict[str, dict[str, float]]:
        if not self.image_sizes:
            return {}
        hw = np.array(list(self.image_sizes.values()), dtype=np.int64)
        out = {}
        for name, col in (("width", hw[:, 1]), ("height", hw[:, 0])):
            out[name] = {
                "min": int(col.min()),
                "median": float(np.median(col)),
                "max": int(col.max()),
            }
        return out

    def duplicate_paths(self) -> set[str]:
        return {p for g in self.duplicate_groups for p in g.paths}

    def conflict_paths(self) -> set[str]:
        return {p for g in self.conflict_groups for p in g.paths}

    def usable_samples(self, keep_conflicts: bool = False) -> list[Sample]:
        """Readable samples (with ``group`` set); members of conflict groups are left
        out unless ``keep_conflicts``, since nobody can tell which label is right."""
        if keep_conflicts:
            return list(self.samples)
        drop = self.conflict_paths()
        return [s for s in self.samples if s.path not in drop]

    def split_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for s in self.samples:
            groups[str(s.group)].append(s.path)
        return dict(sorted(groups.items()))

    # -- output ---------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        n_dup = len(self.duplicate_paths())
        n = len(self.samples)
        group_of = {s.path: s.group for s in self.samples}

        def member(s: Sample) -> dict[str, Any]:
            return {"path": _show(s.path), "label": s.label, "group": s.group}

        def dup_group(g: DuplicateGroup) -> dict[str, Any]:
            return {
                "id": g.id,
                "kind": g.kind,
                "labels": g.labels,
                "conflict": g.is_conflict,
                "split_group": group_of.get(g.members[0].path),
                "members": [member(s) for s in g.members],
                "links": [
                    {
                        "a": _show(lk.a),
                        "b": _show(lk.b),
                        "kind": lk.kind,
                        "via": lk.via,
                        "hash_distance": lk.hash_distance,
                        "whole_score": _round(lk.whole_score),
                        "crop_score": _round(lk.crop_score),
                        "crop_scale": _round(lk.crop_scale),
                    }
                    for lk in g.links
                ],
            }

        split = self.split_groups()
        return {
            "kind": "breastcad-audit",
            "audit_version": AUDIT_VERSION,
            "source": {"kind": self.source_kind, "root": _show(self.source_root)},
            "settings": asdict(self.settings),
            "counts": {
                "found": self.n_found,
                "readable": n,
                "unreadable_images": self.n_found - n,
                "bad_files": len(self.bad_files),
                "per_class": self.class_counts(),
                "exact_groups": len(self.exact_groups),
                "exact_group_images": sum(len(g.members) for g in self.exact_groups),
                "duplicate_groups": len(self.duplicate_groups),
                "near_duplicate_groups": sum(g.kind == "near" for g in self.duplicate_groups),
                "duplicate_group_images": n_dup,
                "duplicate_group_share": (n_dup / n) if n else 0.0,
                "conflict_groups": len(self.conflict_groups),
                "conflict_images": len(self.conflict_paths()),
                "usable": len(self.usable_samples()),
                "split_groups": len(split),
                "largest_split_group": max((len(v) for v in split.values()), default=0),
                "images_without_masks": self.images_without_masks(),
                "orphan_masks": len(self.orphan_masks),
                "ignored_files": len(self.ignored),
            },
            "image_size": self.size_stats(),
            "bad_files": [
                {"path": _show(b.path), "problem": _show(b.problem)} for b in self.bad_files
            ],
            "exact_groups": [dup_group(g) for g in self.exact_groups],
            "duplicate_groups": [dup_group(g) for g in self.duplicate_groups],
            "conflict_groups": [g.id for g in self.conflict_groups],
            "samples": [
                {
                    "path": _show(s.path),
                    "label": s.label,
                    "group": s.group,
                    "masks": [_show(m) for m in s.mask_paths],
                    "height": self.image_sizes[s.path][0],
                    "width": self.image_sizes[s.path][1],
                    "file_sha256": self.file_sha256.get(s.path),
                    "pixel_sha256": self.pixel_sha256.get(s.path),
                }
                for s in self.samples
            ],
            "split_groups": {gid: [_show(p) for p in paths] for gid, paths in split.items()},
            "file_sha256": {_show(p): h for p, h in sorted(self.file_sha256.items())},
            "orphan_masks": [_show(p) for p in self.orphan_masks],
            "ignored_files": [_show(p) for p in self.ignored],
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def _rel(self, path: str) -> str:
        """``path`` relative to the source folder when inside it (for short listings)."""
        root = (
            self.source_root
            if os.path.isdir(self.source_root)
            else os.path.dirname(self.source_root)
        )
        try:
            rel = os.path.relpath(path, root)
        except ValueError:
            rel = path
        return _show(path if rel.startswith("..") else rel)

    def summary_text(self, max_listed: int = 5, max_conflicts: int = 10) -> str:
        """A short, readable account; the JSON (``to_json_dict``) has every detail."""
        n = len(self.samples)
        lines = [
            f"Audit of {_show(self.source_root)} ({self.source_kind}): "
            f"{self.n_found} images found, "
            f"{n} readable, {self.n_found - n} unreadable ({self.seconds:.1f} s)"
        ]
        counts = self.class_counts()
        lines.append("Classes: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
        st = self.size_stats()
        if st:
            w, h = st["width"], st["height"]
            lines.append(
                f"Image size: width {w['min']}..{w['max']} (median {w['median']:g}), "
                f"height {h['min']}..{h['max']} (median {h['median']:g}) px"
            )
        if self.bad_files:
            lines.append(f"Bad files: {len(self.bad_files)}")
            for b in self.bad_files[:max_listed]:
                lines.append(f"  - {self._rel(b.path)}: {_show(b.problem)}")
            if len(self.bad_files) > max_listed:
                lines.append(f"  ... and {len(self.bad_files) - max_listed} more (see the JSON)")
        n_exact_imgs = sum(len(g.members) for g in self.exact_groups)
        n_near = sum(g.kind == "near" for g in self.duplicate_groups)
        n_dup = len(self.duplicate_paths())
        share = 100.0 * n_dup / n if n else 0.0
        lines.append(
            f"Exact duplicates: {len(self.exact_groups)} set(s) of identical images "
            f"({n_exact_imgs} images)"
        )
        lines.append(
            f"Duplicate groups: {len(self.duplicate_groups)} "
            f"({len(self.duplicate_groups) - n_near} exact-only, {n_near} with near-duplicates), "
            f"covering {n_dup} of {n} images ({share:.1f}%)"
        )
        if self.conflict_groups:
            lines.append(
                f"Conflicting labels: {len(self.conflict_groups)} group(s), "
                f"{len(self.conflict_paths())} images left out of training by default"
            )
            for g in self.conflict_groups[:max_conflicts]:
                members = ", ".join(f"{self._rel(s.path)} [{s.label}]" for s in g.members)
                lines.append(f"  - {g.id}: {members}")
            if len(self.conflict_groups) > max_conflicts:
                more = len(self.conflict_groups) - max_conflicts
                lines.append(f"  ... and {more} more (see the JSON)")
        else:
            lines.append("Conflicting labels: none")
        missing = {k: v for k, v in self.images_without_masks().items() if v}
        lines.append(
            "Images without masks: "
            + (", ".join(f"{k} {v}" for k, v in missing.items()) if missing else "none")
        )
        lines.append(f"Masks without images: {len(self.orphan_masks)}")
        lines.append(f"Ignored non-image files: {len(self.ignored)}")
        split = self.split_groups()
        largest = max((len(v) for v in split.values()), default=0)
        lines.append(f"Split groups: {len(split)} (largest has {largest} images)")
        return "\n".join(lines)

    def write(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_json_dict())


# --------------------------------------------------------------------------- helpers


def _show(text: str) -> str:
    """A path that is safe to print on one line and to put into strict UTF-8 JSON.

    Names that are not valid UTF-8 arrive as surrogate escapes (PEP 383) and
    are shown escaped, like control characters (the project's ``printable``).
    """
    return printable(str(text))


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[int]]:
        comps: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            comps[self.find(i)].append(i)
        return list(comps.values())


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma, mode="nearest")


def _perceptual_hash(img: Image.Image, kind: str, size: int) -> np.ndarray:
    import imagehash

    fn = {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "ahash": imagehash.average_hash,
        "whash": imagehash.whash,
    }[kind]
    return np.asarray(fn(img, hash_size=size).hash, dtype=bool).ravel()


# --------------------------------------------------------------------------- per image


@dataclass
class _Features:
    """What the audit keeps of one decoded image (a few tens of kB)."""

    shape: tuple[int, int]
    pixel_sha: str
    hash_bits: np.ndarray  # bool (1 or 4, hash_size**2): whole image, then 3 windows
    thumb: np.ndarray  # float32 resize x resize, values in [0, 1]
    reg: np.ndarray | None  # uint8, crop_confirm_height x W (aspect kept)


def _resize(img: Image.Image, w: int, h: int) -> Image.Image:
    # BOX = area averaging: every source pixel counts once, no aliasing.
    return img.resize((max(1, w), max(1, h)), Image.Resampling.BOX)


def _features(arr: np.ndarray, settings: NearDupSettings) -> _Features:
    h, w = arr.shape
    digest = hashlib.sha256(f"{h}x{w}:".encode())
    digest.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(u8)
    # Hashes look at 4 * hash_size pixels at most: hash a copy whose short side
    # is 8 * hash_size (area-averaged), which is several times faster.
    small = img
    short = 8 * settings.hash_size
    if min(h, w) > short:
        small = _resize(img, round(w * short / min(h, w)), round(h * short / min(h, w)))
    sh, sw = small.height, small.width
    hashes = [_perceptual_hash(small, settings.hash_kind, settings.hash_size)]
    thumb = np.asarray(_resize(img, settings.resize, settings.resize), dtype=np.float32) / 255.0
    reg = None
    if settings.crops:
        # Square windows at both ends and the middle of the long side: a crop
        # that keeps one edge or the centre (sector wedges, side annotations and
        # margins removed) leaves one window pair showing the same region.
        side = min(sh, sw)
        for f in (0.0, 0.5, 1.0):
            if sw >= sh:
                x = round((sw - side) * f)
                box = (x, 0, x + side, side)
            else:
                y = round((sh - side) * f)
                box = (0, y, side, y + side)
            hashes.append(_perceptual_hash(small.crop(box), settings.hash_kind, settings.hash_size))
        rh = settings.crop_confirm_height
        rw = int(np.clip(round(rh * w / h), 8, 6 * rh))
        reg = np.asarray(_resize(img, rw, rh), dtype=np.uint8)
    return _Features((h, w), digest.hexdigest(), np.stack(hashes), thumb, reg)


@dataclass
class _Decoded:
    sample: Sample
    features: _Features | None
    file_sha: str | None
    bad: list[BadFile]


def _breast_only(arr: np.ndarray) -> np.ndarray:
    """A mammogram with everything outside the breast blanked (not cropped, not mirrored).

    Near-duplicate features are computed on this for ``breast-crop`` data: burnt-in
    labels sit at the same place in every image of a scanner and would otherwise
    make unrelated mammograms look alike. (Cropping too would make them look alike
    again: every cropped breast fills its frame the same way.)
    """
    from breastcad.data.mammo import blank_outside, find_breast

    return blank_outside(arr, find_breast(arr))


def _decode_one(
    sample: Sample, max_pixels: int, settings: NearDupSettings, preprocess: str = "stretch"
) -> _Decoded:
    bad: list[BadFile] = []
    try:
        file_sha = hashlib.sha256(read_bytes(sample.path)).hexdigest()
    except ImageReadError:
        file_sha = None  # read_image below reports the same problem
    try:
        arr = read_image(sample.path, max_pixels)
    except ImageReadError as err:
        return _Decoded(sample, None, file_sha, [BadFile(sample.path, err.problem)])
    except MemoryError:
        return _Decoded(sample, None, file_sha, [BadFile(sample.path, "out of memory decoding")])
    except Exception as err:  # a decoder bug must not stop the audit of the other files
        problem = f"unexpected decoding error ({type(err).__name__}: {err})"
        return _Decoded(sample, None, file_sha, [BadFile(sample.path, problem)])
    good_masks: list[str] = []
    for mp in sample.mask_paths:
        try:
            read_mask((mp,), arr.shape)
        except ImageReadError as err:
            bad.append(BadFile(mp, f"mask of {_show(sample.path)}: {err.problem}"))
        except Exception as err:
            problem = f"mask of {_show(sample.path)}: unexpected decoding error ({err})"
            bad.append(BadFile(mp, problem))
        else:
            good_masks.append(mp)
    if len(good_masks) != len(sample.mask_paths):
        sample = replace(sample, mask_paths=tuple(good_masks))
    feats = _features(arr, settings)
    if preprocess == "breast-crop":  # exact duplicates and sizes stay those of the file
        near = _features(_breast_only(arr), settings)
        feats = replace(feats, hash_bits=near.hash_bits, thumb=near.thumb, reg=near.reg)
    del arr
    return _Decoded(sample, feats, file_sha, bad)


# --------------------------------------------------------------------------- pair scores


def _unit_rows(flat: np.ndarray) -> np.ndarray:
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9)


def _bandpass_vectors(thumbs: np.ndarray, resize: int) -> np.ndarray:
    """High-passed thumbnails (minus a Gaussian blur of sigma 3 px at 64 px), unit rows."""
    sigma = 3.0 * resize / 64.0
    if len(thumbs) == 0:
        return np.zeros((0, resize * resize), dtype=np.float32)
    hp = np.stack([(t - _gaussian(t, sigma)).ravel() for t in thumbs])
    return _unit_rows(hp.astype(np.float32))


def _whole_scores(
    thumbs: np.ndarray, bandpass: np.ndarray, pairs: np.ndarray, rule: str
) -> np.ndarray:
    """Whole-image pixel check of each pair on the resize x resize thumbnails."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float64)
    if rule == "bandpass":
        flat = bandpass
    else:
        flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
        if rule == "mad":
            return np.abs(flat[pairs[:, 0]] - flat[pairs[:, 1]]).mean(axis=1).astype(np.float64)
        flat = _unit_rows(flat)
    a, b = flat[pairs[:, 0]].astype(np.float64), flat[pairs[:, 1]].astype(np.float64)
    return np.einsum("ij,ij->i", a, b)


def _dense_pairs(vectors: np.ndarray, threshold: float, chunk: int = 1024) -> np.ndarray:
    """All pairs (i < j) whose rows have a dot product of at least ``threshold``."""
    n = len(vectors)
    found = []
    for i0 in range(0, n, chunk):
        block = vectors[i0 : i0 + chunk] @ vectors.T
        ii, jj = np.nonzero(block >= threshold)
        ii = ii + i0
        keep = ii < jj
        found.append(np.stack([ii[keep], jj[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _whole_pass(score: float, settings: NearDupSettings) -> bool:
    if settings.confirm_rule == "mad":
        return score <= settings.confirm_threshold
    return score >= settings.confirm_threshold


def _hash_distances(bits: np.ndarray, rows: slice | None = None) -> np.ndarray:
    """Smallest Hamming distance per image pair: whole vs whole, window vs window.

    ``bits`` is (n, k, B) bool: hash 0 is the whole image, 1..k-1 the windows.
    Returns the (rows, n) block. Distances come from matrix products
    (ones_i + ones_j - 2 * common ones), so all pairs of 1000 images take
    well under a second.
    """
    rows = rows or slice(0, len(bits))
    k = bits.shape[1]
    x = bits.astype(np.float32)
    ones = x.sum(axis=2)

    def dist(a: int, b: int) -> np.ndarray:
        return ones[rows, a, None] + ones[None, :, b] - 2.0 * (x[rows, a] @ x[:, b].T)

    best = dist(0, 0)
    for a in range(1, k):
        for b in range(1, k):
            np.minimum(best, dist(a, b), out=best)
    return np.rint(best).astype(np.int32)


def _hash_candidates(bits: np.ndarray, max_distance: int, chunk: int = 1024) -> dict:
    """{(i, j): distance} for i < j within ``max_distance`` (in row blocks: bounded memory)."""
    found: dict[tuple[int, int], int] = {}
    for i0 in range(0, len(bits), chunk):
        block = _hash_distances(bits, slice(i0, i0 + chunk))
        ii, jj = np.nonzero(block <= max_distance)
        for i, j in zip((ii + i0).tolist(), jj.tolist(), strict=True):
            if i < j:
                found[(i, j)] = int(block[i - i0, j])
    return found


def _bandpass_reg(img: np.ndarray) -> np.ndarray:
    t = img.astype(np.float32)
    return _gaussian(t, 0.8) - _gaussian(t, 2.5)


def _ncc_max(big: np.ndarray, tmpl: np.ndarray) -> float:
    """Best normalised cross-correlation of ``tmpl`` over positions fully inside ``big``."""
    from scipy.signal import fftconvolve

    th, tw = tmpl.shape
    t = tmpl - tmpl.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-6:
        return -1.0
    num = fftconvolve(big, t[::-1, ::-1], mode="valid")
    s1 = np.pad(big, ((1, 0), (1, 0))).astype(np.float64).cumsum(0).cumsum(1)
    s2 = np.pad(big.astype(np.float64) ** 2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def box(s: np.ndarray) -> np.ndarray:
        return s[th:, tw:] - s[:-th, tw:] - s[th:, :-tw] + s[:-th, :-tw]

    sum1, sum2 = box(s1), box(s2)
    var = np.maximum(sum2 - sum1 * sum1 / (th * tw), 1e-6)
    return float((num / np.sqrt(var) / tn).max())


def _crop_score(
    a: _Features, b: _Features, margin: float = 0.12, min_side: int = 16
) -> tuple[float, float | None]:
    """Crop-aware pixel check: register b onto a and return (best NCC, scale).

    Scale hypotheses (b's pixels -> a's pixels): 1 (a crop at the same pixel
    scale), equal heights and equal widths (a resized export, or a resize plus a
    crop along the other axis). The smaller image, less a 12 % margin on each
    side, is searched over every position inside the larger one; images are
    band-passed (difference of Gaussians) so that only shared fine structure
    (speckle, edges, text) counts. On BUSI: the same frame 0.7..1, other frames
    of the same scan 0.1..0.65, unrelated images at most 0.4.
    """
    assert a.reg is not None and b.reg is not None
    (ha, wa), (hb, wb) = a.shape, b.shape
    hyps: list[float] = []
    for r in (1.0, ha / hb, wa / wb):
        if 0.4 <= r <= 2.5 and all(abs(r - q) / q > 0.02 for q in hyps):
            hyps.append(r)
    best, best_r = -1.0, None
    ra_img, rb_img = Image.fromarray(a.reg), Image.fromarray(b.reg)
    for r in hyps:
        k = r * hb / ha  # size of b's thumbnail relative to a's in a common frame
        if k <= 1.0:
            fa = a.reg
            fb = np.asarray(_resize(rb_img, round(rb_img.width * k), round(rb_img.height * k)))
        else:
            fb = b.reg
            fa = np.asarray(_resize(ra_img, round(ra_img.width / k), round(ra_img.height / k)))
        pa, pb = _bandpass_reg(fa), _bandpass_reg(fb)
        small, big = (pb, pa) if pb.size <= pa.size else (pa, pb)
        mh, mw = round(small.shape[0] * margin), round(small.shape[1] * margin)
        tmpl = small[mh : small.shape[0] - mh, mw : small.shape[1] - mw]
        if tmpl.shape[0] > big.shape[0]:
            d = (tmpl.shape[0] - big.shape[0] + 1) // 2
            tmpl = tmpl[d : d + big.shape[0]]
        if tmpl.shape[1] > big.shape[1]:
            d = (tmpl.shape[1] - big.shape[1] + 1) // 2
            tmpl = tmpl[:, d : d + big.shape[1]]
        if min(tmpl.shape) < min_side:
            continue
        v = _ncc_max(big, tmpl)
        if v > best:
            best, best_r = v, r
    return best, best_r


# --------------------------------------------------------------------------- main


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"audit: {msg}", file=sys.stderr, flush=True)


def _imap(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, progress: bool, what: str
) -> list[Any]:
    """``map`` over a small thread pool (order kept), with an optional progress bar."""
    from tqdm import tqdm

    items = list(items)
    bar = tqdm(
        total=len(items), desc=f"audit: {what}", unit="", file=sys.stderr, disable=not progress
    )
    try:
        if workers <= 1 or len(items) < 2:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        with ThreadPool(min(workers, len(items))) as pool:
            out = []
            for r in pool.imap(fn, items, chunksize=4):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()


def _group_ids(components: list[list[str]], prefix: str = "g") -> dict[str, str]:
    """Deterministic ids: components numbered by their smallest path."""
    ordered = sorted((sorted(c) for c in components), key=lambda c: c[0])
    width = max(4, len(str(len(ordered))))
    ids = {}
    for k, comp in enumerate(ordered, 1):
        gid = f"{prefix}{k:0{width}d}"
        for p in comp:
            ids[p] = gid
    return ids


def run_audit(
    source: SourceResult,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    settings: NearDupSettings = NearDupSettings(),  # noqa: B008 (frozen, immutable)
    progress: bool = False,
    preprocess: str = "stretch",
) -> AuditReport:
    """Decode every sample of ``source`` and audit it (see the module docstring).

    ``preprocess="breast-crop"`` (mammograms): near-duplicates are looked for on
    the breast region with markers removed (exact duplicates on the whole file).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. decode (threads: PIL, zlib and numpy release the GIL)
    decoded: list[_Decoded] = _imap(
        lambda s: _decode_one(s, max_pixels, settings, preprocess),
        source.samples,
        settings.workers,
        progress,
        "decoding images",
    )
    timings["decode"] = time.perf_counter() - t0

    bad: list[BadFile] = list(source.bad)
    file_sha: dict[str, str] = {}
    kept: list[tuple[Sample, _Features]] = []
    for d in decoded:
        bad += d.bad
        if d.file_sha is not None:
            file_sha[d.sample.path] = d.file_sha
        if d.features is not None:
            kept.append((d.sample, d.features))
    del decoded
    kept.sort(key=lambda sf: sf[0].path)
    samples = [s for s, _ in kept]
    feats = [f for _, f in kept]
    n = len(samples)
    paths = [s.path for s in samples]

    # 2. exact duplicates: identical decoded pixels
    t1 = time.perf_counter()
    links: list[tuple[int, int, DuplicateLink]] = []
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(feats):
        by_pixels[f.pixel_sha].append(i)
    exact_pairs: set[tuple[int, int]] = set()
    for members in by_pixels.values():
        for j in members[1:]:
            i = members[0]
            exact_pairs.add((i, j))
            links.append((i, j, DuplicateLink(paths[i], paths[j], "exact", via="pixels")))

    # 3. near-duplicate candidates: perceptual hashes (whole image, and windows for crops)
    cand: dict[tuple[int, int], dict[str, Any]] = {}
    thumbs = np.stack([f.thumb for f in feats]) if feats else np.zeros((0, 1, 1), np.float32)
    bandpass = _bandpass_vectors(thumbs, settings.resize)
    if n >= 2:
        bits = np.stack([f.hash_bits for f in feats])
        for pair, dist in _hash_candidates(bits, settings.max_hash_distance).items():
            cand[pair] = {"hash": dist}
        if settings.crops:
            for i, j in _dense_pairs(bandpass, settings.prefilter_threshold).tolist():
                if (i, j) not in cand:
                    dist = int(_hash_distances(bits[[i, j]])[0, 1])
                    cand[(i, j)] = {"hash": dist}
        del bits
    for pair in exact_pairs:
        cand.pop(pair, None)
    timings["candidates"] = time.perf_counter() - t1
    _progress(progress, f"{len(cand)} candidate pairs")

    # 4. confirm candidates at pixel level
    t2 = time.perf_counter()
    pairs = np.array(sorted(cand), dtype=np.int64).reshape(-1, 2)
    whole = _whole_scores(thumbs, bandpass, pairs, settings.confirm_rule)
    del thumbs, bandpass
    crop_res: list[tuple[float, float | None] | None] = [None] * len(pairs)
    if settings.crops and len(pairs):
        # Registration (about 6 ms a pair) only where the whole-image check failed.
        todo = [k for k in range(len(pairs)) if not _whole_pass(float(whole[k]), settings)]
        done = _imap(
            lambda k: _crop_score(feats[pairs[k, 0]], feats[pairs[k, 1]]),
            todo,
            settings.workers,
            progress,
            "registering candidate pairs",
        )
        for k, res in zip(todo, done, strict=True):
            crop_res[k] = res
    for k, (i, j) in enumerate(pairs.tolist()):
        ws = float(whole[k])
        cs, scale = crop_res[k] if crop_res[k] is not None else (None, None)
        via = ""
        if _whole_pass(ws, settings):
            via = "whole"
        elif cs is not None and cs >= settings.crop_confirm_threshold:
            via = "crop"
        if via:
            links.append(
                (
                    i,
                    j,
                    DuplicateLink(
                        paths[i], paths[j], "near", cand[(i, j)]["hash"], ws, cs, scale, via
                    ),
                )
            )
    timings["confirm"] = time.perf_counter() - t2

    # 5. clusters: exact groups, duplicate groups (transitive), conflicts
    def clusters(edge_list: list[tuple[int, int, DuplicateLink]]) -> list[DuplicateGroup]:
        uf = _UnionFind(n)
        for i, j, _ in edge_list:
            uf.union(i, j)
        comps = [c for c in uf.components() if len(c) > 1]
        comps.sort(key=lambda c: min(paths[i] for i in c))
        root_links: dict[int, list[DuplicateLink]] = defaultdict(list)
        for i, _j, lk in edge_list:
            root_links[uf.find(i)].append(lk)
        groups = []
        width = max(3, len(str(len(comps))))
        for k, comp in enumerate(comps, 1):
            comp.sort(key=lambda i: paths[i])
            lks = sorted(root_links[uf.find(comp[0])], key=lambda lk: (lk.a, lk.b))
            kind = "exact" if all(lk.kind == "exact" for lk in lks) else "near"
            groups.append(DuplicateGroup(f"d{k:0{width}d}", kind, [samples[i] for i in comp], lks))
        return groups

    exact_groups = clusters([e for e in links if e[2].kind == "exact"])
    for k, g in enumerate(exact_groups, 1):
        g.id = f"x{k:0{max(3, len(str(len(exact_groups))))}d}"
    dup_groups = clusters(links)

    # 6. split groups: duplicate links + shared manifest group ids
    uf = _UnionFind(n)
    for i, j, _ in links:
        uf.union(i, j)
    by_manifest: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.group is not None and str(s.group).strip():
            key = str(s.group).strip()
            if key in by_manifest:
                uf.union(by_manifest[key], i)
            else:
                by_manifest[key] = i
    comps = [[paths[i] for i in c] for c in uf.components()]
    gid = _group_ids(comps)
    samples = [replace(s, group=gid[s.path]) for s in samples]
    by_path = {s.path: s for s in samples}
    for g in exact_groups + dup_groups:
        g.members = [by_path[s.path] for s in g.members]
    conflicts = [g for g in dup_groups if g.is_conflict]

    report = AuditReport(
        source_kind=source.kind,
        source_root=str(source.root),
        settings=settings,
        samples=samples,
        bad_files=bad,
        exact_groups=exact_groups,
        duplicate_groups=dup_groups,
        conflict_groups=conflicts,
        file_sha256=file_sha,
        pixel_sha256={p: f.pixel_sha for p, f in zip(paths, feats, strict=True)},
        image_sizes={p: f.shape for p, f in zip(paths, feats, strict=True)},
        orphan_masks=list(source.orphan_masks),
        ignored=list(source.ignored),
        n_found=len(source.samples),
        seconds=time.perf_counter() - t0,
        timings=timings,
    )
    _progress(progress, f"done in {report.seconds:.1f} s")
    return report


def write_preprocess_examples(
    report: AuditReport,
    out: str | os.PathLike[str],
    mode: str = "breast-crop",
    size: int = 256,
    n: int = 6,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    """Draw ``n`` audited images (classes taken in turn) beside their model input.

    For ``breast-crop`` the original shows the breast outline and crop box found,
    so a reader can check that markers are removed and lesions kept. Returns
    how many examples were drawn (unreadable images are passed over).
    """
    from itertools import zip_longest

    from breastcad.data.cache import preprocess
    from breastcad.data.mammo import plot_examples

    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in report.samples:
        by_label[s.label].append(s)
    order = [s for row in zip_longest(*by_label.values()) for s in row if s is not None]
    items = []
    for s in order[: 2 * n]:
        if len(items) >= n:
            break
        try:
            img = read_image(s.path, max_pixels)
        except ImageReadError:
            continue
        items.append((f"{s.label}: {os.path.basename(s.path)}", img, preprocess(img, size, mode)))
    if items:
        plot_examples(items, str(out), title=f"preprocessing: {mode}")
    return len(items)

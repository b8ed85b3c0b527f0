"""Decode each image once: a cache of resized uint8 arrays, keyed by content.

The key is the file's content hash, the output size, the preprocessing
mode (``stretch``, ``scan-crop`` or ``breast-crop``) and its version, so a changed file, size
or preprocessing rule gets a new entry and a stale one is never read. Entries
are written atomically (temp file + rename), so two processes building the same
cache at once both end with valid files.

Intensity: every source is first mapped to [0, 1] by ``read_image`` (16-bit
and DICOM sources are windowed to their own range there), then resized in
float and quantised to uint8: 256 levels are plenty for ultrasound, whose
scanners export 8 bits.

Modes (``data.preprocess``, recorded as ``preprocessing.mode`` in each fold's
card): ``stretch`` resizes the whole image to a square (aspect not kept);
``scan-crop`` crops an ultrasound frame to its scan area (black surround and the
text bands and marks on it dropped; see :mod:`breastcad.data.scan_area`) and
stretches that; ``breast-crop`` finds the breast in a whole mammogram, blanks markers outside
it, mirrors it so the chest wall is on the left, crops to it and resizes with
the aspect kept and padding (see :mod:`breastcad.data.mammo`).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image
from breastcad.errors import ConfigError
from breastcad.io import atomic_write_bytes, ensure_dir

# Bump when the resize or intensity rule changes: old entries are then unused.
PREPROCESS_VERSION = "stretch-bilinear-v1"
PREPROCESS_MODES = ("stretch", "scan-crop", "breast-crop", "lesion-crop")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "breastcad"


def resize_to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a [0, 1] float image to ``size`` x ``size`` (aspect not kept) as uint8."""
    pil = Image.fromarray(img.astype(np.float32, copy=False), mode="F")
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(pil, dtype=np.float32)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def check_mode(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise ConfigError(
            f"unknown preprocessing mode {mode!r}; valid modes: {', '.join(PREPROCESS_MODES)}"
        )
    return mode


def preprocess(img: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """A decoded [0, 1] image as the ``size`` x ``size`` uint8 model input, by ``mode``."""
    if check_mode(mode) == "breast-crop":
        from breastcad.data.mammo import breast_crop

        return breast_crop(img, size)
    if mode == "scan-crop":
        from breastcad.data.scan_area import scan_crop

        return scan_crop(img, size)
    if mode == "lesion-crop":
        raise ConfigError(
            "lesion-crop inputs are cut around a lesion mask: they need the run's segmentation "
            "models (breastcad.lesion_crop), not the image cache"
        )
    return resize_to_uint8(img, size)


def preprocessing_card(mode: str = "stretch", crop: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a fold's card records under ``preprocessing`` for ``mode`` (read back by
    :func:`prepare_for_model`); ``crop`` is the lesion-crop rule (``CropRule.card()``)."""
    if check_mode(mode) == "lesion-crop":
        return {
            "version": PREPROCESS_VERSION,
            "mode": mode,
            **(crop or {}),
            "mask": "mean of the run's segmentation models (RUN/segmentation) on the whole image",
            "resize": "lesion crop (see crop), bilinear",
        }
    if mode == "breast-crop":
        from breastcad.data.mammo import MAMMO_VERSION

        return {
            "version": PREPROCESS_VERSION,
            "mode": mode,
            "mode_version": MAMMO_VERSION,
            "resize": "breast region (markers blanked), chest wall left, crop, "
            "aspect kept, bilinear, padded to square",
        }
    if mode == "scan-crop":
        from breastcad.data.scan_area import SCAN_VERSION

        return {
            "version": PREPROCESS_VERSION,
            "mode": mode,
            "mode_version": SCAN_VERSION,
            "resize": "crop to the scan area (black surround, text bands and marks outside "
            "the scan removed), stretch to square, bilinear",
        }
    return {"version": PREPROCESS_VERSION, "mode": mode, "resize": "stretch to square, bilinear"}


def check_rule_version(card: dict[str, Any]) -> str:
    """The card's preprocessing mode, after checking that this breastcad applies the very
    rule the model was trained with (a changed crop rule would silently feed it other
    inputs)."""
    pre = card.get("preprocessing") or {}
    mode = pre.get("mode", "stretch")
    trained_with, now = pre.get("mode_version"), preprocessing_card(mode).get("mode_version")
    if trained_with is not None and trained_with != now:
        raise ConfigError(
            f"this model was trained with the {trained_with} preprocessing rule and this "
            f"breastcad applies {now}: retrain it, or use the breastcad version that trained it"
        )
    return str(mode)


def prepare_for_model(img: np.ndarray, card: dict[str, Any], cropper: Any = None) -> np.ndarray:
    """The model input for a decoded [0, 1] image, by the rule recorded in a fold's card.

    Every user of a trained model (predict, export checks, serve, explain) goes
    through here, so inference applies exactly the preprocessing training applied.
    Cards written before modes existed have no ``mode``: they mean ``stretch``.
    """
    mode = check_rule_version(card)
    if mode == "lesion-crop":  # the box comes from the run's segmentation models
        if cropper is None:
            raise ConfigError(
                "this model classifies lesion crops: load it from its run folder, whose "
                "segmentation models find the lesion"
            )
        return cropper(img)[0]
    return preprocess(img, int(card["input_size"]), mode)


def entry_key(content_sha256: str, size: int, mode: str = "stretch") -> str:
    text = f"{content_sha256}|{size}|{PREPROCESS_VERSION}"
    if mode == "scan-crop":
        from breastcad.data.scan_area import SCAN_VERSION

        text += f"|{mode}|{SCAN_VERSION}"
    elif mode != "stretch":  # stretch keeps its old keys, so existing caches stay valid
        from breastcad.data.mammo import MAMMO_VERSION

        text += f"|{mode}|{MAMMO_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_entry(path: Path, size: int) -> np.ndarray | None:
    """The entry's pixels, or None when it is missing or damaged in any way (then rebuilt).

    The .npy header is checked (uint8, C order, ``(size, size)``) before anything
    is allocated, and the data must be exactly ``size * size`` bytes: a truncated
    file, a corrupted header claiming a huge shape (``np.load`` would try to
    allocate it) or a file that is not an .npy at all (``np.load`` opens zip
    files as archives) all read as a miss instead of crashing the run.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                return None
            if shape != (size, size) or fortran or dtype != np.dtype(np.uint8):
                return None
            data = fh.read(size * size + 1)
    except (OSError, ValueError, EOFError, SyntaxError, TypeError, RecursionError):
        return None  # missing or damaged entry: rebuild it
    if len(data) != size * size:
        return None  # truncated (or trailing bytes): not what np.save wrote
    return np.frombuffer(data, dtype=np.uint8).reshape(size, size).copy()


def cached_image(
    path: str,
    content_sha256: str,
    size: int,
    cache_dir: Path,
    max_pixels: int,
    mode: str = "stretch",
) -> np.ndarray:
    entry = cache_dir / f"{entry_key(content_sha256, size, mode)}.npy"
    arr = _load_entry(entry, size)
    if arr is None:
        arr = preprocess(read_image(path, max_pixels=max_pixels), size, mode)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(entry, buf.getvalue())
    return arr


def load_stack(
    paths: Sequence[str],
    hashes: Sequence[str],
    size: int,
    cache_dir: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    preprocess: str = "stretch",
) -> np.ndarray:
    """All images as one (N, size, size) uint8 array, decoding only cache misses.

    ``preprocess`` is the mode (``data.preprocess``): ``stretch``, ``scan-crop`` or
    ``breast-crop``.
    """
    mode = check_mode(preprocess)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    ensure_dir(root)
    out = np.empty((len(paths), size, size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = cached_image(paths[i], hashes[i], size, root, max_pixels, mode)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, range(len(paths))))
    return out

"""Decode each image once: a cache of resized uint8 arrays, keyed by content.

The key is the file's content hash, the output size and the preprocessing
version, so a changed file, size or preprocessing rule gets a new entry and a
stale one is never read. Entries are written atomically (temp file + rename),
so two processes building the same cache at once both end with valid files.

Intensity: every source is first mapped to [0, 1] by ``read_image`` (16-bit
and DICOM sources are windowed to their own range there), then resized in
float and quantised to uint8: 256 levels are plenty for ultrasound, whose
scanners export 8 bits.
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
from breastcad.io import atomic_write_bytes, ensure_dir

# Bump when the resize or intensity rule changes: old entries are then unused.
PREPROCESS_VERSION = "stretch-bilinear-v1"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "breastcad"


def resize_to_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a [0, 1] float image to ``size`` x ``size`` (aspect not kept) as uint8."""
    pil = Image.fromarray(img.astype(np.float32, copy=False), mode="F")
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(pil, dtype=np.float32)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def prepare_for_model(img: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """The model input for a decoded [0, 1] image, by the rule recorded in a fold's card.

    Every user of a trained model (predict, export checks, serve, explain) goes
    through here, so inference applies exactly the preprocessing training applied.
    """
    return resize_to_uint8(img, int(card["input_size"]))


def entry_key(content_sha256: str, size: int) -> str:
    text = f"{content_sha256}|{size}|{PREPROCESS_VERSION}"
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
    path: str, content_sha256: str, size: int, cache_dir: Path, max_pixels: int
) -> np.ndarray:
    entry = cache_dir / f"{entry_key(content_sha256, size)}.npy"
    arr = _load_entry(entry, size)
    if arr is None:
        arr = resize_to_uint8(read_image(path, max_pixels=max_pixels), size)
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
) -> np.ndarray:
    """All images as one (N, size, size) uint8 array, decoding only cache misses."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    ensure_dir(root)
    out = np.empty((len(paths), size, size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = cached_image(paths[i], hashes[i], size, root, max_pixels)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, range(len(paths))))
    return out

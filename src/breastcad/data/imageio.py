"""Read any supported image file into a single-channel float32 array in [0, 1].

Supported: PNG (1/8/16-bit, palette, RGB, RGBA), JPEG (incl. CMYK), BMP, TIFF,
PGM/PPM and DICOM. Every failure becomes an :class:`ImageReadError` whose
message names the file and the problem in one line.

Intensity rule (documented in docs/run-folder.md): 8-bit sources are divided by
255; sources with more than 8 bits (16-bit PNG/TIFF, DICOM after its modality
and VOI LUTs) are windowed per image to their own min..max, because their
stored range (12, 14 or 16 bits) says nothing about contrast.

Files are only ever opened read-only. Special files (FIFOs, devices) are
refused before opening, since opening a FIFO would block forever.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from breastcad.errors import ImageReadError

# 40 megapixels admits full-field mammograms (about 5000 x 6000 = 30 MP) while
# refusing decompression bombs long before they exhaust memory.
DEFAULT_MAX_PIXELS = 40_000_000

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm", ".dcm", ".dicom"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# Never silently accept half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _one_line(text: object) -> str:
    """Collapse a library's (possibly multi-line) message to one line."""
    return " ".join(str(text).split())


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def check_regular_file(path: str | Path) -> None:
    """Raise ImageReadError unless ``path`` is a readable-looking regular file."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise ImageReadError(p, "broken symbolic link") from None
        raise ImageReadError(p, "no such file") from None
    except PermissionError:
        raise ImageReadError(p, "permission denied") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageReadError(p, "symbolic link loop") from None
        raise ImageReadError(p, f"cannot access file ({_one_line(err.strerror or err)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(p, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(p, "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        raise ImageReadError(p, "empty file (0 bytes)")


def read_bytes(path: str | Path) -> bytes:
    """Read a whole file read-only, with one-line errors."""
    check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except PermissionError:
        raise ImageReadError(str(path), "permission denied") from None
    except OSError as err:
        problem = f"cannot read file ({_one_line(err.strerror or err)})"
        raise ImageReadError(str(path), problem) from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


def _looks_like_dicom(data: bytes, path: str) -> bool:
    return Path(path).suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"


def _window(arr: np.ndarray) -> np.ndarray:
    """Min-max window a high-bit-depth array to [0, 1] (constant images -> 0)."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def _decode_dicom(data: bytes, path: str, max_pixels: int) -> np.ndarray:
    import io

    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # A damaged header makes pydicom raise almost any type (NotImplementedError for an
    # unknown VR, BytesLengthException, struct errors...), so catch them all here.
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            raise ImageReadError(path, "DICOM file has no pixel data")
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(path, f"not a readable DICOM file ({_one_line(err)})") from None
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) is not supported")
    if rows * cols > max_pixels:
        raise ImageReadError(
            path, f"image is {cols} x {rows} = {rows * cols} pixels, over the limit of {max_pixels}"
        )
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for unsupported transfer syntaxes
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({_one_line(err)})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    elif arr.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data has unsupported shape {arr.shape}")
    try:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds, index=0)
    except Exception as err:  # e.g. WindowWidth 0, a non-numeric RescaleSlope
        raise ImageReadError(
            path, f"invalid DICOM rescale or window values ({_one_line(err)})"
        ) from None
    out = _window(np.asarray(arr))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores bright tissue as low values
    return out


def _open_pil(data: bytes, path: str, max_pixels: int) -> Image.Image:
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageReadError(
                    path, f"image is {w} x {h} = {w * h} pixels, over the limit of {max_pixels}"
                )
            img.load()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, f"image is over the pixel limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"truncated or corrupt image data ({_one_line(err)})") from None
    except Exception as err:  # a damaged file can make a decoder raise anything
        raise ImageReadError(
            path, f"cannot decode image ({type(err).__name__}: {_one_line(err)})"
        ) from None
    return img


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _window(np.asarray(img))
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode != "L":
        # Palette, RGB(A), LA, CMYK, YCbCr: ITU-R 601 luminance; alpha is ignored.
        img = img.convert("RGB").convert("L") if mode in ("RGBA", "LA", "PA") else img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def decode_image(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, dicom: bool | None = None
) -> np.ndarray:
    """Decode image bytes to a 2-D float32 array in [0, 1]; ``name`` only labels errors.

    ``dicom`` None decides from the bytes (DICM preamble) and the name. Every
    failure is an :class:`ImageReadError`, whatever the decoder raised.
    """
    if _looks_like_dicom(data, name) if dicom is None else dicom:
        return _decode_dicom(data, name, max_pixels)
    img = _open_pil(data, name, max_pixels)
    try:
        arr = _pil_to_gray(img)
    except (ValueError, OSError, TypeError) as err:  # e.g. LAB or other unconvertible modes
        problem = f"cannot convert {img.mode} pixels to grayscale ({_one_line(err)})"
        raise ImageReadError(name, problem) from None
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(name, f"unsupported image layout {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to a 2-D float32 array with values in [0, 1]."""
    p = str(path)
    return decode_image(read_bytes(p), p, max_pixels)


def read_mask(paths: tuple[str, ...] | list[str], shape: tuple[int, int]) -> np.ndarray:
    """Union of lesion masks as a bool array of ``shape`` (H, W).

    Masks may be 1-bit, L, RGB, RGBA or DICOM (CBIS-DDSM's ROI masks); any
    non-zero colour channel counts as lesion. A mask whose size differs from the
    image is resized (nearest). No masks gives an all-false array (a normal
    image has no lesion).
    """
    out = np.zeros(shape, dtype=bool)
    for mp in paths:
        data = read_bytes(mp)
        if _looks_like_dicom(data, mp):
            img = Image.fromarray(_decode_dicom(data, mp, DEFAULT_MAX_PIXELS) > 0)
        else:
            img = _open_pil(data, mp, DEFAULT_MAX_PIXELS)
        if img.mode in ("RGBA", "LA", "PA", "P"):
            img = img.convert("RGBA")
            arr = np.asarray(img)[..., :3].max(axis=-1)
        elif img.mode == "RGB":
            arr = np.asarray(img).max(axis=-1)
        else:
            arr = np.asarray(img.convert("L") if img.mode not in ("1", "L") else img)
        m = Image.fromarray((np.asarray(arr) > 0).astype(np.uint8) * 255)
        if m.size != (shape[1], shape[0]):
            m = m.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        out |= np.asarray(m) > 0
    return out

"""Shared fixtures: tiny synthetic images, DICOMs and dataset trees in ``tmp_path``.

Everything is written on the fly (a few bytes each) so the suite needs no data
files and stays fast. Fault injection never relies on chmod (CI runs as root).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.errors import BreastcadError, printable


def _under(tmp_path: Path, name: str | Path) -> Path:
    path = Path(name)
    if not path.is_absolute():
        path = tmp_path / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def png_bytes(arr: np.ndarray | Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    """Encode an array (or PIL image) in memory."""
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming ``width`` x ``height`` (8-bit gray), no real data.

    Cheap way to test the pixel limit on a real file header without allocating.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """``write_image(name, array_or_pil, fmt=None, **save_kwargs) -> Path`` under tmp_path."""

    def _write(name: str | Path, arr, fmt: str | None = None, **save_kwargs) -> Path:
        path = _under(tmp_path, name)
        img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
        img.save(path, format=fmt, **save_kwargs)
        return path

    return _write


@pytest.fixture
def write_bytes(tmp_path: Path) -> Callable[[str | Path, bytes], Path]:
    """``write_bytes(name, data) -> Path`` under tmp_path."""

    def _write(name: str | Path, data: bytes) -> Path:
        path = _under(tmp_path, name)
        path.write_bytes(data)
        return path

    return _write


@pytest.fixture
def write_dicom(tmp_path: Path) -> Callable[..., Path]:
    """``write_dicom(name, pixels, photometric=..., pixel_data=True, preamble=True, **attrs)``.

    Writes a 16-bit-allocated, 12-bit-stored, unsigned, single-sample DICOM with
    Explicit VR Little Endian. ``attrs`` are set on the dataset (e.g.
    ``RescaleSlope=1``, ``WindowCenter=0``, ``Rows=10`` to lie about the size).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def _write(
        name: str | Path,
        pixels: np.ndarray,
        photometric: str = "MONOCHROME2",
        pixel_data: bool = True,
        preamble: bool = True,
        transfer_syntax=ExplicitVRLittleEndian,
        **attrs,
    ) -> Path:
        path = _under(tmp_path, name)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "US"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        if pixel_data:
            ds.PixelData = np.asarray(pixels, dtype="<u2").tobytes()
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(str(path), enforce_file_format=preamble)
        return path

    return _write


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """``make_tree(root, [relative paths])``: image-named files get a 2x2 PNG, others text.

    Returns the root (created even when the list is empty).
    """
    tiny = png_bytes(np.full((2, 2), 128, dtype=np.uint8))

    def _make(root: str | Path, files: list[str] | tuple[str, ...] = ()) -> Path:
        base = _under(tmp_path, root)
        base.mkdir(parents=True, exist_ok=True)
        for rel in files:
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".dcm"}:
                path.write_bytes(tiny)
            else:
                path.write_text("not an image\n")
        return base

    return _make


@pytest.fixture
def assert_clean_error() -> Callable[..., BreastcadError]:
    """Check the project rule for user-facing errors and return the error.

    ``assert_clean_error(err, path, *fragments)``: one line, names ``path``,
    contains every fragment, and can be printed (encoded) whatever the name.
    """

    def _check(err: BaseException, path: str | Path | None, *fragments: str) -> BreastcadError:
        assert isinstance(err, BreastcadError), f"raw {type(err).__name__}: {err}"
        msg = str(err)
        assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
        if path is not None:
            shown = printable(str(path))  # names are shown escaped when not printable
            assert shown in msg, f"path {shown!r} missing from {msg!r}"
            msg.encode("utf-8")  # strictly encodable: no surrogates reach the terminal
        for fragment in fragments:
            assert fragment in msg, f"{fragment!r} missing from {msg!r}"
        msg.encode("utf-8", "backslashreplace")  # printable whatever the file name
        return err

    return _check


@pytest.fixture
def encode_image() -> Callable[..., bytes]:
    """``encode_image(array_or_pil, fmt="PNG", **save_kwargs) -> bytes`` (in memory)."""
    return png_bytes


@pytest.fixture
def png_header() -> Callable[[int, int], bytes]:
    """``png_header(width, height) -> bytes``: a valid PNG header claiming that size."""
    return png_header_only

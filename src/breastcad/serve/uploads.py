"""Uploaded bytes -> a decoded image, in memory, with an HTTP status for every failure.

Nothing here touches the disk: the body is read into memory (bounded), the
multipart form is parsed in memory (Starlette's own form parser would spool
large files to a temporary file), and the image is decoded from the bytes.
Errors name the problem, never the upload's contents (DICOM patient fields
included): the client's file name is not echoed either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from breastcad.errors import ImageReadError

# Declared types accepted for an upload. A generic or missing type is accepted and
# the content decides; a concrete type outside this list is refused with 415.
ACCEPTED_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/x-portable-graymap",
        "image/x-portable-pixmap",
        "image/x-portable-anymap",
        "image/x-portable-bitmap",
        "application/dicom",
    }
)
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# Formats recognised by content that are still not accepted (415, not 422).
REFUSED_FORMATS = {
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"%PDF-": "application/pdf",
}
MAX_PARTS = 8


class UploadError(Exception):
    """A request problem, with its HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Upload:
    data: bytes
    declared_type: str


def base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniff(data: bytes) -> str | None:
    """The accepted format the bytes are in, by their magic number (None if none)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"BM") and len(data) > 26:
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if len(data) > 3 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "image/x-portable-anymap"
    if data[128:132] == b"DICM":
        return "application/dicom"
    return None


def refused_format(data: bytes) -> str | None:
    """A format recognised by content that is not accepted (GIF, WebP, PDF), else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, kind in REFUSED_FORMATS.items():
        if data.startswith(magic):
            return kind
    return None


def parse_multipart(body: bytes, content_type: str) -> Upload:
    """The uploaded file of a multipart/form-data body (field ``file``, or the first file)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "bad_multipart", "multipart/form-data without a boundary")
    parts: list[dict] = []
    state: dict = {}

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise UploadError(400, "bad_multipart", f"more than {MAX_PARTS} form fields")
        parts.append({"headers": {}, "data": []})
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except UploadError:
        raise
    except Exception:  # python_multipart raises its own types for malformed bodies
        raise UploadError(400, "bad_multipart", "malformed multipart/form-data body") from None
    chosen = None
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        is_file = b"filename" in disp
        if disp.get(b"name") == b"file" or (chosen is None and is_file):
            chosen = part
            if disp.get(b"name") == b"file":
                break
    if chosen is None:
        raise UploadError(
            400, "no_file", "no file in the form: send the image as the form field 'file'"
        )
    ctype = chosen["headers"].get(b"content-type", b"").decode("latin-1")
    return Upload(data=b"".join(chosen["data"]), declared_type=base_type(ctype))


def check_type(upload: Upload) -> str | None:
    """Refuse types that are not accepted (415); the format sniffed from the content."""
    declared = upload.declared_type
    if declared not in ACCEPTED_TYPES and declared not in GENERIC_TYPES:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"{declared[:80]} is not accepted; send PNG, JPEG, BMP, TIFF, PGM/PNM or DICOM",
        )
    kind = refused_format(upload.data)
    if kind is not None:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"the upload is {kind}, which is not accepted; "
            "send PNG, JPEG, BMP, TIFF, PGM/PNM or DICOM",
        )
    return sniff(upload.data)


def decode(upload: Upload, max_pixels: int) -> np.ndarray:
    """The upload as a 2-D float32 image in [0, 1], decoded in memory."""
    from breastcad.data import imageio

    if not upload.data:
        raise UploadError(400, "empty_upload", "the uploaded file is empty (0 bytes)")
    kind = check_type(upload)
    name = "upload"
    is_dicom = kind == "application/dicom" or (
        kind is None and upload.declared_type == "application/dicom"
    )
    if kind is None and not is_dicom:
        raise UploadError(
            422,
            "not_an_image",
            "the upload is not a recognised image (PNG, JPEG, BMP, TIFF, PGM/PNM or DICOM)",
        )
    try:
        arr = imageio.decode_image(upload.data, name, max_pixels, dicom=is_dicom)
    except ImageReadError as err:
        problem = err.problem
        if is_dicom:
            # a decoder's own message could quote header values: keep only our words
            problem = problem.split(" (", 1)[0]
        if "over the limit" in problem or "pixel limit" in problem:
            raise UploadError(413, "too_many_pixels", problem) from None
        raise UploadError(422, "unreadable_image", problem) from None
    except MemoryError:
        raise UploadError(413, "too_many_pixels", "the image is too large to decode") from None
    except Exception as err:  # e.g. a pixel mode PIL cannot convert to grayscale
        raise UploadError(
            422, "unreadable_image", f"cannot convert the image ({type(err).__name__})"
        ) from None
    if not np.isfinite(arr).all():
        raise UploadError(422, "unreadable_image", "the image has non-finite pixel values")
    return np.ascontiguousarray(arr, dtype=np.float32)

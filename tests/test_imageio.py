"""read_image / read_mask: every format to float32 [0, 1], and clean one-line errors."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from breastcad.data import imageio
from breastcad.data.imageio import (
    DEFAULT_MAX_PIXELS,
    file_sha256,
    is_image_name,
    read_image,
    read_mask,
)
from breastcad.errors import ImageReadError

# 3 x 5 on purpose: a transposed result would have the wrong shape.
GRAY = np.array(
    [[0, 1, 51, 102, 128], [153, 200, 254, 255, 7], [9, 10, 11, 12, 13]], dtype=np.uint8
)
WIDE16 = np.array([[100, 1100, 600], [60100, 30100, 100]], dtype=np.uint16)
WIDE16_EXPECTED = (WIDE16.astype(np.float64) - 100) / 60000


def _check_gray(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == shape
    assert out.flags["C_CONTIGUOUS"]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def _raises(fn, *args, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("g.png", "PNG"), ("g.bmp", "BMP"), ("g.tif", "TIFF"), ("g.pgm", "PPM")],
)
def test_8bit_gray_is_divided_by_255(write_image, name, fmt):
    path = write_image(name, GRAY, fmt)
    out = read_image(path)
    _check_gray(out, (3, 5))
    np.testing.assert_array_equal(out, GRAY.astype(np.float32) / 255.0)


def test_str_and_path_give_the_same_result(write_image):
    path = write_image("g.png", GRAY)
    np.testing.assert_array_equal(read_image(str(path)), read_image(path))


def test_1bit_png_is_zero_or_one(write_image):
    bits = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=bool)
    path = write_image("bits.png", bits)
    assert Image.open(path).mode == "1"
    out = read_image(path)
    _check_gray(out, (2, 4))
    np.testing.assert_array_equal(out, bits.astype(np.float32))


@pytest.mark.parametrize(("name", "fmt"), [("w.png", "PNG"), ("w.tif", "TIFF"), ("w.pgm", "PPM")])
def test_16bit_is_windowed_to_its_own_min_max(write_image, name, fmt):
    path = write_image(name, WIDE16, fmt)
    out = read_image(path)
    _check_gray(out, (2, 3))
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0] == 0.0 and out[1, 0] == 1.0  # min -> 0, max -> 1
    np.testing.assert_allclose(out, WIDE16_EXPECTED, atol=1e-6)


def test_16bit_constant_image_is_all_zero(write_image):
    path = write_image("flat.png", np.full((2, 2), 4000, dtype=np.uint16))
    out = read_image(path)
    _check_gray(out, (2, 2))
    assert not out.any()


def test_16bit_narrow_range_uses_full_contrast(write_image):
    # 12-bit data stored in 16 bits: 1000..1010 must still span 0..1.
    arr = np.array([[1000, 1005, 1010]], dtype=np.uint16)
    out = read_image(write_image("narrow.png", arr))
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0]], atol=1e-6)


# ITU-R 601 luma of pure red, green, blue, white, black (Pillow rounds to 8 bits).
RGB = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8
)
RGB_LUMA = np.array([[76, 150, 29, 255, 0]], dtype=np.float32) / 255.0


@pytest.mark.parametrize(("name", "fmt"), [("c.png", "PNG"), ("c.bmp", "BMP"), ("c.tif", "TIFF")])
def test_rgb_becomes_luminance(write_image, name, fmt):
    out = read_image(write_image(name, RGB, fmt))
    _check_gray(out, (1, 5))
    np.testing.assert_allclose(out, RGB_LUMA, atol=1.01 / 255)


@pytest.mark.parametrize("alpha", [0, 77, 255])
def test_rgba_alpha_is_ignored(write_image, alpha):
    rgba = np.concatenate([RGB, np.full((1, 5, 1), alpha, dtype=np.uint8)], axis=-1)
    out = read_image(write_image(f"a{alpha}.png", rgba))
    rgb_out = read_image(write_image("rgb.png", RGB))
    _check_gray(out, (1, 5))
    np.testing.assert_array_equal(out, rgb_out)


def test_gray_alpha_png_ignores_alpha(write_image):
    la = np.stack([GRAY, np.zeros_like(GRAY)], axis=-1)
    out = read_image(write_image("la.png", Image.fromarray(la, "LA")))
    np.testing.assert_allclose(out, GRAY / 255.0, atol=1e-6)


def test_palette_png_uses_palette_colours(write_image):
    img = Image.new("P", (3, 2))
    img.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 2, 1, 0])
    path = write_image("pal.png", img)
    assert Image.open(path).mode == "P"
    out = read_image(path)
    _check_gray(out, (2, 3))
    np.testing.assert_allclose(out, [[0, 1, 76 / 255], [76 / 255, 1, 0]], atol=1e-6)


@pytest.mark.parametrize(("cmyk", "expected"), [((0, 0, 0, 0), 1.0), ((0, 0, 0, 255), 0.0)])
def test_cmyk_jpeg(write_image, cmyk, expected):
    path = write_image("c.jpg", Image.new("CMYK", (8, 6), cmyk), "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = read_image(path)
    _check_gray(out, (6, 8))
    np.testing.assert_allclose(out, expected, atol=0.02)


def test_grayscale_jpeg(write_image):
    path = write_image("g.jpeg", np.full((6, 8), 128, dtype=np.uint8), "JPEG", quality=95)
    assert Image.open(path).mode == "L"
    out = read_image(path)
    _check_gray(out, (6, 8))
    np.testing.assert_allclose(out, 128 / 255, atol=2 / 255)


def test_uppercase_suffix_is_read(write_image):
    out = read_image(write_image("UPPER.PNG", GRAY, "PNG"))
    np.testing.assert_array_equal(out, GRAY.astype(np.float32) / 255.0)


# --------------------------------------------------------------------------- DICOM

STORED = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
RAMP = np.array([[0, 1000, 1024, 1048, 2000]], dtype=np.uint16)


def test_dicom_monochrome2(write_dicom):
    out = read_image(write_dicom("m2.dcm", STORED))
    _check_gray(out, (2, 2))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_monochrome1_is_inverted(write_dicom):
    out = read_image(write_dicom("m1.dcm", STORED, photometric="MONOCHROME1"))
    _check_gray(out, (2, 2))
    assert out[1, 1] == 0.0  # brightest stored value -> 0
    assert out[0, 0] == 1.0
    np.testing.assert_allclose(out, [[1.0, 0.75], [0.5, 0.0]], atol=1e-6)


def test_dicom_rescale_alone_is_linear_so_windowing_hides_it(write_dicom):
    plain = read_image(write_dicom("plain.dcm", RAMP))
    rescaled = read_image(
        write_dicom("rs.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US")
    )
    _check_gray(rescaled, (1, 5))
    np.testing.assert_allclose(rescaled, plain, atol=1e-6)
    np.testing.assert_allclose(rescaled, RAMP / 2000.0, atol=1e-6)


def test_dicom_window_is_applied(write_dicom):
    out = read_image(write_dicom("w.dcm", RAMP, WindowCenter=1024, WindowWidth=48))
    _check_gray(out, (1, 5))
    assert out[0, 0] == 0.0 and out[0, 1] == 0.0  # below the window -> black
    assert out[0, 3] == 1.0 and out[0, 4] == 1.0  # above the window -> white
    assert out[0, 2] == pytest.approx(0.5, abs=0.02)  # centre -> mid grey


def test_dicom_window_is_in_rescaled_units(write_dicom):
    # Stored 1024 is 0 after the rescale: a window centred on 0 must land there.
    out = read_image(
        write_dicom(
            "hu.dcm", RAMP, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=48
        )
    )
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=0.02)
    # Without the rescale the same window sits at stored 0 and saturates the rest.
    raw = read_image(write_dicom("raw.dcm", RAMP, WindowCenter=0, WindowWidth=48))
    np.testing.assert_allclose(raw, [[0.0, 1.0, 1.0, 1.0, 1.0]], atol=0.02)


def test_dicom_monochrome1_with_window(write_dicom):
    out = read_image(
        write_dicom("m1w.dcm", RAMP, photometric="MONOCHROME1", WindowCenter=1024, WindowWidth=48)
    )
    np.testing.assert_allclose(out, [[1.0, 1.0, 0.5, 0.0, 0.0]], atol=0.02)


@pytest.mark.parametrize("name", ["IM000001", "scan.png", "scan.jpg", "noext."])
def test_dicom_detected_by_preamble_without_dcm_suffix(write_dicom, name):
    path = write_dicom(name, STORED)
    assert path.read_bytes()[128:132] == b"DICM"
    np.testing.assert_allclose(read_image(path), [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_without_preamble_detected_by_suffix(write_dicom):
    path = write_dicom("bare.dcm", STORED, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(path), [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_without_pixel_data(write_dicom, assert_clean_error):
    path = write_dicom("nopix.dcm", STORED, pixel_data=False)
    assert_clean_error(_raises(read_image, path), path, "no pixel data")


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({"WindowCenter": 1024, "WindowWidth": 0}, "invalid DICOM rescale or window values"),
        ({"NumberOfFrames": 2}, "multi-frame DICOM (2 frames) is not supported"),
        ({"Rows": 10, "Columns": 10}, "cannot decode DICOM pixel data"),
        ({"Rows": 10000, "Columns": 10000}, "over the limit of 40000000"),
    ],
    ids=["window-width-0", "multi-frame", "short-pixel-data", "huge-header"],
)
def test_dicom_bad_headers(write_dicom, assert_clean_error, attrs, fragment):
    path = write_dicom("bad.dcm", STORED, **attrs)
    assert_clean_error(_raises(read_image, path), path, fragment)


def test_dicom_over_pixel_limit(write_dicom, assert_clean_error):
    path = write_dicom("big.dcm", STORED)
    err = _raises(read_image, path, max_pixels=3)
    assert_clean_error(err, path, "image is 2 x 2 = 4 pixels, over the limit of 3")


def test_dicom_undecodable_compressed_pixels_one_line(write_dicom, assert_clean_error):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = write_dicom(
        "jpeg.dcm",
        STORED,
        pixel_data=False,
        transfer_syntax=JPEGBaseline8Bit,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=encapsulate([b"\xff\xd8not a jpeg\xff\xd9"]),
    )
    # pydicom lists every decoder plugin on its own line; the message must stay one line.
    assert_clean_error(_raises(read_image, path), path, "cannot decode DICOM pixel data")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "payload",
    [b"hello, world\n" * 20, bytes(range(256)) * 8, b"\0" * 128 + b"DICM" + b"\xff" * 64],
    ids=["text", "bytes", "preamble-then-garbage"],
)
def test_garbage_named_dcm_gives_clean_error(write_bytes, assert_clean_error, payload):
    path = write_bytes("junk.dcm", payload)
    assert_clean_error(_raises(read_image, path), path)


def test_damaged_dicom_header_gives_clean_error(write_dicom, write_bytes, assert_clean_error):
    good = write_dicom("good.dcm", STORED).read_bytes()
    # Corrupt the VR of every element in group 0028 (Rows, Columns...): pydicom then
    # raises NotImplementedError / BytesLengthException, not an InvalidDicomError.
    bad = bytearray(good)
    for i in range(len(bad) - 4):
        if bad[i : i + 2] == b"\x28\x00" and bad[i + 4 : i + 6] == b"US":
            bad[i + 4 : i + 6] = b"\x55\xcd"
    path = write_bytes("damaged.dcm", bytes(bad))
    assert_clean_error(_raises(read_image, path), path)


# --------------------------------------------------------------------------- errors


def _corrupt_png(tmp_path, enc):
    path = tmp_path / "corrupt.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


def _truncated_png(tmp_path, enc):
    data = enc(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _zero_bytes(tmp_path, enc):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def _text_png(tmp_path, enc):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    return path


def _directory(tmp_path, enc):
    path = tmp_path / "x.png"
    path.mkdir()
    return path


def _broken_link(tmp_path, enc):
    path = tmp_path / "dangling.png"
    os.symlink(tmp_path / "nowhere.png", path)
    return path


def _link_loop(tmp_path, enc):
    path = tmp_path / "loop.png"
    os.symlink(path.name, path)  # points at itself
    return path


def _missing(tmp_path, enc):
    return tmp_path / "missing.png"


def _bad_header_crc_png(tmp_path, enc):
    data = bytearray(enc(np.zeros((4, 4), dtype=np.uint8)))
    data[29] ^= 0xFF  # inside the IHDR CRC: Pillow no longer recognises the file
    path = tmp_path / "crc.png"
    path.write_bytes(bytes(data))
    return path


def _corrupt_pixel_stream_png(tmp_path, enc):
    data = bytearray(enc(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)))
    start = data.index(b"IDAT") + 6  # past the chunk type and the zlib header
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    path = tmp_path / "stream.png"
    path.write_bytes(bytes(data))
    return path


ERROR_CASES = [
    (_corrupt_png, "not a recognised image format"),
    (_truncated_png, "truncated or corrupt image data"),
    (_zero_bytes, "empty file (0 bytes)"),
    (_text_png, "not a recognised image format"),
    (_directory, "is a directory, not an image file"),
    (_broken_link, "broken symbolic link"),
    (_link_loop, "symbolic link loop"),
    (_missing, "no such file"),
    (_bad_header_crc_png, "not a recognised image format"),
    (_corrupt_pixel_stream_png, "truncated or corrupt image data (broken data stream"),
]


@pytest.mark.parametrize(
    ("build", "fragment"), ERROR_CASES, ids=[c[0].__name__.strip("_") for c in ERROR_CASES]
)
def test_bad_files_give_one_line_errors(
    tmp_path, encode_image, assert_clean_error, build, fragment
):
    path = build(tmp_path, encode_image)
    err = _raises(read_image, path)
    assert_clean_error(err, path, fragment)
    assert err.path == str(path)
    assert str(err) == f"{path}: {err.problem}"


@pytest.mark.parametrize(
    ("build", "fragment"), ERROR_CASES, ids=[c[0].__name__.strip("_") for c in ERROR_CASES]
)
def test_bad_mask_files_give_one_line_errors(
    tmp_path, encode_image, assert_clean_error, build, fragment
):
    path = build(tmp_path, encode_image)
    err = _raises(read_mask, (str(path),), (4, 4))
    assert_clean_error(err, path, fragment)


def _in_thread(fn, timeout: float = 5.0):
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread, box


@pytest.mark.parametrize("reader", ["read_image", "read_mask", "file_sha256"])
def test_fifo_is_refused_without_blocking(tmp_path, assert_clean_error, reader):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    calls = {
        "read_image": lambda: read_image(fifo),
        "read_mask": lambda: read_mask((str(fifo),), (2, 2)),
        "file_sha256": lambda: file_sha256(fifo),
    }
    start = time.monotonic()
    thread, box = _in_thread(calls[reader])
    if thread.is_alive():
        # Unblock the reader stuck in open() so the thread can end, then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"{reader} blocked on a FIFO")
    assert time.monotonic() - start < 2.0
    assert_clean_error(box["error"], fifo, "not a regular file")


def test_pixel_limit_argument(write_image, assert_clean_error):
    path = write_image("g.png", GRAY)
    err = _raises(read_image, path, max_pixels=14)
    assert_clean_error(err, path, "image is 5 x 3 = 15 pixels, over the limit of 14")
    assert read_image(path, max_pixels=15).shape == (3, 5)  # the limit itself is allowed


def test_default_pixel_limit_on_real_png_header(write_bytes, png_header, assert_clean_error):
    path = write_bytes("huge.png", png_header(7000, 7000))
    assert 7000 * 7000 > DEFAULT_MAX_PIXELS
    start = time.monotonic()
    err = _raises(read_image, path)
    assert time.monotonic() - start < 2.0  # refused from the header, nothing decoded
    assert_clean_error(
        err, path, f"image is 7000 x 7000 = 49000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}"
    )


def test_decompression_bomb_header(write_bytes, png_header, assert_clean_error):
    # Past Pillow's own bomb threshold: Image.open itself refuses it.
    path = write_bytes("bomb.png", png_header(100_000, 100_000))
    err = _raises(read_image, path)
    assert_clean_error(err, path, f"over the pixel limit of {DEFAULT_MAX_PIXELS}")


def test_pixel_limit_does_not_leak_warning_filter(write_bytes, png_header):
    import warnings

    _raises(read_image, write_bytes("bomb.png", png_header(100_000, 100_000)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("probe", Image.DecompressionBombWarning, stacklevel=1)
    assert len(caught) == 1  # still a warning, not an error
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------------ injected OS failures


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (PermissionError(), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "cannot read file (Input/output error)"),
        (OSError("disk on fire"), "cannot read file (disk on fire)"),
    ],
    ids=["eacces", "bare-permission", "eio", "no-errno"],
)
def test_open_failures(monkeypatch, write_image, assert_clean_error, exc, fragment):
    path = write_image("g.png", GRAY)

    def failing_open(file, *args, **kwargs):
        raise exc

    monkeypatch.setattr(imageio, "open", failing_open, raising=False)
    err = _raises(read_image, path)
    assert_clean_error(err, path, fragment)
    assert "None" not in str(err)


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (PermissionError(), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "cannot access file (Input/output error)"),
        (OSError("weird"), "cannot access file (weird)"),
    ],
    ids=["eacces", "bare-permission", "eio", "no-errno"],
)
def test_stat_failures(monkeypatch, write_image, assert_clean_error, exc, fragment):
    path = write_image("g.png", GRAY)
    real_stat = os.stat

    def failing_stat(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise exc
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", failing_stat)
    err = _raises(read_image, path)
    assert_clean_error(err, path, fragment)
    assert "None" not in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        struct.error("unpack requires a buffer of 4 bytes"),
        EOFError(),
        IndexError("tile"),
        KeyError(7),
    ],
    ids=["struct", "eof", "index", "key"],
)
def test_unexpected_decoder_exceptions_become_clean_errors(
    monkeypatch, write_image, assert_clean_error, exc
):
    # Damaged files make some Pillow plugins raise types other than OSError.
    path = write_image("g.png", GRAY)

    def broken_open(*args, **kwargs):
        raise exc

    monkeypatch.setattr(Image, "open", broken_open)
    err = _raises(read_image, path)
    assert_clean_error(err, path, f"cannot decode image ({type(exc).__name__}")


def test_one_bad_file_does_not_stop_the_others(write_image, write_bytes):
    paths = [
        write_image("a.png", GRAY),
        write_bytes("b.png", b"garbage"),
        write_image("c.bmp", GRAY, "BMP"),
    ]
    good, bad = [], []
    for p in paths:
        try:
            good.append(read_image(p))
        except ImageReadError as err:
            bad.append(err.path)
    assert len(good) == 2 and bad == [str(paths[1])]
    np.testing.assert_array_equal(good[0], good[1])


# -------------------------------------------------------------- non-UTF-8 names

needs_bytes_names = pytest.mark.skipif(
    sys.platform != "linux" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
    reason="needs a POSIX file system that accepts undecodable byte names",
)
LATIN1_NAME = os.fsdecode(b"caf\xe9.png")  # 'caf\udce9.png' via surrogateescape


@needs_bytes_names
def test_non_utf8_name_readable(tmp_path, encode_image):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(raw, "wb") as fh:
        fh.write(encode_image(GRAY))
    path = tmp_path / LATIN1_NAME
    assert path.exists()
    np.testing.assert_array_equal(read_image(path), GRAY.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(read_image(os.fsdecode(raw)), read_image(path))


@needs_bytes_names
@pytest.mark.parametrize("content", [b"garbage bytes", b""], ids=["corrupt", "empty"])
def test_non_utf8_name_unreadable(tmp_path, assert_clean_error, content):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(raw, "wb") as fh:
        fh.write(content)
    path = os.fsdecode(raw)
    err = _raises(read_image, path)
    assert_clean_error(err, path)
    printable = str(err).encode("utf-8", "backslashreplace")
    assert b"caf\\udce9.png" in printable
    assert printable.startswith(os.fsencode(tmp_path))


@needs_bytes_names
def test_non_utf8_name_missing(tmp_path, assert_clean_error):
    path = str(tmp_path / LATIN1_NAME)
    err = _raises(read_image, path)
    assert_clean_error(err, path, "no such file")


# ------------------------------------------------------------ files stay untouched


@pytest.fixture
def open_modes(monkeypatch):
    """Record the mode of every open() made by imageio."""
    modes: list[str] = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        modes.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(imageio, "open", spy, raising=False)
    return modes


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff16", "dicom", "mask", "corrupt"])
def test_files_are_not_modified(write_image, write_dicom, write_bytes, open_modes, kind):
    if kind == "png":
        path = write_image("a.png", GRAY)
    elif kind == "jpeg":
        path = write_image("a.jpg", GRAY, "JPEG")
    elif kind == "tiff16":
        path = write_image("a.tif", WIDE16, "TIFF")
    elif kind == "dicom":
        path = write_dicom("a.dcm", STORED)
    elif kind == "mask":
        path = write_image("a_mask.png", (GRAY > 100).astype(np.uint8) * 255)
    else:
        path = write_bytes("bad.png", b"\x89PNG\r\n\x1a\n garbage")
    old = 1_000_000_000
    os.utime(path, ns=(old, old))
    before = path.read_bytes()
    st = os.stat(path)
    try:
        if kind == "mask":
            read_mask((str(path),), (3, 5))
        else:
            read_image(path)
    except ImageReadError:
        assert kind == "corrupt"
    after = os.stat(path)
    assert path.read_bytes() == before
    assert after.st_mtime_ns == st.st_mtime_ns == old
    assert (after.st_size, after.st_mode, after.st_ino) == (st.st_size, st.st_mode, st.st_ino)
    assert open_modes and all(m in ("r", "rb") for m in open_modes)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mode", ["1", "L", "L01", "RGB", "RGBA", "P", "I16"])
def test_read_mask_modes(write_image, mode):
    lesion = np.zeros((3, 5), dtype=bool)
    lesion[1, 1:4] = True
    lesion[0, 0] = True
    if mode == "1":
        img = Image.fromarray(lesion)
    elif mode == "L":
        img = Image.fromarray(lesion.astype(np.uint8) * 255)
    elif mode == "L01":  # 0/1 masks are common and must not vanish
        img = Image.fromarray(lesion.astype(np.uint8))
    elif mode == "RGB":  # a lesion drawn in a single colour channel still counts
        arr = np.zeros((3, 5, 3), dtype=np.uint8)
        arr[lesion, 0] = 200
        img = Image.fromarray(arr)
    elif mode == "RGBA":  # opaque black background, opaque white lesion
        arr = np.zeros((3, 5, 4), dtype=np.uint8)
        arr[..., 3] = 255
        arr[lesion, :3] = 255
        img = Image.fromarray(arr)
    elif mode == "P":
        img = Image.new("P", (5, 3))
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
        img.putdata(lesion.astype(np.uint8).ravel().tolist())
    else:
        img = Image.fromarray(lesion.astype(np.uint16) * 1000)
    path = write_image(f"m_{mode}.png", img)
    out = read_mask((str(path),), (3, 5))
    assert out.dtype == bool and out.shape == (3, 5)
    np.testing.assert_array_equal(out, lesion)


def test_read_mask_union_of_two(write_image):
    a = np.zeros((4, 4), dtype=np.uint8)
    b = np.zeros((4, 4), dtype=np.uint8)
    a[0, :2] = 255
    b[3, 2:] = 255
    b[0, 0] = 255  # overlap stays True
    pa, pb = write_image("x_mask.png", a), write_image("x_mask_1.png", b)
    out = read_mask((str(pa), str(pb)), (4, 4))
    expected = (a > 0) | (b > 0)
    np.testing.assert_array_equal(out, expected)
    assert out.sum() == 4
    np.testing.assert_array_equal(read_mask([str(pb), str(pa)], (4, 4)), expected)


def test_read_mask_resizes_nearest(write_image):
    small = np.zeros((4, 4), dtype=np.uint8)
    small[:2, :2] = 255  # top-left quadrant
    out = read_mask((str(write_image("s_mask.png", small)),), (8, 12))
    assert out.shape == (8, 12) and out.dtype == bool
    expected = np.zeros((8, 12), dtype=bool)
    expected[:4, :6] = True
    np.testing.assert_array_equal(out, expected)


def test_read_mask_downsizes_nearest(write_image):
    big = np.zeros((8, 8), dtype=np.uint8)
    big[4:, 4:] = 255
    out = read_mask((str(write_image("b_mask.png", big)),), (2, 2))
    np.testing.assert_array_equal(out, [[False, False], [False, True]])


@pytest.mark.parametrize("empty", [(), []])
def test_read_mask_no_masks_is_all_false(empty):
    out = read_mask(empty, (3, 7))
    assert out.dtype == bool and out.shape == (3, 7)
    assert not out.any()


def test_read_mask_error_names_the_mask(write_image, write_bytes, assert_clean_error):
    good = write_image("ok_mask.png", np.full((2, 2), 255, dtype=np.uint8))
    bad = write_bytes("bad_mask.png", b"nope")
    err = _raises(read_mask, (str(good), str(bad)), (2, 2))
    assert_clean_error(err, bad, "not a recognised image format")
    assert str(good) not in str(err)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("a.PNG", True),
        ("a.jpeg", True),
        ("a.JPG", True),
        ("a.bmp", True),
        ("a.tif", True),
        ("a.tiff", True),
        ("a.pgm", True),
        ("a.dcm", True),
        ("a.dicom", True),
        ("a.txt", False),
        ("a.csv", False),
        ("IM000001", False),
        ("a.png.bak", False),
        (".png", False),
    ],
)
def test_is_image_name(name, expected):
    assert is_image_name(name) is expected


def test_file_sha256_matches_hashlib(write_image):
    path = write_image("a.png", GRAY)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_unconvertible_pixel_mode_is_a_clear_read_error(write_image, assert_clean_error) -> None:
    """A LAB TIFF decodes in PIL but has no grayscale conversion: one line, no traceback."""
    from PIL import Image

    from breastcad.data.imageio import read_image
    from breastcad.errors import ImageReadError

    path = write_image("lab.tif", Image.new("LAB", (8, 8)), fmt="TIFF")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert_clean_error(info.value, path, "grayscale")

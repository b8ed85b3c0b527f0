"""Whole-mammogram preprocessing (breast-crop), high-bit-depth loading and the cache modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.data import cache, mammo
from breastcad.data.imageio import file_sha256, read_image
from breastcad.errors import ConfigError, ImageReadError
from synthetic_mammo import save_16bit_png, synthetic_mammogram

SIZE = 96


def test_breast_region_excludes_the_marker_and_contains_the_lesion() -> None:
    m = synthetic_mammogram(300, 200, seed=1)
    region = mammo.find_breast(m.image)
    assert region.found and not region.flip
    x0, y0, x1, y1 = region.bbox
    ys, xs = np.nonzero(m.breast)
    # the crop holds the whole breast (plus a small margin), and not much more
    assert x0 <= xs.min() and x1 >= xs.max() + 1 and y0 <= ys.min() and y1 >= ys.max() + 1
    assert (x1 - x0) * (y1 - y0) < 1.15 * (np.ptp(xs) + 1) * (np.ptp(ys) + 1)
    # the marker lies outside the crop box entirely
    my, mx = np.nonzero(m.marker)
    assert my.size > 0
    assert not np.any((mx >= x0) & (mx < x1) & (my >= y0) & (my < y1))


def test_marker_is_removed_and_lesion_kept_in_the_model_input() -> None:
    m = synthetic_mammogram(300, 200, seed=2)
    no_marker = m.image.copy()
    no_marker[m.marker] = 0.03
    out = mammo.breast_crop(m.image, SIZE)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    # the marker leaves no trace: the same input as without it, but for a few pixels
    # on the breast's outline (the marker shifts the threshold a little)
    ref = mammo.breast_crop(no_marker, SIZE).astype(float)
    assert np.abs(out - ref).mean() < 2.0
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    # and the padding (where nothing of the breast is) is pure background
    cols = np.nonzero(ref.max(axis=0) > 0)[0]
    assert out[:, cols.max() + 3 :].max() == 0
    # the lesion is there: compare with the same breast without a lesion
    plain = synthetic_mammogram(300, 200, seed=2, lesion=False)
    diff = out.astype(int) - mammo.breast_crop(plain.image, SIZE).astype(int)
    region = mammo.find_breast(m.image)
    x0, y0, x1, y1 = region.bbox
    s = SIZE / max(x1 - x0, y1 - y0)
    expected_area = np.pi * (m.lesion_r * s) ** 2
    changed = diff > 40
    assert 0.5 * expected_area < changed.sum() < 2.0 * expected_area
    # ... where the lesion is, after crop, scale and vertical centring
    cy, cx = np.argwhere(changed).mean(axis=0)
    top = (SIZE - round((y1 - y0) * s)) // 2
    lx, ly = m.lesion_xy
    assert abs(cx - (lx - x0) * s) < 3 and abs(cy - ((ly - y0) * s + top)) < 3


def test_right_facing_breast_is_mirrored_to_the_left() -> None:
    left = synthetic_mammogram(300, 200, seed=3, chest_right=False)
    right = synthetic_mammogram(300, 200, seed=3, chest_right=True)
    assert mammo.find_breast(right.image).flip
    a = mammo.breast_crop(left.image, SIZE).astype(float)
    b = mammo.breast_crop(right.image, SIZE).astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    for out in (a, b):  # chest wall against the left edge, background padding at the right
        assert out[SIZE // 2, :3].min() > 30
        assert out[:, -3:].max() == 0


def test_aspect_ratio_is_kept_with_padding() -> None:
    m = synthetic_mammogram(300, 200, seed=4)
    region = mammo.find_breast(m.image)
    x0, y0, x1, y1 = region.bbox
    crop = mammo.crop_resize(m.image, region, SIZE)
    assert max(crop.shape) == SIZE
    assert crop.shape[1] / crop.shape[0] == pytest.approx((x1 - x0) / (y1 - y0), abs=0.03)
    assert crop.shape[0] == SIZE  # a tall breast: full height, background padding at the right
    out = mammo.breast_crop(m.image, SIZE)
    assert out[:, crop.shape[1] :].max() == 0
    # a wide breast (landscape image) fills the width and is centred vertically
    wide = synthetic_mammogram(120, 300, seed=4)
    crop = mammo.crop_resize(wide.image, mammo.find_breast(wide.image), SIZE)
    assert crop.shape[1] == SIZE and crop.shape[0] < SIZE - 10
    out = mammo.breast_crop(wide.image, SIZE)
    top = (SIZE - crop.shape[0]) // 2
    assert out[:top].max() == 0 and out[top + crop.shape[0] :].max() == 0
    assert np.array_equal(out[top : top + crop.shape[0]], np.clip(np.rint(crop * 255), 0, 255))


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((120, 80), np.float32),
        np.full((120, 80), 0.7, np.float32),
    ],
    ids=["black", "constant"],
)
def test_images_without_a_breast_fall_back_to_the_whole_image(img: np.ndarray) -> None:
    region = mammo.find_breast(img)
    assert not region.found and not region.flip
    assert region.bbox == (0.0, 0.0, 80.0, 120.0)
    out = mammo.breast_crop(img, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8


def test_large_images_are_segmented_on_a_small_copy() -> None:
    m = synthetic_mammogram(1200, 800, seed=5)
    small, scale = mammo.downsample(m.image)
    assert max(small.shape) == mammo.SEG_MAX_SIDE and scale == pytest.approx(512 / 1200, abs=1e-3)
    region = mammo.find_breast(m.image)
    ys, xs = np.nonzero(m.breast)
    x0, y0, x1, y1 = region.bbox
    assert x0 <= xs.min() and x1 >= xs.max() and y0 <= ys.min() + 2 and y1 >= ys.max() - 2


# ---------------------------------------------------------------- 16-bit and DICOM loading


def test_16bit_png_round_trip(tmp_path: Path) -> None:
    m = synthetic_mammogram(300, 200, seed=6)
    path = save_16bit_png(tmp_path / "m.png", m.image, bits=12)
    stored = np.asarray(Image.open(path)).astype(np.float64)
    assert Image.open(path).mode == "I;16" and stored.max() > 255  # really more than 8 bits
    got = read_image(path)
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    assert got.dtype == np.float32 and np.allclose(got, expected, atol=1e-6)


def test_16bit_tiff_and_pgm_round_trip(tmp_path: Path) -> None:
    arr = (np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "m.tif")
    (tmp_path / "m.pgm").write_bytes(b"P5\n10 6\n65535\n" + arr.astype(">u2").tobytes())
    expected = arr / arr.max()
    for name in ("m.tif", "m.pgm"):
        assert np.allclose(read_image(tmp_path / name), expected, atol=1e-6), name


def test_dicom_16bit_monochrome1_round_trip(write_dicom) -> None:
    m = synthetic_mammogram(150, 100, seed=7)
    stored = np.rint(m.image * 65535).astype(np.uint16)
    attrs = {"BitsStored": 16, "HighBit": 15}
    mono2 = read_image(write_dicom("m2.dcm", stored, **attrs))
    mono1 = read_image(write_dicom("m1.dcm", 65535 - stored, photometric="MONOCHROME1", **attrs))
    expected = (stored - float(stored.min())) / float(stored.max() - stored.min())
    assert np.allclose(mono2, expected, atol=1e-6)
    assert np.allclose(mono1, expected, atol=1e-6)  # inverted back: bright tissue is bright
    # and the breast crop of both is the same
    assert np.array_equal(mammo.breast_crop(mono1, 64), mammo.breast_crop(mono2, 64))


def test_dicom_12bit_voi_window_is_applied(write_dicom) -> None:
    stored = np.linspace(0, 4095, 40 * 30).reshape(40, 30).astype(np.uint16)
    got = read_image(write_dicom("w.dcm", stored, WindowCenter=2048, WindowWidth=1024))
    assert got[0, 0] == 0.0 and got[-1, -1] == 1.0
    inside = (stored > 1700) & (stored < 2400)
    assert np.all((got[inside] > 0) & (got[inside] < 1))
    assert np.all(got[stored < 1500] == 0) and np.all(got[stored > 2600] == 1)


def test_pixel_limit_admits_full_field_mammograms_and_refuses_bombs(
    write_bytes, png_header
) -> None:
    mammo_size = write_bytes("big.png", png_header(5000, 6000))
    with pytest.raises(ImageReadError) as err:  # a header only: fails on decoding, not on size
        read_image(mammo_size)
    assert "over the limit" not in str(err.value)
    bomb = write_bytes("bomb.png", png_header(9000, 9000))
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(bomb)


# ---------------------------------------------------------------- cache and card modes


def test_load_stack_breast_crop_mode_is_cached_apart(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        m = synthetic_mammogram(240, 160, seed=10 + i, chest_right=bool(i % 2))
        paths.append(str(save_16bit_png(tmp_path / f"m{i}.png", m.image)))
    hashes = [file_sha256(p) for p in paths]
    cdir = tmp_path / "cache"
    crop = cache.load_stack(paths, hashes, 48, cdir, preprocess="breast-crop")
    stretch = cache.load_stack(paths, hashes, 48, cdir)
    assert len(list(cdir.glob("*.npy"))) == 6  # one entry per image and mode
    for i, p in enumerate(paths):
        assert np.array_equal(crop[i], mammo.breast_crop(read_image(p), 48))
        assert np.array_equal(stretch[i], cache.resize_to_uint8(read_image(p), 48))
    again = cache.load_stack(paths, hashes, 48, cdir, preprocess="breast-crop")
    assert np.array_equal(again, crop)
    assert cache.entry_key(hashes[0], 48) != cache.entry_key(hashes[0], 48, "breast-crop")
    with pytest.raises(ConfigError, match="unknown preprocessing mode"):
        cache.load_stack(paths, hashes, 48, cdir, preprocess="crop")


def test_prepare_for_model_follows_the_card() -> None:
    img = synthetic_mammogram(240, 160, seed=20).image
    stretch = cache.resize_to_uint8(img, 32)
    old_card = {"input_size": 32, "preprocessing": {"version": cache.PREPROCESS_VERSION}}
    assert np.array_equal(cache.prepare_for_model(img, old_card), stretch)
    card = {"input_size": 32, "preprocessing": {"mode": "breast-crop"}}
    assert np.array_equal(cache.prepare_for_model(img, card), mammo.breast_crop(img, 32))
    with pytest.raises(ConfigError):
        cache.prepare_for_model(img, {"input_size": 32, "preprocessing": {"mode": "zoom"}})


def test_audit_draws_breast_crop_examples(tmp_path: Path) -> None:
    from breastcad.data.audit import run_audit, write_preprocess_examples
    from breastcad.data.sources import load_source
    from synthetic_mammo import write_mammo_dataset

    manifest = write_mammo_dataset(tmp_path / "d", n_per_class=2, h=150, w=100)
    report = run_audit(load_source(manifest))
    out = tmp_path / "examples.png"
    assert write_preprocess_examples(report, out, n=3, size=64) == 3
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 300


def test_audit_of_mammograms_ignores_the_label_markers(tmp_path: Path) -> None:
    """Every image carries the same burnt-in marker at the same place: on whole images the
    near-duplicate search links them all; with breast-crop it looks at the breast only."""
    from breastcad.data.audit import run_audit
    from breastcad.data.sources import load_source
    from synthetic_mammo import write_mammo_dataset

    src = load_source(write_mammo_dataset(tmp_path / "d", n_per_class=6, h=240, w=160))
    whole = run_audit(src, preprocess="stretch")
    assert max(len(g.members) for g in whole.duplicate_groups) >= 4
    breast = run_audit(src, preprocess="breast-crop")
    assert sum(len(g.members) for g in breast.duplicate_groups) <= 2
    assert breast.pixel_sha256 == whole.pixel_sha256  # exact duplicates: the files as they are
    assert breast.image_sizes == whole.image_sizes

"""scan-crop: an ultrasound frame cropped to its scan, the surround and its furniture dropped."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.config import Config, validate
from breastcad.data.cache import entry_key, prepare_for_model, preprocess, preprocessing_card
from breastcad.data.scan_area import find_scan_area, scan_crop
from breastcad.errors import ConfigError
from synthetic import write_busi_like
from test_cli import FAST, run_cli


def _frame(
    scan: np.ndarray, shape: tuple[int, int], top_left: tuple[int, int], text: bool = True
) -> np.ndarray:
    """``scan`` on a black surround with a scanner's text band above it and a body mark."""
    frame = np.zeros(shape, np.float32)
    y, x = top_left
    frame[y : y + scan.shape[0], x : x + scan.shape[1]] = scan
    if text:
        h, w = shape
        band = frame[max(1, y - 14) : max(1, y - 14) + 7, x + 2 : x + int(0.6 * scan.shape[1])]
        band[:, ::4] = 1.0  # glyph strokes: one pixel wide, bright
        band[::6, 1::4] = 0.8
        frame[h - 12 : h - 4, w - 12 : w - 4] = 0.9  # a small body mark in a corner
        frame[h - 10 : h - 6, w - 10 : w - 6] = 0.0
    return frame


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.clip(0.45 + 0.2 * rng.standard_normal((h, w)), 0.05, 1).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img[np.hypot(yy - 8, xx - w / 2) < 0.15 * w] = 0.01  # an anechoic cyst at the scan's edge
    return img


def test_the_scan_is_found_and_the_text_band_and_marks_are_dropped() -> None:
    rng = np.random.default_rng(0)
    scan = _tissue(rng, 220, 310)
    frame = _frame(scan, (300, 400), (60, 50))
    area = find_scan_area(frame)
    assert area.found
    x0, y0, x1, y1 = area.bbox
    assert abs(x0 - 50) <= 1 and abs(x1 - 360) <= 1
    assert abs(y0 - 60) <= 1 and abs(y1 - 280) <= 1  # the cyst on the top edge does not cut it
    crop = scan_crop(frame, 64)
    assert crop.shape == (64, 64) and crop.dtype == np.uint8
    assert np.array_equal(crop, preprocess(frame[y0:y1, x0:x1], 64))
    assert crop[:, :4].mean() > 60 and crop[-4:].mean() > 60  # no black surround left


def test_the_dim_deep_part_of_the_scan_stays_with_it() -> None:
    """A shadow under a mass or the chest wall: mostly black, some speckle, no empty row."""
    rng = np.random.default_rng(4)
    scan = _tissue(rng, 200, 300)
    deep = np.where(rng.random((60, 300)) < 0.12, 0.1, 0.0).astype(np.float32)
    frame = _frame(np.vstack([scan, deep]), (330, 380), (20, 40), text=False)
    x0, y0, x1, y1 = find_scan_area(frame).bbox
    assert (y0, y1) == (20, 280) and (x0, x1) == (40, 340)
    frame[220:224] = 0  # an empty band between them: the sparse part is another band
    assert find_scan_area(frame).bbox[3] == 220


def test_a_large_frame_loses_its_surround_and_text_band() -> None:
    rng = np.random.default_rng(1)
    frame = _frame(_tissue(rng, 700, 900), (900, 1200), (120, 150))
    x0, y0, x1, y1 = find_scan_area(frame).bbox
    for got, want in ((x0, 150), (y0, 120), (x1, 1050), (y1, 820)):
        assert abs(got - want) <= 1  # the text band above is dropped too


def test_a_frame_without_surround_is_kept_whole_and_nonsense_falls_back() -> None:
    rng = np.random.default_rng(2)
    full = _tissue(rng, 120, 160)
    area = find_scan_area(full)
    assert area.found and area.bbox == (0, 0, 160, 120)
    for img in (np.zeros((100, 100), np.float32), np.full((50, 80), 0.5, np.float32)):
        area = find_scan_area(img)
        assert not area.found and area.bbox == (0, 0, img.shape[1], img.shape[0])
    speck = np.zeros((200, 200), np.float32)
    speck[90:100, 90:100] = 1.0  # a small bright mark only: not a scan
    assert not find_scan_area(speck).found


def test_scan_crop_is_a_mode_with_its_own_cache_key_card_and_config() -> None:
    rng = np.random.default_rng(3)
    frame = _frame(_tissue(rng, 100, 140), (160, 200), (40, 30))
    assert entry_key("ab" * 32, 64, "scan-crop") != entry_key("ab" * 32, 64)
    card = preprocessing_card("scan-crop")
    assert card["mode"] == "scan-crop" and card["mode_version"].startswith("scan-crop")
    model_in = prepare_for_model(frame, {"preprocessing": card, "input_size": 48})
    assert np.array_equal(model_in, scan_crop(frame, 48))
    assert np.array_equal(model_in, preprocess(frame[40:140, 30:170], 48))
    assert not np.array_equal(model_in, preprocess(frame, 48))  # stretch keeps the surround
    cfg = Config()
    cfg.data.preprocess = "scan-crop"
    validate(cfg)
    # a model trained under another version of the rule is refused, not fed other inputs
    old = {"preprocessing": {**card, "mode_version": "scan-crop-v0"}, "input_size": 48}
    with pytest.raises(ConfigError, match="scan-crop-v0"):
        prepare_for_model(frame, old)


def test_a_scan_crop_run_predicts_the_same_for_a_scan_with_or_without_its_surround(
    tmp_path: Path,
) -> None:
    data = write_busi_like(tmp_path / "data", n_per_class=8, size=48)
    run = tmp_path / "run"
    proc = run_cli("train", "--data", str(data), "--out", str(run), *FAST,
                   "--set", "data.preprocess=scan-crop", "--set", "train.threads=1",
                   cache=tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scan = np.asarray(Image.open(data / "malignant" / "malignant (3).png"), np.float32) / 255
    framed = _frame(scan, (100, 110), (30, 40))  # text band above, body mark below
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.rint(scan * 255).astype(np.uint8)).save(inputs / "scan.png")
    Image.fromarray(np.rint(framed * 255).astype(np.uint8)).save(inputs / "framed.png")
    out = tmp_path / "pred.csv"
    proc = run_cli("predict", str(run), str(inputs), "--out", str(out),
                   cache=tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    p_scan, p_framed = (float(rows[n]["prob"]) for n in ("scan.png", "framed.png"))
    assert p_scan == pytest.approx(p_framed, abs=1e-6)

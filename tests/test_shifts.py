"""Appearance shifts (breastcad.shifts) and the site-shift proxy on a run's test folds."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from breastcad import shifts as S
from breastcad.data.imageio import read_image
from breastcad.errors import ConfigError
from breastcad.robustness import read_robustness, robustness_run
from synthetic import write_busi_like
from test_cli import FAST, run_cli


@pytest.fixture
def img() -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:120, 0:160]
    base = 0.3 + 0.4 * (xx / 160) + 0.05 * rng.standard_normal((120, 160))
    base[40:80, 60:100] = 0.1
    return np.clip(base, 0, 1).astype(np.float32)


@pytest.mark.parametrize("shift", list(S.BATTERY.values()), ids=list(S.BATTERY))
def test_every_shift_is_a_pure_bounded_image_function(shift: S.Shift, img: np.ndarray) -> None:
    before = img.copy()
    same = shift.apply(img, shift.identity_level, np.random.default_rng(0))
    assert np.array_equal(same, img)  # the identity level changes nothing
    for level in shift.levels:
        a = shift.apply(img, level, np.random.default_rng(1))
        b = shift.apply(img, level, np.random.default_rng(1))
        assert np.array_equal(img, before)  # input untouched
        assert np.array_equal(a, b)  # same stream, same result
        assert a.ndim == 2 and a.dtype == np.float32
        assert 0.0 <= a.min() and a.max() <= 1.0
        assert not np.array_equal(a, img[: a.shape[0], : a.shape[1]]) or a.shape != img.shape


def test_shift_effects(img: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    assert np.allclose(S.gain(img, 2.0), np.clip(img * 2, 0, 1))
    assert np.allclose(S.gamma(img, 2.0), img**2, atol=1e-6)
    assert S.blur(img, 2.0).std() < img.std()
    assert S.speckle(img, 0.5, rng).std() > img.std()
    low = S.resolution(img, 8.0)
    assert (
        low.shape == img.shape
        and np.abs(np.diff(low, axis=1)).mean() < np.abs(np.diff(img, axis=1)).mean()
    )
    # field of view: the central part, centred, and the crop box clipped to the image
    crop = S.fov_crop(img, 0.5)
    assert crop.shape == (60, 80)
    assert np.array_equal(crop, img[30:90, 40:120])
    assert S.crop_box((7, 9), 1.0) == (0, 0, 7, 9)
    assert S.crop_box((7, 9), 0.01) == (3, 4, 4, 5)
    # burnt-in marks only brighten, and only some pixels
    for fn, level in ((S.calipers, 4), (S.text, 3)):
        out = fn(np.zeros_like(img), level, np.random.default_rng(5))
        changed = out > 0
        assert 0.001 < changed.mean() < 0.2
        assert out.max() > 0.8  # white (text is anti-aliased)
        over = fn(img, level, np.random.default_rng(5))
        assert (over >= img - 1e-7).all()


def test_select_names() -> None:
    assert [s.name for s in S.select("text, fov")] == ["text", "fov"]
    assert len(S.select(None)) == len(S.BATTERY) == 8
    with pytest.raises(ConfigError, match="unknown shift.*warp.*valid shifts: gain"):
        S.select("gain,warp")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("robust")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    run = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), *FAST, "--set", "train.threads=1",
        cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _sha(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def test_shifts_touch_each_test_image_once_scored_by_its_own_fold(tiny_run: Path) -> None:
    seen: list[tuple[str, float]] = []

    def spy(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        seen.append((_sha(image), level))
        return S.gain(image, level)

    recording = S.Shift("gain", spy, (0.5, 2.0), 1.0, "x", "recorded gain")
    doc = robustness_run(tiny_run, [recording], threads=1)
    folds = json.loads((tiny_run / "folds.json").read_text())
    test_fold = folds["repeats"][0]["test_fold"]
    samples = folds["samples"]
    originals = Counter(_sha(read_image(s["path"])) for s in samples)
    # every test image shifted exactly once per level; nothing else (no training copies)
    for level in (0.5, 2.0):
        assert Counter(h for h, lv in seen if lv == level) == originals
    # ... and scored by the fold model whose test fold it was
    fold_of = {s["path"]: test_fold[i] for i, s in enumerate(samples)}
    assert len(doc["per_image"]) == len(samples)
    for row in doc["per_image"]:
        assert row["fold"] == fold_of[row["path"]]
        assert set(row["prob"]) == {"none", "gain@0.5", "gain@2"}
    # unshifted: the run's own pooled out-of-fold AUC (same models, same images)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert doc["reference"]["roc_auc"]["value"] == pytest.approx(
        metrics["pooled"]["roc_auc"]["value"], abs=0.02
    )
    assert doc["threshold"] == metrics["operating_point"]["threshold"]
    levels = doc["shifts"][0]["levels"]
    assert [r["level"] for r in levels] == [0.5, 2.0]
    for r in levels:
        auc = r["roc_auc"]
        assert auc["low"] <= auc["value"] <= auc["high"]
        assert "diff" in r["auc_change"]
    assert (tiny_run / "plots" / "robustness.png").stat().st_size > 5000
    saved = read_robustness(tiny_run)  # what the run report reads: no per-image rows
    assert saved is not None and "per_image" not in saved
    assert saved["reference"] == json.loads(json.dumps(doc["reference"]))


def test_robustness_cli_subset_and_bad_names(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rob"
    proc = run_cli(
        "robustness", str(tiny_run), "--shifts", "text,fov", "--out", str(out), "--threads", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unshifted test-fold AUC" in proc.stdout and "fov" in proc.stdout
    doc = json.loads((out / "robustness.json").read_text())
    assert [s["name"] for s in doc["shifts"]] == ["text", "fov"]
    assert (out / "robustness.png").stat().st_size > 5000
    bad = run_cli("robustness", str(tiny_run), "--shifts", "warp", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown shift(s) warp")

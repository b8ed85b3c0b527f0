"""Report figures: each function writes one valid, non-blank PNG and copes with odd input."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from breastcad import plots


def _load_png(path: Path, min_px: int = 200) -> np.ndarray:
    """Open ``path`` as a PNG, check it is sane and not blank; return RGB pixels."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= min_px and h >= min_px // 2, (w, h)
        rgb = np.asarray(im.convert("RGB"))
    # Not a single-colour canvas: some drawing happened.
    packed = (
        (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    )
    assert np.unique(packed).size > 10
    assert (rgb.min(axis=2) < 128).mean() > 0.001  # some dark ink (text, lines)
    return rgb


def _history(rng: np.random.Generator, n: int = 12) -> dict[str, list[float]]:
    t = np.arange(n)
    loss = 0.7 * np.exp(-t / 5) + 0.1 + rng.normal(0, 0.01, n)
    return {
        "epoch": list(range(1, n + 1)),
        "train_loss": loss.tolist(),
        "val_loss": (loss + 0.1).tolist(),
        "train_acc": (1 - loss / 2).tolist(),
        "val_acc": (0.9 - loss / 2).tolist(),
        "val_auc": (0.95 - loss / 2).tolist(),
    }


@pytest.fixture()
def scores() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.35).astype(int)
    prob = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.8 * y - 0.6)))
    return y, prob, np.arange(n) % 5


def test_no_figures_left_open(tmp_path: Path, scores) -> None:
    y, prob, _ = scores
    before = len(plt.get_fignums())
    plots.plot_roc(y, prob, tmp_path / "a.png")
    plots.plot_sample_grid([], [], [], tmp_path / "b.png")
    with pytest.raises(ValueError):
        plots.plot_confusion([[1, 2], [3, 4]], ["one"], tmp_path / "c.png")
    assert len(plt.get_fignums()) == before
    assert not (tmp_path / "c.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hists = [_history(rng, n) for n in (12, 10, 14)]
    out = plots.plot_training_curves(hists, tmp_path / "sub" / "curves.png", best_epochs=[8, 6, 11])
    assert out == tmp_path / "sub" / "curves.png"
    rgb = _load_png(out, min_px=600)
    assert rgb.shape[1] > rgb.shape[0]  # two panels side by side


def test_training_curves_nan_and_missing_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    h1 = _history(rng)
    h1["val_auc"] = [math.nan] * 12  # all NaN
    h1["val_loss"][3] = math.nan
    h2 = _history(rng)
    del h2["val_acc"], h2["val_auc"]
    h2["val_loss"] = [math.nan, 0.5, math.nan, math.nan, 0.4] + [math.nan] * 7
    h3 = {"train_loss": [0.9, 0.7, 0.6]}  # no epoch key, nothing else
    out = plots.plot_training_curves([h1, h2, h3], tmp_path / "curves.png", best_epochs=[4, 2, 99])
    _load_png(out)
    _load_png(plots.plot_training_curves([], tmp_path / "empty.png"))


def test_roc_with_folds_and_threshold(tmp_path: Path, scores) -> None:
    y, prob, fold = scores
    out = plots.plot_roc(y, prob, tmp_path / "roc.png", threshold=0.5, fold=fold)
    _load_png(out, min_px=400)


def test_roc_single_class_and_nan(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    prob = rng.random(40)
    prob[5] = np.nan
    out = plots.plot_roc(np.zeros(40), prob, tmp_path / "roc.png", threshold=0.5)
    _load_png(out)
    assert plots._auc(np.zeros(10, dtype=int), rng.random(10)) is None
    assert plots._fmt_auc(None) == "n/a"
    sens, spec = plots._operating_point(np.ones(4, dtype=int), np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert sens == pytest.approx(0.75) and spec is None
    _load_png(plots.plot_roc([], [], tmp_path / "empty.png", threshold=0.5))
    with pytest.raises(ValueError):
        plots.plot_roc([0, 1], [0.5], tmp_path / "bad.png")


def test_roc_overlay(tmp_path: Path, scores) -> None:
    y, prob, _ = scores
    rng = np.random.default_rng(4)
    curves = {
        "resnet18": (y, prob),
        "efficientnet_b0": (y, np.clip(prob + rng.normal(0, 0.2, y.size), 0, 1)),
        "one class": (np.ones(5), rng.random(5)),
    }
    _load_png(plots.plot_roc_overlay(curves, tmp_path / "overlay.png"), min_px=400)
    _load_png(plots.plot_roc_overlay({}, tmp_path / "none.png"))


def test_confusion(tmp_path: Path) -> None:
    out = plots.plot_confusion(
        np.array([[50, 7], [5, 38]]), ["benign", "malignant"], tmp_path / "cm.png"
    )
    _load_png(out)
    # A class with no samples (row of zeros) and a list input.
    out3 = plots.plot_confusion(
        [[10, 2, 1], [0, 0, 0], [3, 1, 9]], ["benign", "malignant", "normal"], tmp_path / "cm3.png"
    )
    _load_png(out3)


def test_reliability(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    p = rng.beta(0.8, 1.2, 400)
    y = (rng.random(400) < p).astype(int)
    logit = np.log(p / (1 - p))
    raw = 1 / (1 + np.exp(-2.0 * logit))
    raw[0] = np.nan
    _load_png(plots.plot_reliability(y, raw, p, tmp_path / "rel.png", n_bins=10), min_px=400)
    _load_png(plots.plot_reliability(y, raw, None, tmp_path / "rel_raw.png", n_bins=5))

    mean_p, frac_y, counts, ece = plots._reliability_bins(
        np.array([0, 1, 1, 1]), np.array([0.1, 0.9, 0.95, 1.0]), 2
    )
    assert counts.tolist() == [1, 3]
    assert frac_y.tolist() == [0.0, 1.0]
    assert ece == pytest.approx((0.1 + (3.0 - 2.85)) / 4)


def _frame_pixels(rgb: np.ndarray) -> tuple[int, int]:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    green = int(((g - r > 60) & (g - b > 60)).sum())
    red = int(((r - g > 100) & (r - b > 100)).sum())
    return green, red


def _ultrasound_like(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:80]
    img = 0.35 + 0.2 * rng.random((64, 80))
    img[((yy - 32) / 14) ** 2 + ((xx - 40) / 20) ** 2 < 1] *= 0.3
    return img


def test_sample_grid_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    ok = _load_png(
        plots.plot_sample_grid(
            [_ultrasound_like(rng)], ["malignant p=0.91"], [True], tmp_path / "ok.png"
        ),
        min_px=150,
    )
    green, red = _frame_pixels(ok)
    assert green > 300 and red == 0

    # The green pixels form a frame around the (grayscale) image: a row through
    # the middle of their bounding box is green at both ends and gray inside.
    gy, gx = np.nonzero(ok[..., 1].astype(int) - ok[..., 0] > 60)
    mid = (gy.min() + gy.max()) // 2
    row = ok[mid, gx.min() : gx.max() + 1].astype(int)
    assert row[0, 1] - row[0, 0] > 60 and row[-1, 1] - row[-1, 0] > 60
    inner = row[len(row) // 4 : 3 * len(row) // 4]
    assert np.abs(inner[:, 0] - inner[:, 1]).max() < 10  # gray, not coloured

    bad = _load_png(
        plots.plot_sample_grid(
            [_ultrasound_like(rng)], ["benign p=0.12"], [False], tmp_path / "bad.png"
        ),
        min_px=150,
    )
    green, red = _frame_pixels(bad)
    assert red > 300 and green == 0


def test_sample_grid_many_and_odd_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = [_ultrasound_like(rng) for _ in range(8)]
    images[1] = images[1][None]  # 1xHxW
    images[2] = np.full((40, 40), 1.7)  # out of range gets clipped
    titles = [f"malignant p={p:.2f}" for p in rng.random(8)]
    titles[3] = "benign p=0.40 with a much longer title that must be wrapped"
    correct = [bool(i % 3) for i in range(8)]
    rgb = _load_png(plots.plot_sample_grid(images, titles, correct, tmp_path / "g.png", ncols=3))
    green, red = _frame_pixels(rgb)
    assert green > 1000 and red > 500
    with pytest.raises(ValueError):
        plots.plot_sample_grid(images, titles[:2], correct, tmp_path / "x.png")


def test_sample_grid_empty(tmp_path: Path) -> None:
    rgb = _load_png(plots.plot_sample_grid([], [], [], tmp_path / "empty.png"))
    green, red = _frame_pixels(rgb)
    assert green == 0 and red == 0

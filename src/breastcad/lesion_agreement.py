"""How well Grad-CAM heatmaps land on the lesion masks: pointing game, energy, IoU.

Per image (heatmap already upsampled to the image's own size, mask at that size):

* ``pointing_game``: 1 when the heatmap's maximum lies inside the lesion, else 0.
  Bilinear upsampling clamps at the borders, so the maximum can be a plateau of
  many pixels: it counts as a hit when at least half of those pixels are inside.
  No tolerance margin (the original pointing game allows 15 px).
* ``energy_in_lesion``: the share of the heatmap's total mass inside the lesion.
* ``iou_top20``: IoU of the mask with the heatmap's top 20% of pixels (heat at or
  above its 80th percentile, and above zero); ``iou_otsu``: with the pixels above
  Otsu's threshold of the heat histogram (256 bins).

A map with no positive evidence (all zero) counts as a miss, energy 0, IoU 0; how
many there were is reported. Chance levels: a random point hits the lesion, and a
uniform heatmap puts its energy inside it, with probability equal to the lesion's
area fraction; its mean is reported beside the numbers.

:func:`explain_run` computes them for a finished run folder on its test folds:
every image with a mask is explained by the fold model that did NOT train on it
(repeat 0), for the logit of its true class, and the means get 95% percentile
bootstrap CIs over duplicate groups (as :mod:`breastcad.metrics` does for the
classification metrics). The result is written to ``lesion_agreement.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from breastcad.errors import BreastcadError

FILENAME = "lesion_agreement.json"
METRICS: tuple[str, ...] = ("pointing_game", "energy_in_lesion", "iou_top20", "iou_otsu")
LABELS = {
    "pointing_game": "pointing game (heatmap maximum inside the lesion)",
    "energy_in_lesion": "share of heatmap energy inside the lesion",
    "iou_top20": "IoU of the heatmap's top 20% of pixels with the mask",
    "iou_otsu": "IoU of the heatmap above Otsu's threshold with the mask",
}
TOP_FRACTION = 0.20
_EPS = 1e-12


# ----------------------------------------------------------------------------- per image


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape or h.ndim != 2:
        raise ValueError(f"heat {h.shape} and mask {m.shape} must be the same 2-D shape")
    return np.maximum(h, 0.0), m


def pointing_hit(heat: np.ndarray, mask: np.ndarray) -> float:
    """1.0 when the maximum (or most of a maximal plateau) is inside ``mask``, else 0.0."""
    h, m = _check(heat, mask)
    peak = float(h.max()) if h.size else 0.0
    if peak <= _EPS:
        return 0.0
    top = h >= peak * (1 - 1e-6)
    return 1.0 if m[top].mean() >= 0.5 else 0.0


def energy_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's mass inside ``mask`` (0 for an all-zero map)."""
    h, m = _check(heat, mask)
    total = float(h.sum())
    return float(h[m].sum() / total) if total > _EPS else 0.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, 1.0)
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu0 = s0 / w0
        mu1 = (s0[-1] - s0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def heat_region(heat: np.ndarray, rule: str = "top20") -> np.ndarray:
    """The pixels the heatmap marks under ``rule``: ``top20`` or ``otsu`` (see module doc)."""
    h = np.maximum(np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0), 0.0)
    if h.size == 0 or float(h.max()) <= _EPS:
        return np.zeros(h.shape, dtype=bool)
    if rule == "top20":
        thr = float(np.quantile(h, 1 - TOP_FRACTION))
        return (h >= thr) & (h > _EPS)
    if rule == "otsu":
        hn = h / float(h.max())
        return hn > otsu_threshold(hn)
    raise ValueError(f"unknown threshold rule {rule!r} (top20 | otsu)")


def iou_at(heat: np.ndarray, mask: np.ndarray, rule: str = "top20") -> float:
    """IoU of :func:`heat_region` with ``mask`` (0 when the region is empty)."""
    _, m = _check(heat, mask)
    region = heat_region(heat, rule)
    union = int((region | m).sum())
    return float((region & m).sum() / union) if union else 0.0


def image_agreement(heat: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Every metric for one image; heat and mask at the same (image) size."""
    h, m = _check(heat, mask)
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    ys, xs = np.nonzero(m)
    cy = float(ys.mean()) if ys.size else float("nan")
    cx = float(xs.mean()) if xs.size else float("nan")
    ny, nx = max(1, h.shape[0] - 1), max(1, h.shape[1] - 1)
    return {
        "pointing_game": pointing_hit(h, m),
        "energy_in_lesion": energy_share(h, m),
        "iou_top20": iou_at(h, m, "top20"),
        "iou_otsu": iou_at(h, m, "otsu"),
        "lesion_fraction": float(m.mean()),
        "empty_heatmap": bool(h.max() <= _EPS),
        # where the maximum is, as fractions of height and width (0 = top/left)
        "peak_yx": [round(float(y) / ny, 4), round(float(x) / nx, 4)],
        "lesion_centroid_yx": [round(cy / ny, 4), round(cx / nx, 4)],
    }


# ----------------------------------------------------------------------------- summary


def mean_with_ci(
    values: Sequence[float],
    groups: Sequence[str] | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Mean with a percentile bootstrap CI that resamples whole groups.

    Same resampling as :func:`breastcad.metrics.bootstrap_metrics` (each resample
    draws as many groups as there are, with replacement; an image weighs as often
    as its group was drawn).
    """
    # The group resampling of metrics.py, reused so both CIs mean the same thing.
    from breastcad.metrics import _group_codes, _percentile_interval, _resample_weights

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"value": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    codes, n_groups = _group_codes(None if groups is None else np.asarray(groups), x.size)
    parts = []
    for w in _resample_weights(codes, n_groups, n_boot, seed):
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append((w @ x) / total)
    low, high = _percentile_interval(np.concatenate(parts), alpha)
    return {"value": float(x.mean()), "low": low, "high": high, "n": int(x.size)}


def summarise(
    rows: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Means with CIs over ``rows`` (each with the metrics, ``group`` and ``label``)."""
    groups = [str(r["group"]) for r in rows]
    out: dict[str, Any] = {
        "metrics": {
            k: mean_with_ci([r[k] for r in rows], groups, n_boot, seed, alpha) for k in METRICS
        },
        "chance": {
            "pointing_game": float(np.mean([r["lesion_fraction"] for r in rows]))
            if rows
            else math.nan,
            "energy_in_lesion": float(np.mean([r["lesion_fraction"] for r in rows]))
            if rows
            else math.nan,
        },
        "by_class": {},
    }
    for label in sorted({r["label"] for r in rows}):
        sub = [r for r in rows if r["label"] == label]
        g = [str(r["group"]) for r in sub]
        out["by_class"][label] = {
            k: mean_with_ci([r[k] for r in sub], g, n_boot, seed, alpha) for k in METRICS
        }
    return out


def format_ci(m: dict[str, Any] | None, digits: int = 2) -> str:
    """``0.71 (0.65-0.77)`` for a metric entry; ``n/a`` when missing."""
    if not m or m.get("value") is None or not math.isfinite(float(m["value"])):
        return "n/a"
    lo, hi = m.get("low"), m.get("high")
    ci = (
        f" ({lo:.{digits}f}-{hi:.{digits}f})"
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
        else ""
    )
    return f"{float(m['value']):.{digits}f}{ci}"


def compare_cells(doc: dict[str, Any] | None) -> dict[str, str]:
    """Cells for a comparison table (``breastcad compare``): one string per column."""
    if not doc:
        return {"pointing game": "n/a", "energy in lesion": "n/a", "heatmap grid": "n/a"}
    m = doc.get("metrics", {})
    grid = doc.get("heatmap_grid") or ["?", "?"]
    return {
        "pointing game": format_ci(m.get("pointing_game")),
        "energy in lesion": format_ci(m.get("energy_in_lesion")),
        "heatmap grid": f"{grid[0]}x{grid[1]} @ {doc.get('input_size', '?')} px",
    }


# ----------------------------------------------------------------------------- run folder


def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BreastcadError(f"{path}: no such file (not a run folder)") from None
    except (OSError, yaml.YAMLError) as err:
        raise BreastcadError(f"{path}: cannot read the run's configuration ({err})") from None
    if not isinstance(cfg, dict):
        raise BreastcadError(f"{path}: not a run configuration")
    return cfg


def _stretch_preprocessing(card: dict[str, Any]) -> bool:
    """Heatmaps map back onto the image only when the input was the whole image, stretched."""
    return str(card.get("preprocessing", {}).get("resize", "stretch")).startswith("stretch")


def _pick(indices: list[int], max_images: int | None, seed: int) -> list[int]:
    if max_images is None or max_images >= len(indices):
        return indices
    if max_images < 1:
        raise BreastcadError(f"max_images must be at least 1, not {max_images}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(indices, size=max_images, replace=False).tolist())


def explain_run(
    run_dir: str | os.PathLike[str],
    max_images: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Lesion agreement of a finished run's Grad-CAM heatmaps on its test folds.

    Reads ``config.yaml`` (data path, bootstrap settings), ``folds.json`` (samples,
    groups, test folds of repeat 0) and each ``fold-K`` model; reloads the masks
    with :func:`breastcad.data.sources.load_source`. ``max_images`` explains a
    seeded random subset. Writes ``lesion_agreement.json`` into the run folder
    (atomically) and returns the same document.
    """
    import torch

    from breastcad.checkpoint import load_fold_model
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image, read_mask
    from breastcad.data.sources import load_source
    from breastcad.gradcam import compute_gradcam, gradcam_grid, resize_heat
    from breastcad.io import atomic_write_json, read_json
    from breastcad.models import get_spec

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    say = log or (lambda _msg: None)
    cfg = _read_config(run_dir)
    data_cfg = cfg.get("data") or {}
    eval_cfg = cfg.get("eval") or {}
    seed = int(cfg.get("seed") or 0)
    max_pixels = int(data_cfg.get("max_pixels") or DEFAULT_MAX_PIXELS)
    n_boot = int(eval_cfg.get("n_bootstrap") or 1000)
    level = float(eval_cfg.get("ci_level") or 0.95)

    folds = read_json(run_dir / "folds.json")
    samples = folds["samples"]
    test_fold = folds["repeats"][0]["test_fold"]
    source = load_source(data_cfg.get("path"))
    masks_of = {os.path.abspath(s.path): s.mask_paths for s in source.samples}
    with_mask = [i for i, s in enumerate(samples) if masks_of.get(os.path.abspath(s["path"]))]
    chosen = _pick(with_mask, max_images, seed)
    say(
        f"lesion agreement: {len(chosen)} of {len(samples)} test images "
        f"({len(samples) - len(with_mask)} without a mask)"
    )

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    info: dict[str, Any] = {}
    by_fold: dict[int, list[int]] = {}
    for i in chosen:
        by_fold.setdefault(int(test_fold[i]), []).append(i)
    for k in sorted(by_fold):
        fold_dir = run_dir / f"fold-{k}"
        if not (fold_dir / "DONE").exists():
            raise BreastcadError(f"{fold_dir}: fold {k} is not finished; cannot explain its test")
        model, card = load_fold_model(fold_dir)
        if not _stretch_preprocessing(card):
            raise BreastcadError(
                f"{fold_dir}: lesion agreement needs the 'stretch' preprocessing "
                f"(this fold used {card['preprocessing'].get('resize')!r})"
            )
        arch, size = card["architecture"], int(card["input_size"])
        tta = card.get("preprocessing", {}).get("tta", "none") != "none"
        if not info:
            info = {
                "model": arch,
                "layer": get_spec(arch).gradcam_layer,
                "input_size": size,
                "heatmap_grid": list(gradcam_grid(model, arch, size)),
                "tta": tta,
            }
        idx = by_fold[k]
        for b in range(0, len(idx), 16):
            batch, imgs, masks = [], [], []
            for i in idx[b : b + 16]:
                path = samples[i]["path"]
                try:
                    img = read_image(path, max_pixels=max_pixels)
                    mask = read_mask(masks_of[os.path.abspath(path)], img.shape)
                except BreastcadError as err:
                    skipped.append({"path": path, "problem": str(err)})
                    continue
                if not mask.any():
                    skipped.append({"path": path, "problem": "empty lesion mask"})
                    continue
                batch.append(i)
                imgs.append(img)
                masks.append(mask)
            if not batch:
                continue
            stack = torch.from_numpy(np.stack([prepare_for_model(im, card) for im in imgs]))
            targets = [int(samples[i]["target"]) for i in batch]
            heats = compute_gradcam(model, arch, stack, targets, tta=tta)
            for i, img, mask, heat in zip(batch, imgs, masks, heats, strict=True):
                row = image_agreement(resize_heat(heat, img.shape), mask)
                row.update(
                    path=samples[i]["path"],
                    label=samples[i]["label"],
                    group=samples[i]["group"],
                    fold=k,
                )
                rows.append(row)
        say(f"  fold-{k}: {len(idx)} images explained")
    if not rows:
        raise BreastcadError(f"{run_dir}: no test image with a lesion mask to explain")

    summary = summarise(rows, n_boot=n_boot, seed=seed, alpha=1 - level)
    grid = info["heatmap_grid"]
    cell = info["input_size"] / max(grid)
    doc: dict[str, Any] = {
        **info,
        "resolution_note": (
            f"Grad-CAM of {info['model']} at layer {info['layer']!r} has a {grid[0]}x{grid[1]} "
            f"grid for its {info['input_size']}x{info['input_size']} input (one cell = "
            f"{cell:.0f} input pixels); heatmaps were upsampled bilinearly to each image's own "
            "size before scoring. Models with coarser grids localise less finely."
        ),
        "target": "each image's true class (Grad-CAM of its logit, ReLU'd, per-image max = 1)",
        "explained_by": "the fold model that did not train on the image (test folds, repeat 0)",
        "threshold_rules": {
            "iou_top20": "heat >= its 80th percentile (top 20% of pixels), heat > 0",
            "iou_otsu": "heat / max above Otsu's threshold (256-bin histogram)",
        },
        **summary,
        "n_images": len(rows),
        "n_groups": len({str(r["group"]) for r in rows}),
        "n_without_mask": len(samples) - len(with_mask),
        "n_empty_heatmap": int(sum(r["empty_heatmap"] for r in rows)),
        "max_images": max_images,
        "skipped": skipped,
        "ci": {
            "level": level,
            "method": "percentile bootstrap over duplicate groups (mean of per-image values)",
            "n_bootstrap": n_boot,
        },
        "seconds": round(time.perf_counter() - t0, 2),
        "per_image": rows,
    }
    atomic_write_json(run_dir / FILENAME, doc)
    return doc


def read_agreement(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ``lesion_agreement.json``, or None when it is absent or unreadable."""
    from breastcad.io import read_json_if_valid

    doc = read_json_if_valid(Path(run_dir) / FILENAME)
    return doc if doc is not None and isinstance(doc.get("metrics"), dict) else None

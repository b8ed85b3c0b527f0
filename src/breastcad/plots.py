"""Report figures: training curves, ROC, confusion matrix, reliability, sample grids.

Every function draws one figure, writes it as a single PNG at ``out`` (atomically,
through :func:`breastcad.io.atomic_write_bytes`), closes the figure and returns the
path. The Agg backend is selected here, so nothing needs a display.

Inputs are tolerated rather than trusted: NaN values are skipped, a single-class
label vector gives an ROC with "AUC n/a" instead of an exception, and empty inputs
give a figure that says so. Mismatched lengths raise :class:`ValueError` (a bug in
the caller, not in the user's data).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from breastcad.io import atomic_write_bytes  # noqa: E402

__all__ = [
    "plot_confusion",
    "plot_reliability",
    "plot_roc",
    "plot_roc_overlay",
    "plot_sample_grid",
    "plot_training_curves",
]

DPI = 110
CORRECT_COLOR = "#1a9e1a"  # frame of a correctly classified sample
WRONG_COLOR = "#d62020"  # frame of a misclassified sample

_RC: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- helpers


@contextmanager
def _rc() -> Iterator[None]:
    with plt.rc_context(_RC):
        yield


def _save(fig: Figure, out: PathLike, tight: bool = True) -> Path:
    """Render ``fig`` to PNG in memory, write it atomically, always close it."""
    try:
        buf = BytesIO()
        fig.savefig(
            buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None, pad_inches=0.15
        )
    finally:
        plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def _message_figure(out: PathLike, message: str, title: str | None = None) -> Path:
    with _rc():
        fig = plt.figure(figsize=(5.0, 2.5))
        try:
            fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=16, color="0.35")
            if title:
                fig.text(0.5, 0.9, title, ha="center", va="top", fontsize=13)
        except BaseException:
            plt.close(fig)
            raise
        # Nothing to crop to: keep the whole canvas.
        return _save(fig, out, tight=False)


def _colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _as_1d(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(-1)


def _clean_pair(y: Any, prob: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and probabilities as float arrays, with rows holding a NaN dropped.

    Returns ``(y, prob, keep)``, ``keep`` being the mask over the original rows.
    """
    y_arr = _as_1d(y)
    p_arr = _as_1d(prob)
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"y has {y_arr.size} values but prob has {p_arr.size}")
    keep = np.isfinite(y_arr) & np.isfinite(p_arr)
    return y_arr[keep].astype(int), p_arr[keep], keep


def _auc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """ROC AUC, or None when it is undefined (fewer than two classes)."""
    if y.size == 0 or np.unique(y).size < 2:
        return None
    return float(roc_auc_score(y, prob))


def _fmt_auc(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"


def _roc_axes_setup(ax: Axes, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1.2, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title)


# --------------------------------------------------------------------------- training curves

_HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "val_auc")


def _series(history: dict[str, list[float]], key: str, n: int) -> np.ndarray | None:
    values = history.get(key)
    if values is None or len(values) == 0:
        return None
    arr = np.full(n, np.nan)
    vals = np.asarray(values, dtype=float).reshape(-1)[:n]
    arr[: vals.size] = vals
    if not np.isfinite(arr).any():
        return None
    return arr


def _history_length(history: dict[str, list[float]]) -> int:
    return max((len(v) for v in history.values() if v is not None), default=0)


def plot_training_curves(
    histories: list[dict[str, list[float]]],
    out: PathLike,
    best_epochs: list[int] | None = None,
) -> Path:
    """Loss (left) and accuracy + validation AUC (right) per epoch, one colour per fold.

    Each history may hold ``epoch``, ``train_loss``, ``val_loss``, ``train_acc``,
    ``val_acc`` and ``val_auc``; missing keys are skipped and NaN values leave gaps.
    Train curves are solid, validation curves dashed, validation AUC dotted.
    ``best_epochs[i]`` is an epoch *value* of fold ``i`` (matched against its
    ``epoch`` list; without one, epochs count from 1); it is marked with a dot.
    """
    if best_epochs is not None and len(best_epochs) != len(histories):
        raise ValueError(f"{len(best_epochs)} best epochs for {len(histories)} histories")
    if not histories or all(_history_length(h) == 0 for h in histories):
        return _message_figure(out, "no training history", "Training curves")

    colors = _colors(len(histories))
    with _rc():
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12.0, 4.6), layout="constrained")
        try:
            has = {"train": False, "val": False, "auc": False, "best": False}
            for i, hist in enumerate(histories):
                n = _history_length(hist)
                if n == 0:
                    continue
                ep = _series(hist, "epoch", n)
                if ep is None or not np.isfinite(ep).all():
                    ep = np.arange(1, n + 1, dtype=float)
                c = colors[i]
                series = {k: _series(hist, k, n) for k in _HISTORY_KEYS}
                for ax, key, style, flag in (
                    (ax_loss, "train_loss", "-", "train"),
                    (ax_loss, "val_loss", "--", "val"),
                    (ax_acc, "train_acc", "-", "train"),
                    (ax_acc, "val_acc", "--", "val"),
                    (ax_acc, "val_auc", ":", "auc"),
                ):
                    s = series[key]
                    if s is None:
                        continue
                    lw = 2.0 if style == ":" else 1.5
                    ax.plot(ep, s, ls=style, color=c, lw=lw, alpha=0.9)
                    # A finite value between NaNs draws no line segment: show it as a dot.
                    fin = np.isfinite(s)
                    prev = np.concatenate([[False], fin[:-1]])
                    nxt = np.concatenate([fin[1:], [False]])
                    lone = fin & ~prev & ~nxt
                    if lone.any():
                        ax.plot(ep[lone], s[lone], ls="none", marker=".", ms=6, color=c)
                    has[flag] = True

                if best_epochs is None:
                    continue
                idx = np.flatnonzero(ep == float(best_epochs[i]))
                if idx.size == 0:
                    continue
                j = int(idx[0])
                for ax, keys in (
                    (ax_loss, ("val_loss", "train_loss")),
                    (ax_acc, ("val_auc", "val_acc", "train_acc")),
                ):
                    for key in keys:
                        s = series[key]
                        if s is not None and np.isfinite(s[j]):
                            ax.plot(ep[j], s[j], "o", ms=8, color=c, mec="black", mew=1.0, zorder=5)
                            has["best"] = True
                            break

            ax_loss.set_title("Loss")
            ax_loss.set_xlabel("epoch")
            ax_loss.set_ylabel("loss")
            ax_acc.set_title("Accuracy and validation AUC")
            ax_acc.set_xlabel("epoch")
            ax_acc.set_ylabel("accuracy / AUC")
            lo, _ = ax_acc.get_ylim()
            ax_acc.set_ylim(max(lo, -0.02), 1.02)
            for ax in (ax_loss, ax_acc):
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

            fold_handles = [
                Line2D([], [], color=colors[i], lw=2.5, label=f"fold {i}")
                for i in range(len(histories))
            ]
            style_handles = []
            if has["train"]:
                style_handles.append(Line2D([], [], color="0.3", ls="-", label="train"))
            if has["val"]:
                style_handles.append(Line2D([], [], color="0.3", ls="--", label="validation"))
            if has["auc"]:
                style_handles.append(
                    Line2D([], [], color="0.3", ls=":", lw=2.0, label="validation AUC")
                )
            if has["best"]:
                style_handles.append(
                    Line2D(
                        [], [], ls="none", marker="o", color="0.6", mec="black", label="best epoch"
                    )
                )
            # Legends go outside the panels so they never hide the curves.
            fig.legend(
                handles=fold_handles + style_handles,
                loc="outside right center",
                frameon=False,
            )
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


# --------------------------------------------------------------------------- ROC


def _operating_point(
    y: np.ndarray, prob: np.ndarray, threshold: float
) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) when predicting positive for ``prob >= threshold``."""
    pred = prob >= threshold
    pos = y == 1
    neg = ~pos
    sens = float(pred[pos].mean()) if pos.any() else None
    spec = float((~pred[neg]).mean()) if neg.any() else None
    return sens, spec


def plot_roc(
    y: Any,
    prob: Any,
    out: PathLike,
    threshold: float | None = None,
    fold: np.ndarray | None = None,
    label: str = "pooled out-of-fold",
) -> Path:
    """Pooled ROC curve (AUC in the legend), faint per-fold curves, operating point.

    ``y`` holds 0/1 labels (1 = malignant) and ``prob`` the predicted probability
    of class 1. With ``fold`` (one fold id per row) each fold's own ROC is drawn
    faintly behind the pooled one. With ``threshold`` the operating point
    ``prob >= threshold`` is marked and annotated with sensitivity/specificity.
    """
    y_arr, p_arr, keep = _clean_pair(y, prob)
    fold_arr: np.ndarray | None = None
    if fold is not None:
        fold_all = np.asarray(fold).reshape(-1)
        if fold_all.size != keep.size:
            raise ValueError(f"fold has {fold_all.size} values but y has {keep.size}")
        fold_arr = fold_all[keep]

    auc = _auc(y_arr, p_arr)
    with _rc():
        fig, ax = plt.subplots(figsize=(6.0, 6.0), layout="constrained")
        try:
            _roc_axes_setup(ax, "ROC curve")

            if fold_arr is not None:
                fold_aucs: list[float] = []
                ids = list(dict.fromkeys(fold_arr.tolist()))
                for fid in ids:
                    m = fold_arr == fid
                    a = _auc(y_arr[m], p_arr[m])
                    if a is None:
                        continue
                    fpr, tpr, _ = roc_curve(y_arr[m], p_arr[m])
                    fold_aucs.append(a)
                    ax.plot(
                        fpr,
                        tpr,
                        color="tab:blue",
                        lw=1.0,
                        alpha=0.25,
                    )
                if fold_aucs:
                    sd = float(np.std(fold_aucs, ddof=1)) if len(fold_aucs) > 1 else 0.0
                    ax.plot(
                        [],
                        [],
                        color="tab:blue",
                        lw=1.0,
                        alpha=0.35,
                        label=(
                            f"per fold ({len(fold_aucs)}): AUC {np.mean(fold_aucs):.3f} ± {sd:.3f}"
                        ),
                    )

            if auc is not None:
                fpr, tpr, _ = roc_curve(y_arr, p_arr)
                ax.plot(fpr, tpr, color="tab:blue", lw=2.2, label=f"{label}: AUC {auc:.3f}")
            else:
                ax.plot([], [], color="tab:blue", lw=2.2, label=f"{label}: AUC n/a")
                why = "no samples" if y_arr.size == 0 else "only one class present"
                ax.text(
                    0.5,
                    0.62,
                    f"ROC undefined:\n{why}",
                    ha="center",
                    va="center",
                    fontsize=12,
                    color="0.35",
                    transform=ax.transAxes,
                )

            if threshold is not None and y_arr.size:
                sens, spec = _operating_point(y_arr, p_arr, threshold)
                sens_s = "n/a" if sens is None else f"{sens:.2f}"
                spec_s = "n/a" if spec is None else f"{spec:.2f}"
                text = f"threshold {threshold:.2f}\nsensitivity {sens_s}\nspecificity {spec_s}"
                if sens is not None and spec is not None:
                    x, yy = 1.0 - spec, sens
                    ax.plot(
                        x,
                        yy,
                        "o",
                        ms=9,
                        color="tab:red",
                        mec="black",
                        zorder=6,
                        label="operating point",
                    )
                    # A ROC curve never descends, so the area right of and below a
                    # point on it is empty: the note goes there, kept above the
                    # legend in the lower-right corner.
                    right = x <= 0.58
                    ax.annotate(
                        text,
                        xy=(x, yy),
                        xytext=(x + 0.07 if right else x - 0.07, min(max(yy - 0.1, 0.36), 0.97)),
                        fontsize=9,
                        ha="left" if right else "right",
                        va="top",
                        bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6"},
                        arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 1.0},
                        zorder=7,
                    )
                else:
                    ax.text(
                        0.97,
                        0.35,
                        text,
                        ha="right",
                        va="bottom",
                        fontsize=9,
                        transform=ax.transAxes,
                        bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6"},
                    )

            n_pos = int((y_arr == 1).sum())
            n_neg = int((y_arr != 1).sum())
            ax.set_title(f"ROC curve  (n={y_arr.size}: {n_pos} positive, {n_neg} negative)")
            ax.legend(loc="lower right")
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


def plot_roc_overlay(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: PathLike) -> Path:
    """Several models' ROC curves on one plot; ``curves`` maps name -> (y, prob).

    Legend entries are sorted by AUC (best first) and carry the AUC value.
    """
    if not curves:
        return _message_figure(out, "no curves", "ROC comparison")
    items = []
    for name, (y, prob) in curves.items():
        y_arr, p_arr, _ = _clean_pair(y, prob)
        items.append((name, y_arr, p_arr, _auc(y_arr, p_arr)))
    items.sort(key=lambda it: -1.0 if it[3] is None else -it[3])
    colors = _colors(len(items))
    with _rc():
        fig, ax = plt.subplots(figsize=(6.5, 6.5), layout="constrained")
        try:
            _roc_axes_setup(ax, "ROC comparison")
            for (name, y_arr, p_arr, auc), c in zip(items, colors, strict=True):
                lab = f"{name}: AUC {_fmt_auc(auc)}"
                if auc is None:
                    ax.plot([], [], color=c, lw=2.0, label=lab)
                    continue
                fpr, tpr, _ = roc_curve(y_arr, p_arr)
                ax.plot(fpr, tpr, color=c, lw=2.0, label=lab)
            ax.legend(loc="lower right")
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


# --------------------------------------------------------------------------- confusion


def plot_confusion(
    cm: np.ndarray | list,
    class_names: list[str],
    out: PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows = true class, columns = predicted) with counts and row %.

    Cell shading follows the row percentage, so each class's recall reads at a glance
    whatever the class balance.
    """
    mat = np.asarray(cm, dtype=float)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {mat.shape}")
    k = mat.shape[0]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}x{k} matrix")
    mat = np.nan_to_num(mat, nan=0.0)
    row_sum = mat.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(row_sum > 0, mat / np.where(row_sum > 0, row_sum, 1.0), np.nan)

    side = max(4.2, 1.5 * k + 2.0)
    with _rc():
        fig, ax = plt.subplots(figsize=(side + 0.9, side), layout="constrained")
        try:
            im = ax.imshow(np.nan_to_num(frac, nan=0.0), cmap="Blues", vmin=0.0, vmax=1.0)
            ax.grid(False)
            for i in range(k):
                for j in range(k):
                    count = mat[i, j]
                    count_s = f"{int(count)}" if float(count).is_integer() else f"{count:.1f}"
                    pct_s = "—" if math.isnan(frac[i, j]) else f"{100 * frac[i, j]:.1f}%"
                    dark = not math.isnan(frac[i, j]) and frac[i, j] > 0.55
                    ax.text(
                        j,
                        i,
                        f"{count_s}\n({pct_s})",
                        ha="center",
                        va="center",
                        fontsize=13 if k <= 4 else 10,
                        color="white" if dark else "black",
                    )
            wrapped = ["\n".join(textwrap.wrap(str(n), 14)) or str(n) for n in class_names]
            ax.set_xticks(range(k), wrapped)
            ax.set_yticks(range(k), wrapped)
            ax.set_xlabel(f"predicted class    (total n = {int(mat.sum())})")
            ax.set_ylabel("true class")
            ax.set_title(title)
            cb = fig.colorbar(im, ax=ax, shrink=0.8)
            cb.set_label("fraction of true class (row)")
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


# --------------------------------------------------------------------------- reliability


def _reliability_bins(
    y: np.ndarray, prob: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean predicted probability, observed positive fraction, count per bin, and ECE."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(float)
    sum_p = np.bincount(idx, weights=prob, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = sum_p / counts
        frac_y = sum_y / counts
    ok = counts > 0
    ece = (
        float(np.sum(counts[ok] * np.abs(frac_y[ok] - mean_p[ok])) / counts.sum())
        if ok.any()
        else float("nan")
    )
    return mean_p, frac_y, counts, ece


def plot_reliability(
    y: Any,
    prob_raw: Any,
    prob_cal: Any | None,
    out: PathLike,
    n_bins: int = 10,
) -> Path:
    """Reliability diagram before/after temperature scaling, histogram underneath.

    Points are (mean predicted probability, observed fraction malignant) for
    ``n_bins`` equal-width bins; the legend gives each curve's expected
    calibration error (ECE). ``prob_cal`` may be ``None`` (raw curve only).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y_all = _as_1d(y)
    raw_all = _as_1d(prob_raw)
    if raw_all.shape != y_all.shape:
        raise ValueError(f"y has {y_all.size} values but prob_raw has {raw_all.size}")
    series: list[tuple[str, np.ndarray, str, str]] = [
        ("before (raw)", raw_all, "tab:orange", "s"),
    ]
    if prob_cal is not None:
        cal_all = _as_1d(prob_cal)
        if cal_all.shape != y_all.shape:
            raise ValueError(f"y has {y_all.size} values but prob_cal has {cal_all.size}")
        series.append(("after temperature scaling", cal_all, "tab:blue", "o"))

    with _rc():
        fig, (ax, ax_h) = plt.subplots(
            2,
            1,
            figsize=(6.2, 7.2),
            sharex=True,
            gridspec_kw={"height_ratios": [3.2, 1.0]},
            layout="constrained",
        )
        try:
            ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1.2, label="perfect calibration")
            edges = np.linspace(0.0, 1.0, n_bins + 1)
            any_data = False
            for name, p_all, color, marker in series:
                keep = np.isfinite(y_all) & np.isfinite(p_all)
                yk = y_all[keep]
                pk = np.clip(p_all[keep], 0.0, 1.0)
                if yk.size == 0:
                    ax.plot([], [], color=color, marker=marker, label=f"{name}: no data")
                    continue
                any_data = True
                mean_p, frac_y, counts, ece = _reliability_bins(yk, pk, n_bins)
                ok = counts > 0
                ax.plot(
                    mean_p[ok],
                    frac_y[ok],
                    color=color,
                    marker=marker,
                    ms=6,
                    lw=1.8,
                    label=f"{name}: ECE {ece:.3f}",
                )
                ax_h.hist(
                    pk,
                    bins=edges,
                    histtype="step",
                    lw=1.8,
                    color=color,
                    label=name,
                )
            if not any_data:
                ax.text(
                    0.5,
                    0.6,
                    "no samples",
                    ha="center",
                    va="center",
                    fontsize=13,
                    color="0.35",
                    transform=ax.transAxes,
                )
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("observed fraction malignant")
            ax.set_title("Reliability: before / after temperature scaling")
            ax.legend(loc="upper left")
            ax_h.set_xlabel("predicted probability of malignant")
            ax_h.set_ylabel("count")
            ax_h.tick_params(labelbottom=True)
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


# --------------------------------------------------------------------------- sample grid


def _display_image(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img, dtype=float)
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"cannot show an image of shape {np.shape(img)}")
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


def _pair_with_overlay(img: np.ndarray, overlay: np.ndarray) -> tuple[np.ndarray, int]:
    """Image (gray or RGB, [0, 1]) and its overlay side by side, white gap; returns (cell, x0)."""
    ov = np.asarray(overlay)
    ov = _display_image(ov.astype(float) / 255.0 if ov.dtype == np.uint8 else ov)
    if ov.ndim == 2:
        ov = np.repeat(ov[..., None], 3, axis=-1)
    base = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
    if ov.shape[:2] != base.shape[:2]:
        raise ValueError(f"overlay {ov.shape[:2]} differs from its image {base.shape[:2]}")
    gap = max(2, base.shape[1] // 32)
    spacer = np.ones((base.shape[0], gap, 3))
    return np.concatenate([base, spacer, ov], axis=1), base.shape[1] + gap


def plot_sample_grid(
    images: list[np.ndarray],
    titles: list[str],
    correct: list[bool],
    out: PathLike,
    ncols: int = 6,
    heading: str | None = None,
    overlays: list[np.ndarray] | None = None,
    masks: list[np.ndarray | None] | None = None,
    frame_note: str = "green frame = correct, red frame = wrong",
) -> Path:
    """Grid of grayscale images in [0, 1], each titled, framed green (correct) or red.

    With ``overlays`` (one RGB image per case, uint8 or [0, 1], the image's size;
    e.g. :func:`breastcad.gradcam.overlay_rgb`) each cell shows the image and its
    overlay side by side (4 cells a row); ``masks`` (bool, the image's size, or
    None) outline the lesion on the overlay. An empty list gives a figure that says
    "no samples".
    """
    n = len(images)
    if len(titles) != n or len(correct) != n:
        raise ValueError(f"{n} images but {len(titles)} titles and {len(correct)} flags")
    if overlays is not None and len(overlays) != n:
        raise ValueError(f"{n} images but {len(overlays)} overlays")
    if masks is not None and len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks")
    if n == 0:
        return _message_figure(out, "no samples", "Samples")
    shown = [_display_image(im) for im in images]
    offsets: list[int | None] = [None] * n
    if overlays is not None:
        pairs = [_pair_with_overlay(im, ov) for im, ov in zip(shown, overlays, strict=True)]
        shown = [p[0] for p in pairs]
        offsets = [p[1] for p in pairs]
        ncols = min(int(ncols), 4)
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    # Cells follow the images' typical aspect so rows do not gape apart.
    aspect = float(np.median([im.shape[0] / max(im.shape[1], 1) for im in shown]))
    aspect = min(max(aspect, 0.25), 2.0)
    cell_w = 2.3 if overlays is None else 3.6
    with _rc():
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(cell_w * ncols, (cell_w * aspect + 0.5) * nrows + 0.45),
            squeeze=False,
            layout="constrained",
        )
        try:
            for k, ax in enumerate(axes.flat):
                if k >= n:
                    ax.set_axis_off()
                    continue
                img = shown[k]
                ax.imshow(
                    img,
                    cmap="gray" if img.ndim == 2 else None,
                    vmin=0.0,
                    vmax=1.0,
                    interpolation="antialiased",
                )
                mask = None if masks is None else masks[k]
                x0 = offsets[k]
                if mask is not None and x0 is not None and np.asarray(mask).any():
                    m = np.asarray(mask, dtype=float)
                    xs = np.arange(m.shape[1]) + x0
                    ax.contour(xs, np.arange(m.shape[0]), m, levels=[0.5], colors="white",
                               linewidths=1.0, linestyles="--")  # fmt: skip
                ax.grid(False)
                ax.set_xticks([])
                ax.set_yticks([])
                color = CORRECT_COLOR if correct[k] else WRONG_COLOR
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(4.0)
                ax.set_title(_wrap_title(str(titles[k]), 40 if x0 is not None else 24),
                             fontsize=9, color="black")  # fmt: skip
            n_ok = int(sum(bool(c) for c in correct))
            fig.suptitle(
                f"{heading or f'{n_ok}/{n} correct'}  ({frame_note})",
                fontsize=11,
                wrap=True,
            )
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


def _wrap_title(title: str, width: int = 24, max_lines: int = 2) -> str:
    lines = textwrap.wrap(title, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)

"""Evaluation metrics: point estimates, grouped bootstrap CIs, calibration.

Conventions used throughout:

* Binary labels are 0/1 (1 = the positive class, e.g. malignant) and ``prob`` is
  the predicted probability of class 1. The decision rule is always
  ``positive when prob >= threshold``.
* A value that is undefined on the given data is ``float('nan')``, never an
  exception and never a silent 0: AUCs and balanced accuracy need both classes,
  precision needs a predicted positive, NPV a predicted negative, sensitivity a
  positive, specificity a negative, average precision a positive, F1 needs
  ``2*tp + fp + fn > 0``. Invalid input (wrong shapes, labels other than 0/1,
  probabilities outside [0, 1], empty arrays) raises ``ValueError``.
* Confidence intervals resample *groups* (clusters of near-duplicate images, or
  patients), never single images: near-duplicates are not independent, so an
  image-level bootstrap gives intervals that are too narrow.

Point estimates use scikit-learn. The bootstrap uses a vectorised re-implementation
on multiplicity weights (how often each image's group was drawn), because calling
scikit-learn 1000 times is far too slow; the tests check that both agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

#: The BinaryMetrics fields that are rates; these get bootstrap CIs.
RATE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "npv",
    "f1",
    "roc_auc",
    "pr_auc",
    "ece",
)
#: Extra bootstrapped metric: best sensitivity at specificity >= 0.90.
SENS_AT_SPEC90 = "sens_at_spec90"

# Specificity computed as 1 - fp/n_neg is not exact in floating point
# (1 - 0.1 != 0.9), so "specificity >= target" allows this much slack.
_SPEC_TOL = 1e-9
# Bound the bootstrap's (resamples x images) weight matrix to ~32 MB per chunk.
_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BinaryMetrics:
    """Binary classification metrics at one threshold (positive when prob >= threshold).

    Undefined rates are ``nan`` (see the module docstring). ``pr_auc`` is average
    precision; ``ece`` is :func:`expected_calibration_error` with 10 bins.
    """

    accuracy: float
    balanced_accuracy: float
    precision: float
    sensitivity: float
    specificity: float
    npv: float
    f1: float
    roc_auc: float
    pr_auc: float
    ece: float
    tn: int
    fp: int
    fn: int
    tp: int
    n: int
    n_pos: int
    threshold: float


@dataclass(frozen=True)
class MetricCI:
    """A point estimate with a percentile bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDiff:
    """AUC(model a) - AUC(model b) with a paired bootstrap interval and p-value."""

    diff: float
    low: float
    high: float
    p_value: float


@dataclass(frozen=True)
class MulticlassMetrics:
    """Multiclass metrics of argmax predictions; ``roc_auc`` is macro one-vs-rest.

    ``confusion_matrix[i][j]`` counts true class ``i`` predicted as ``j``.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    roc_auc: float
    roc_auc_per_class: dict[str, float]
    confusion_matrix: list[list[int]]
    report: dict[str, Any]
    report_text: str
    class_names: tuple[str, ...]
    n: int


# ----------------------------------------------------------------------------- validation


def _as_labels(y: ArrayLike) -> IntArray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    return arr.astype(np.intp)


def _as_scores(score: ArrayLike, n: int, *, probability: bool) -> FloatArray:
    arr = np.asarray(score, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("scores must be finite")
    if probability and ((arr < 0).any() or (arr > 1).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    return arr


def _binary_inputs(
    y: ArrayLike, score: ArrayLike, *, probability: bool = True
) -> tuple[IntArray, FloatArray]:
    labels = _as_labels(y)
    return labels, _as_scores(score, labels.size, probability=probability)


def _has_both_classes(y: IntArray) -> bool:
    return 0 < int(y.sum()) < y.size


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# ----------------------------------------------------------------------------- shared formulas


def _div(num: FloatArray, den: FloatArray) -> FloatArray:
    """num / den elementwise, nan where den == 0 (an undefined rate)."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _rates_from_counts(
    tn: FloatArray, fp: FloatArray, fn: FloatArray, tp: FloatArray
) -> dict[str, FloatArray]:
    """Threshold metrics from (possibly weighted) confusion counts.

    Shared by the point estimate and the bootstrap so both use the same definitions.
    """
    sensitivity = _div(tp, tp + fn)
    specificity = _div(tn, tn + fp)
    return {
        "accuracy": _div(tp + tn, tn + fp + fn + tp),
        # nan unless both classes are present (unlike sklearn, which averages the present ones).
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "precision": _div(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "npv": _div(tn, tn + fn),
        # The count form equals sklearn's F1 and stays defined when precision is not.
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }


def _bin_index(prob: FloatArray, n_bins: int) -> IntArray:
    # Equal-width bins [k/n, (k+1)/n); the last bin also takes prob == 1.
    return np.minimum((prob * n_bins).astype(np.intp), n_bins - 1)


def _calibration_residuals(y: IntArray, prob: FloatArray, n_bins: int) -> FloatArray:
    """(N, n_bins) matrix holding y - prob in each image's bin column, 0 elsewhere."""
    out = np.zeros((y.size, n_bins))
    out[np.arange(y.size), _bin_index(prob, n_bins)] = y - prob
    return out


def _weighted_ece(residuals: FloatArray, weights: FloatArray) -> FloatArray:
    # sum_b (W_b / W) |mean_b(y) - mean_b(p)| == sum_b |sum_b w (y - p)| / W
    gaps = weights @ residuals
    return _div(np.abs(gaps).sum(axis=1), weights.sum(axis=1))


# ----------------------------------------------------------------------------- point estimates


def expected_calibration_error(y: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error of P(y=1) over equal-width probability bins.

    ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(prob in b)|`` with bins
    ``[k/n_bins, (k+1)/n_bins)`` (the last one closed). This is the calibration of
    the positive-class probability, not of the top-label confidence.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels, p = _binary_inputs(y, prob)
    residuals = _calibration_residuals(labels, p, n_bins)
    return float(_weighted_ece(residuals, np.ones((1, labels.size)))[0])


def sensitivity_at_specificity(y: ArrayLike, prob: ArrayLike, specificity: float = 0.90) -> float:
    """Best sensitivity among ROC operating points with specificity >= ``specificity``.

    Uses the empirical ROC curve's points only (no interpolation between them).
    The threshold is chosen on the same data, so this is optimistic for that data.
    nan unless both classes are present.
    """
    if not 0 <= specificity <= 1:
        raise ValueError(f"specificity must be in [0, 1], got {specificity}")
    labels, p = _binary_inputs(y, prob, probability=False)
    if not _has_both_classes(labels):
        return math.nan
    fpr, tpr, _ = roc_curve(labels, p, drop_intermediate=False)
    # The curve starts at (0, 0), so at least one point always qualifies.
    return float(tpr[fpr <= 1 - specificity + _SPEC_TOL].max())


def threshold_for_sensitivity(y: ArrayLike, prob: ArrayLike, target: float = 0.95) -> float:
    """Largest threshold ``t`` with sensitivity (positive when prob >= t) >= ``target``.

    Sensitivity only changes at positive scores, so ``t`` is the k-th highest
    positive score with ``k = ceil(target * n_pos)``. Ties: images scoring exactly
    ``t`` are called positive, so tied positives can push the achieved sensitivity
    above ``target`` (tied negatives become false positives likewise); any larger
    threshold falls below ``target``. nan when there are no positives. Choose the
    threshold on validation data and apply it unchanged to test data.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    labels, p = _binary_inputs(y, prob, probability=False)
    pos_scores = np.sort(p[labels == 1])[::-1]
    if pos_scores.size == 0:
        return math.nan
    # The slack keeps e.g. 0.95 * 20 = 19.000000000000004 from requiring 20 positives.
    k = math.ceil(target * pos_scores.size - 1e-9)
    return float(pos_scores[min(max(k, 1), pos_scores.size) - 1])


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float) -> BinaryMetrics:
    """All binary metrics at ``threshold`` (positive when prob >= threshold).

    Undefined values are nan: see the module docstring.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    labels, p = _binary_inputs(y_true, prob)
    pred = (p >= threshold).astype(np.intp)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(labels, pred, labels=[0, 1]).ravel())
    rates = _rates_from_counts(*(np.array(float(c)) for c in (tn, fp, fn, tp)))
    both = _has_both_classes(labels)
    return BinaryMetrics(
        **{name: float(value) for name, value in rates.items()},
        roc_auc=float(roc_auc_score(labels, p)) if both else math.nan,
        # Average precision is defined (1.0) without negatives, not without positives.
        pr_auc=float(average_precision_score(labels, p)) if labels.any() else math.nan,
        ece=expected_calibration_error(labels, p),
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
        n=int(labels.size),
        n_pos=int(labels.sum()),
        threshold=float(threshold),
    )


# ----------------------------------------------------------------------------- weighted curves


@dataclass(frozen=True)
class _RankTable:
    """Images sorted by descending score, with the start of each distinct score level."""

    order: IntArray
    starts: IntArray
    y_sorted: FloatArray


def _rank_table(y: IntArray, score: FloatArray) -> _RankTable:
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return _RankTable(order=order, starts=starts, y_sorted=y[order].astype(np.float64))


def _level_counts(table: _RankTable, weights: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Positive and negative weight at each score level (highest first), shape (B, K)."""
    w = weights[:, table.order]
    pos = np.add.reduceat(w * table.y_sorted, table.starts, axis=1)
    neg = np.add.reduceat(w, table.starts, axis=1) - pos
    return pos, neg


def _weighted_auc(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """Mann-Whitney AUC: P(score_pos > score_neg) + P(tie) / 2, per row."""
    fps = np.cumsum(neg, axis=1)
    n_neg = fps[:, -1:]
    # Levels run high to low: a positive beats every negative on lower levels
    # (n_neg - fps) and half of the negatives on its own level.
    wins = (pos * (n_neg - fps + 0.5 * neg)).sum(axis=1)
    return _div(wins, pos.sum(axis=1) * n_neg[:, 0])


def _weighted_curve_metrics(
    pos: FloatArray, neg: FloatArray, specificity: float
) -> dict[str, FloatArray]:
    """ROC AUC, average precision and sensitivity at specificity, per row."""
    tps, fps = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tps[:, -1], fps[:, -1]
    called = tps + fps
    # Precision at each level; where nothing is called positive yet, pos is 0 there too.
    precision = np.divide(tps, called, out=np.zeros_like(tps), where=called > 0)
    ap = _div((pos * precision).sum(axis=1), n_pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = fps / n_neg[:, None] <= 1 - specificity + _SPEC_TOL
        sens = np.where(ok, tps / n_pos[:, None], 0.0).max(axis=1)
    sens[(n_pos == 0) | (n_neg == 0)] = np.nan
    return {"roc_auc": _weighted_auc(pos, neg), "pr_auc": ap, SENS_AT_SPEC90: sens}


def _weighted_binary_metrics(
    y: IntArray,
    prob: FloatArray,
    threshold: float,
    weights: FloatArray,
    table: _RankTable,
    residuals: FloatArray,
) -> dict[str, FloatArray]:
    """Every bootstrapped metric for each row of ``weights`` (B, N)."""
    pred = prob >= threshold
    pos, neg = y == 1, y == 0
    masks = (neg & ~pred, neg & pred, pos & ~pred, pos & pred)  # tn, fp, fn, tp
    counts = [weights @ mask.astype(np.float64) for mask in masks]
    rates = _rates_from_counts(*counts)
    level_pos, level_neg = _level_counts(table, weights)
    rates.update(_weighted_curve_metrics(level_pos, level_neg, 0.90))
    rates["ece"] = _weighted_ece(residuals, weights)
    return rates


# ----------------------------------------------------------------------------- bootstrap


def _group_codes(groups: ArrayLike | None, n: int) -> tuple[IntArray, int]:
    """Integer group code per image, and the number of groups."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    _, codes = np.unique(g, return_inverse=True)
    codes = codes.reshape(-1).astype(np.intp)
    return codes, int(codes.max()) + 1


def _resample_weights(
    codes: IntArray, n_groups: int, n_boot: int, seed: int
) -> Iterator[FloatArray]:
    """Yield (chunk, N) image weights: how often each image's group was drawn.

    Each resample draws ``n_groups`` groups with replacement; an image weighs as
    many times as its group was drawn, which equals copying the group's images.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(codes.size, n_groups))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # One bincount for all rows: offset each row's group ids into its own block.
        flat = (draws + n_groups * np.arange(b)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, codes].astype(np.float64)


def _percentile_interval(samples: FloatArray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the resamples where the metric is defined."""
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_metrics(
    y: ArrayLike,
    prob: ArrayLike,
    groups: ArrayLike | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, MetricCI]:
    """Percentile bootstrap CIs that resample groups, for every rate metric.

    ``groups`` holds one group id per image (duplicate cluster or patient); whole
    groups are drawn with replacement. ``None`` treats every image as its own
    group, which is only honest when images are known to be independent.
    Keys: :data:`RATE_METRICS` plus ``"sens_at_spec90"``. ``value`` is the point
    estimate on the original data; resamples where a metric is undefined (e.g. no
    positive drawn) are left out of that metric's interval.
    """
    _check_alpha(alpha)
    labels, p = _binary_inputs(y, prob)
    point = binary_metrics(labels, p, threshold)
    values = {name: getattr(point, name) for name in RATE_METRICS}
    values[SENS_AT_SPEC90] = sensitivity_at_specificity(labels, p, 0.90)

    codes, n_groups = _group_codes(groups, labels.size)
    table = _rank_table(labels, p)
    residuals = _calibration_residuals(labels, p, 10)
    chunks = [
        _weighted_binary_metrics(labels, p, threshold, w, table, residuals)
        for w in _resample_weights(codes, n_groups, n_boot, seed)
    ]
    result = {}
    for name, value in values.items():
        samples = np.concatenate([chunk[name] for chunk in chunks])
        result[name] = MetricCI(value, *_percentile_interval(samples, alpha))
    return result


def paired_bootstrap_auc_difference(
    y: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    groups: ArrayLike | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedDiff:
    """ROC AUC of model a minus model b, with a paired grouped bootstrap.

    Both models are scored on the same group resamples, so their correlation is
    kept. ``p_value`` is two-sided: twice the smaller of the shares of resamples
    with difference <= 0 and >= 0, capped at 1. It is approximate (a bootstrap
    percentile test, resolution 1/n_boot), not an exact DeLong test.
    All fields are nan unless both classes are present.
    """
    _check_alpha(alpha)
    labels, a = _binary_inputs(y, prob_a, probability=False)
    b = _as_scores(prob_b, labels.size, probability=False)
    if not _has_both_classes(labels):
        return PairedDiff(math.nan, math.nan, math.nan, math.nan)
    diff = float(roc_auc_score(labels, a) - roc_auc_score(labels, b))

    codes, n_groups = _group_codes(groups, labels.size)
    table_a, table_b = _rank_table(labels, a), _rank_table(labels, b)
    parts = [
        _weighted_auc(*_level_counts(table_a, w)) - _weighted_auc(*_level_counts(table_b, w))
        for w in _resample_weights(codes, n_groups, n_boot, seed)
    ]
    samples = np.concatenate(parts)
    samples = samples[~np.isnan(samples)]
    low, high = _percentile_interval(samples, alpha)
    if samples.size == 0:
        return PairedDiff(diff, low, high, math.nan)
    p_value = min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0)))
    return PairedDiff(diff, low, high, float(p_value))


def _delong_components(pos: FloatArray, neg: FloatArray) -> tuple[float, FloatArray, FloatArray]:
    """AUC and its structural components V10 (per positive) and V01 (per negative)."""
    from scipy.stats import rankdata

    m, n = pos.size, neg.size
    both = rankdata(np.concatenate([pos, neg]))
    v10 = (both[:m] - rankdata(pos)) / n
    v01 = 1.0 - (both[m:] - rankdata(neg)) / m
    return float(v10.mean()), v10, v01


def delong_auc_difference(y: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike) -> PairedDiff:
    """DeLong's test for AUC(a) - AUC(b) on the same images (95% normal interval).

    It assumes the images are independent, which near-duplicates and several
    images per patient break; prefer :func:`paired_bootstrap_auc_difference`
    over groups and show this one beside it.
    """
    labels, a = _binary_inputs(y, prob_a, probability=False)
    b = _as_scores(prob_b, labels.size, probability=False)
    if not _has_both_classes(labels):
        return PairedDiff(math.nan, math.nan, math.nan, math.nan)
    from scipy.stats import norm

    pos, neg = labels == 1, labels == 0
    auc_a, a10, a01 = _delong_components(a[pos], a[neg])
    auc_b, b10, b01 = _delong_components(b[pos], b[neg])
    s10 = np.cov(np.vstack([a10, b10]))
    s01 = np.cov(np.vstack([a01, b01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum() + (
        s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
    ) / neg.sum()
    diff = auc_a - auc_b
    if not var > 0:  # identical scores: no difference to test
        return PairedDiff(diff, diff, diff, 1.0 if diff == 0 else 0.0)
    se = math.sqrt(var)
    p_value = float(2 * norm.sf(abs(diff) / se))
    return PairedDiff(diff, diff - 1.959964 * se, diff + 1.959964 * se, p_value)


# ----------------------------------------------------------------------------- temperature


def _as_logits(logits: ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with N >= 1, C >= 2, got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z


def _as_class_labels(y: ArrayLike, n: int, n_classes: int) -> IntArray:
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if not np.isin(labels, np.arange(n_classes)).all():
        raise ValueError(f"labels must be integers in [0, {n_classes})")
    return labels.astype(np.intp)


def fit_temperature(
    logits: ArrayLike, y: ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature T minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    ``logits`` is (N, C) with C >= 2 (for a single binary logit z, pass
    ``[0, z]``). The search is over log T, which keeps T positive and makes the
    objective better conditioned; a result at a bound means the optimum lies outside.
    """
    z = _as_logits(logits)
    labels = _as_class_labels(y, z.shape[0], z.shape[1])
    rows = np.arange(z.shape[0])

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, labels].mean())

    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    res = minimize_scalar(
        nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5}
    )
    return float(math.exp(res.x))


def apply_temperature(logits: ArrayLike, temperature: float) -> FloatArray:
    """Calibrated probabilities ``softmax(logits / T)``, shape (N, C)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return softmax(_as_logits(logits) / temperature, axis=1)


# ----------------------------------------------------------------------------- multiclass


def classification_report_text(y: ArrayLike, pred: ArrayLike, class_names: Sequence[str]) -> str:
    """scikit-learn's text report; every class is listed, undefined values show nan."""
    return str(
        classification_report(
            y,
            pred,
            labels=list(range(len(class_names))),
            target_names=list(class_names),
            digits=3,
            zero_division=np.nan,
        )
    )


def multiclass_metrics(
    y: ArrayLike, probs: ArrayLike, class_names: Sequence[str]
) -> MulticlassMetrics:
    """Metrics of argmax predictions from (N, C) class probabilities.

    ``roc_auc`` is the mean of the per-class one-vs-rest AUCs (sklearn's macro
    OvR) and is nan if any class is absent from ``y``, as is
    ``balanced_accuracy``. ``macro_f1`` leaves out classes whose F1 is undefined
    (never present and never predicted).
    """
    p = _as_logits(probs)  # same shape and finiteness checks as logits
    names = tuple(class_names)
    if p.shape[1] != len(names):
        raise ValueError(f"probs has {p.shape[1]} columns but {len(names)} class names")
    labels = _as_class_labels(y, p.shape[0], len(names))
    pred = p.argmax(axis=1)
    ids = list(range(len(names)))

    per_class = {
        name: float(roc_auc_score(labels == k, p[:, k]))
        if _has_both_classes((labels == k).astype(np.intp))
        else math.nan
        for k, name in enumerate(names)
    }
    all_present = np.isin(ids, labels).all()
    return MulticlassMetrics(
        accuracy=float(np.mean(pred == labels)),
        balanced_accuracy=float(balanced_accuracy_score(labels, pred)) if all_present else math.nan,
        macro_f1=float(f1_score(labels, pred, labels=ids, average="macro", zero_division=np.nan)),
        roc_auc=float(np.mean(list(per_class.values()))),
        roc_auc_per_class=per_class,
        confusion_matrix=confusion_matrix(labels, pred, labels=ids).tolist(),
        report=classification_report(
            labels,
            pred,
            labels=ids,
            target_names=list(names),
            zero_division=np.nan,
            output_dict=True,
        ),
        report_text=classification_report_text(labels, pred, names),
        class_names=names,
        n=int(labels.size),
    )


# ----------------------------------------------------------------------------- serialisation


def to_dict(obj: Any) -> Any:
    """Plain JSON-able structure from these dataclasses (and dicts/lists of them).

    numpy scalars and arrays become Python numbers and lists; NaN stays a float
    NaN (the JSON writer turns it into null).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(key): to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_dict(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

"""Tests for breastcad.metrics: sklearn agreement, nan for undefined, grouped bootstrap."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from breastcad import metrics as m
from breastcad.metrics import (
    RATE_METRICS,
    SENS_AT_SPEC90,
    BinaryMetrics,
    MetricCI,
    apply_temperature,
    binary_metrics,
    bootstrap_metrics,
    classification_report_text,
    expected_calibration_error,
    fit_temperature,
    multiclass_metrics,
    paired_bootstrap_auc_difference,
    sensitivity_at_specificity,
    threshold_for_sensitivity,
    to_dict,
)

# Hand-made case. Sorted by prob (desc): 0.9 P, 0.8 N, 0.7 P, 0.6 P, 0.4 N, 0.35 N, 0.2 P, 0.1 N.
HAND_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
HAND_P = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.6])


def _scored_data(
    n: int, seed: int, separation: float = 0.3, n_groups: int | None = None
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.intp]]:
    """Labels, probabilities that carry signal, and random group ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    prob = np.clip(0.5 + separation * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    groups = rng.integers(0, n_groups or n, n)
    return y, prob, groups


def _width(ci: MetricCI) -> float:
    return ci.high - ci.low


def _sample_labels(probs: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.intp]:
    """One class per row drawn from that row's probabilities."""
    u = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


# ----------------------------------------------------------------------------- binary point values


def test_binary_metrics_hand_computed() -> None:
    r = binary_metrics(HAND_Y, HAND_P, threshold=0.5)
    # Called positive (>= 0.5): negative 0.8 -> fp=1, tn=3; positives 0.7, 0.9, 0.6 -> tp=3, fn=1.
    assert (r.tn, r.fp, r.fn, r.tp, r.n, r.n_pos) == (3, 1, 1, 3, 8, 4)
    # accuracy 6/8; sensitivity, specificity, precision, npv all 3/4; f1 = 2*3/(6+1+1) = 0.75.
    for name in ("accuracy", "balanced_accuracy", "precision", "sensitivity", "specificity"):
        assert getattr(r, name) == pytest.approx(0.75)
    assert r.npv == pytest.approx(0.75) and r.f1 == pytest.approx(0.75)
    # AUC: positive 0.7 beats 3 negatives, 0.9 beats 4, 0.2 beats 1, 0.6 beats 3 -> 11/16.
    assert r.roc_auc == pytest.approx(11 / 16)
    # AP: precision at each positive in rank order: 1/1, 2/3, 3/4, 4/7 -> mean = 251/336.
    assert r.pr_auc == pytest.approx(251 / 336)
    # Every prob falls in its own 0.1-wide bin, so ECE = mean |y - p| = 3.25 / 8.
    assert r.ece == pytest.approx(3.25 / 8)
    assert r.threshold == 0.5
    # Specificity >= 0.9 with 4 negatives means no false positive: only 0.9 is called -> 1/4.
    assert sensitivity_at_specificity(HAND_Y, HAND_P, 0.9) == pytest.approx(0.25)
    assert sensitivity_at_specificity(HAND_Y, HAND_P, 0.75) == pytest.approx(0.75)


def test_threshold_is_inclusive() -> None:
    r = binary_metrics([0, 1], [0.5, 0.5], threshold=0.5)
    assert (r.fp, r.tp) == (1, 1)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.73])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    y, prob, _ = _scored_data(300, seed=3)
    prob = np.round(prob, 2)  # ties
    r = binary_metrics(y, prob, threshold)
    pred = (prob >= threshold).astype(int)
    assert r.accuracy == pytest.approx(accuracy_score(y, pred))
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert r.precision == pytest.approx(precision_score(y, pred))
    assert r.sensitivity == pytest.approx(recall_score(y, pred))
    assert r.specificity == pytest.approx(recall_score(y, pred, pos_label=0))
    assert r.npv == pytest.approx(precision_score(y, pred, pos_label=0))
    assert r.f1 == pytest.approx(f1_score(y, pred))
    assert r.roc_auc == pytest.approx(roc_auc_score(y, prob))
    assert r.pr_auc == pytest.approx(average_precision_score(y, prob))


@pytest.mark.filterwarnings("error")
def test_degenerate_inputs_give_nan_without_warnings() -> None:
    only_neg = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], threshold=0.5)
    for name in ("sensitivity", "balanced_accuracy", "roc_auc", "pr_auc"):
        assert math.isnan(getattr(only_neg, name)), name
    assert only_neg.specificity == pytest.approx(2 / 3)
    # Nothing called positive: precision undefined, F1 (2tp/(2tp+fp+fn)) is 0 since fn > 0.
    none_called = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert math.isnan(none_called.precision)
    assert none_called.f1 == 0.0 and none_called.npv == pytest.approx(1 / 3)
    # No positives and none called: F1 undefined too.
    assert math.isnan(binary_metrics([0, 0], [0.1, 0.2], threshold=0.9).f1)
    only_pos = binary_metrics([1, 1], [0.2, 0.7], threshold=0.5)
    assert math.isnan(only_pos.specificity) and math.isnan(only_pos.roc_auc)
    assert math.isnan(only_pos.npv) is False and only_pos.pr_auc == 1.0
    assert math.isnan(sensitivity_at_specificity([1, 1], [0.2, 0.7]))
    assert math.isnan(threshold_for_sensitivity([0, 0], [0.2, 0.7]))
    cis = bootstrap_metrics([0, 0, 0], [0.1, 0.6, 0.3], [1, 2, 3], 0.5, n_boot=50)
    assert math.isnan(cis["roc_auc"].value) and math.isnan(cis["roc_auc"].low)
    assert cis["specificity"].low <= cis["specificity"].high
    diff = paired_bootstrap_auc_difference([1, 1], [0.2, 0.7], [0.3, 0.1], None, n_boot=20)
    assert all(math.isnan(v) for v in (diff.diff, diff.low, diff.high, diff.p_value))


@pytest.mark.parametrize(
    ("y", "prob"),
    [
        ([0, 2], [0.1, 0.2]),  # label not 0/1
        ([0, 1], [0.1, 1.2]),  # not a probability
        ([0, 1], [0.1]),  # length mismatch
        ([], []),  # empty
        ([0, 1], [0.1, np.nan]),  # nan score
    ],
)
def test_invalid_inputs_raise(y: list[int], prob: list[float]) -> None:
    with pytest.raises(ValueError):
        binary_metrics(y, prob, 0.5)


# ----------------------------------------------------------------------------- operating points


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("decimals", [2, 8])  # with and without tied scores
def test_threshold_for_sensitivity_is_largest_reaching_target(target: float, decimals: int) -> None:
    y, prob, _ = _scored_data(203, seed=5)
    prob = np.round(prob, decimals)
    t = threshold_for_sensitivity(y, prob, target)

    def sens(threshold: float) -> float:
        return float(np.mean(prob[y == 1] >= threshold))

    assert sens(t) >= target
    assert sens(float(np.nextafter(t, np.inf))) < target


def test_threshold_for_sensitivity_hand_case() -> None:
    # Positive scores high to low: 0.9, 0.7, 0.6, 0.2; k = ceil(target * 4).
    assert threshold_for_sensitivity(HAND_Y, HAND_P, 0.5) == 0.7
    assert threshold_for_sensitivity(HAND_Y, HAND_P, 0.75) == 0.6
    assert threshold_for_sensitivity(HAND_Y, HAND_P, 0.95) == 0.2
    # 0.56 * 25 evaluates to 14.000000000000002: 14 of 25 positives must still suffice.
    y25 = np.ones(25, dtype=int)
    p25 = np.arange(1, 26) / 100
    assert threshold_for_sensitivity(y25, p25, 0.56) == pytest.approx(0.12)


def test_sensitivity_at_specificity_counts_exact_target() -> None:
    # 10 negatives; at threshold 0.85 one of them is called: specificity exactly 0.9
    # (computed as 1 - 1/10, which is 0.9 only up to rounding) and sensitivity 3/4.
    y = np.array([0] * 10 + [1] * 4)
    prob = np.array([0.1] * 9 + [0.9] + [0.95, 0.92, 0.85, 0.05])
    assert sensitivity_at_specificity(y, prob, 0.9) == pytest.approx(0.75)
    weights = np.ones((1, y.size))
    fast = m._weighted_curve_metrics(*m._level_counts(m._rank_table(y, prob), weights), 0.9)
    assert fast[SENS_AT_SPEC90][0] == pytest.approx(0.75)


def test_sensitivity_at_specificity_matches_brute_force() -> None:
    y, prob, _ = _scored_data(150, seed=8)
    prob = np.round(prob, 2)
    best = 0.0
    for t in np.unique(prob):
        pred = prob >= t
        if np.mean(~pred[y == 0]) >= 0.9:
            best = max(best, float(np.mean(pred[y == 1])))
    assert sensitivity_at_specificity(y, prob, 0.9) == pytest.approx(best)


# ----------------------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(11)
    p = rng.random(20_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    # Truth in each half averages 0.75 / 0.25 against claimed 0.99 / 0.01: ECE ~ 0.24.
    assert expected_calibration_error(y, overconfident) > 0.2


def test_ece_puts_probability_one_in_last_bin() -> None:
    # 0.95 and 1.0 share the last bin: |mean y - mean p| = |1 - 0.975| over all images.
    assert expected_calibration_error([1, 1], [0.95, 1.0], n_bins=10) == pytest.approx(0.025)
    # Bins are [0.1, 0.2) etc.: 0.14 and 0.16 share one, so ECE = |0.5 - 0.15|, not the mean gap.
    assert expected_calibration_error([0, 1], [0.14, 0.16], n_bins=10) == pytest.approx(0.35)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t_true: float) -> None:
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 3, size=(4000, 3))
    y = _sample_labels(softmax(logits / t_true, axis=1), rng)
    t_hat = fit_temperature(logits, y)
    assert abs(t_hat - t_true) / t_true < 0.10


def test_apply_temperature_is_softmax_of_scaled_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    probs = apply_temperature(logits, 2.0)
    np.testing.assert_allclose(probs, softmax(logits / 2.0, axis=1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # A higher temperature flattens: the top class loses probability.
    assert apply_temperature(logits, 4.0)[0, 0] < probs[0, 0] < apply_temperature(logits, 1.0)[0, 0]
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)
    with pytest.raises(ValueError):
        fit_temperature(logits[:, :1], [0, 0])  # one class column


# ----------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("decimals", [2, 8])
def test_weighted_core_matches_sklearn_on_repeated_data(decimals: int) -> None:
    """Integer weights must equal physically repeating images (the bootstrap's meaning)."""
    y, prob, _ = _scored_data(80, seed=13)
    prob = np.round(prob, decimals)
    weights = np.random.default_rng(14).integers(0, 4, size=(6, y.size)).astype(float)
    weights[0, y == 1] = 0  # one resample without positives: everything positive-based is nan
    table = m._rank_table(y, prob)
    residuals = m._calibration_residuals(y, prob, 10)
    fast = m._weighted_binary_metrics(y, prob, 0.5, weights, table, residuals)
    for row, w in enumerate(weights.astype(int)):
        y_rep, p_rep = np.repeat(y, w), np.repeat(prob, w)
        ref = binary_metrics(y_rep, p_rep, 0.5)
        for name in RATE_METRICS:
            np.testing.assert_allclose(fast[name][row], getattr(ref, name), err_msg=name)
        spec90 = sensitivity_at_specificity(y_rep, p_rep, 0.9)
        np.testing.assert_allclose(fast[SENS_AT_SPEC90][row], spec90)
    assert math.isnan(fast["roc_auc"][0]) and math.isnan(fast["sensitivity"][0])


def test_grouped_ci_wider_than_image_level_with_duplicates() -> None:
    base_y, base_p, _ = _scored_data(150, seed=15)
    # Every image appears 4 times (near-duplicates): the 600 images carry only 150 images' worth.
    y, prob = np.repeat(base_y, 4), np.repeat(base_p, 4)
    dup_groups = np.repeat(np.arange(150), 4)
    grouped = bootstrap_metrics(y, prob, dup_groups, 0.5, n_boot=500, seed=1)
    naive = bootstrap_metrics(y, prob, np.arange(600), 0.5, n_boot=500, seed=1)
    for name in ("accuracy", "sensitivity", "roc_auc", "ece"):
        # Expected ratio ~ sqrt(4) = 2.
        assert _width(grouped[name]) > 1.5 * _width(naive[name]), name
        assert grouped[name].value == naive[name].value


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    y, prob, groups = _scored_data(300, seed=16, n_groups=250)
    cis = bootstrap_metrics(y, prob, groups, 0.5, n_boot=300, seed=7)
    point = binary_metrics(y, prob, 0.5)
    assert set(cis) == {*RATE_METRICS, SENS_AT_SPEC90}
    for name, ci in cis.items():
        assert ci.low <= ci.value <= ci.high, name
        assert 0 <= ci.low < ci.high <= 1, name
        if name != SENS_AT_SPEC90:
            assert ci.value == getattr(point, name)
    assert cis[SENS_AT_SPEC90].value == sensitivity_at_specificity(y, prob, 0.9)
    assert bootstrap_metrics(y, prob, groups, 0.5, n_boot=300, seed=7) == cis
    assert bootstrap_metrics(y, prob, groups, 0.5, n_boot=300, seed=8) != cis
    narrower = bootstrap_metrics(y, prob, groups, 0.5, n_boot=300, seed=7, alpha=0.5)
    assert _width(narrower["roc_auc"]) < _width(cis["roc_auc"])


def test_bootstrap_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    y, prob, groups = _scored_data(60, seed=17, n_groups=40)
    whole = bootstrap_metrics(y, prob, groups, 0.5, n_boot=50, seed=3)
    monkeypatch.setattr(m, "_CHUNK_ELEMENTS", 7 * 60)  # 7 resamples per chunk, last one short
    assert bootstrap_metrics(y, prob, groups, 0.5, n_boot=50, seed=3) == whole


def test_bootstrap_drops_resamples_where_metric_is_undefined() -> None:
    # 2 positives among 60 images: many resamples draw no positive at all.
    y = np.zeros(60, dtype=int)
    y[:2] = 1
    prob = np.linspace(0.9, 0.0, 60)
    cis = bootstrap_metrics(y, prob, None, 0.5, n_boot=200, seed=0)
    for name in ("sensitivity", "roc_auc", "pr_auc"):
        assert np.isfinite([cis[name].low, cis[name].high]).all(), name
    assert cis["sensitivity"].low == 1.0  # both positives score above 0.5


def test_bootstrap_speed_at_busi_scale() -> None:
    y, prob, groups = _scored_data(650, seed=18, n_groups=600)
    start = time.perf_counter()
    bootstrap_metrics(y, prob, groups, 0.5, n_boot=1000)
    assert time.perf_counter() - start < 3.0  # measured ~0.15 s on the 2-core machine


def test_paired_difference() -> None:
    y, prob, groups = _scored_data(200, seed=19, n_groups=150)
    same = paired_bootstrap_auc_difference(y, prob, prob, groups, n_boot=200)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    noise = np.random.default_rng(20).random(y.size)
    better = paired_bootstrap_auc_difference(y, prob, noise, groups, n_boot=200)
    assert better.diff == pytest.approx(roc_auc_score(y, prob) - roc_auc_score(y, noise))
    assert 0 < better.low < better.diff < better.high
    assert better.p_value < 0.01
    reverse = paired_bootstrap_auc_difference(y, noise, prob, groups, n_boot=200)
    assert reverse.diff == pytest.approx(-better.diff) and reverse.high < 0


# ----------------------------------------------------------------------------- multiclass


def test_multiclass_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(21)
    names = ("normal", "benign", "malignant")
    y = rng.integers(0, 3, 200)
    probs = softmax(rng.normal(0, 1, (200, 3)) + 2 * np.eye(3)[y], axis=1)
    r = multiclass_metrics(y, probs, names)
    pred = probs.argmax(axis=1)
    assert r.accuracy == pytest.approx(accuracy_score(y, pred))
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert r.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    assert r.roc_auc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert np.array(r.confusion_matrix).sum() == 200 == r.n
    assert np.trace(np.array(r.confusion_matrix)) == int((pred == y).sum())
    assert r.report["malignant"]["support"] == int((y == 2).sum())
    assert r.report_text == classification_report_text(y, pred, names)
    assert all(name in r.report_text for name in names)


@pytest.mark.filterwarnings("error")
def test_multiclass_missing_class_gives_nan() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    r = multiclass_metrics([0, 1, 0], probs, ["a", "b", "c"])
    assert math.isnan(r.roc_auc) and math.isnan(r.roc_auc_per_class["c"])
    assert math.isnan(r.balanced_accuracy)
    assert r.roc_auc_per_class["a"] == 1.0 and r.accuracy == 1.0
    assert r.confusion_matrix == [[2, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert r.macro_f1 == 1.0  # class "c" (absent, never predicted) has no F1 and is left out


# ----------------------------------------------------------------------------- serialisation


def test_to_dict_is_plain_json() -> None:
    metrics = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
    d = to_dict(metrics)
    assert set(d) == {f for f in BinaryMetrics.__dataclass_fields__}
    assert isinstance(d["tn"], int) and math.isnan(d["roc_auc"])
    cis = to_dict(bootstrap_metrics(*_scored_data(40, seed=22)[:2], None, 0.5, n_boot=20))
    assert set(cis["roc_auc"]) == {"value", "low", "high"}
    multi = to_dict(multiclass_metrics([0, 1], [[0.8, 0.2], [0.3, 0.7]], ["a", "b"]))
    assert multi["class_names"] == ["a", "b"]
    # Round-trips through JSON with nothing but plain types (NaN allowed by json.dumps).
    for obj in (d, cis, multi):
        assert json.loads(json.dumps(obj, allow_nan=True)).keys() == obj.keys()
        _assert_plain(obj)


def _assert_plain(obj: object) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert type(key) is str
            _assert_plain(value)
    elif isinstance(obj, list):
        for value in obj:
            _assert_plain(value)
    else:
        assert type(obj) in (int, float, str, bool, type(None)), type(obj)

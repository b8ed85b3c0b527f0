from __future__ import annotations

import numpy as np
import pytest

from breastcad.data.splits import assert_no_group_leak, make_folds
from breastcad.errors import DataError


def _planted(n_groups: int = 60, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Groups of 1-4 duplicates, each group with one label, about 1/3 positive."""
    rng = np.random.default_rng(seed)
    targets, groups = [], []
    for g in range(n_groups):
        label = int(rng.random() < 0.33)
        for _ in range(rng.integers(1, 5)):
            targets.append(label)
            groups.append(f"g{g}")
    return np.array(targets), groups


def test_no_group_ever_spans_two_parts() -> None:
    y, groups = _planted()
    plans = make_folds(y, groups, n_folds=5, seed=3, val_fraction=0.2, repeats=2)
    assert len(plans) == 10
    for plan in plans:
        assert_no_group_leak(plan, groups)
        g = np.asarray(groups)
        assert not set(g[plan.test]) & set(g[plan.train])
        assert not set(g[plan.val]) & (set(g[plan.train]) | set(g[plan.test]))


def test_each_repeat_partitions_every_sample_once() -> None:
    y, groups = _planted()
    plans = make_folds(y, groups, n_folds=4, seed=0)
    tests = np.concatenate([p.test for p in plans])
    assert sorted(tests.tolist()) == list(range(len(y)))
    for p in plans:
        together = np.concatenate([p.train, p.val, p.test])
        assert sorted(together.tolist()) == list(range(len(y)))


def test_folds_are_stratified_and_reproducible() -> None:
    y, groups = _planted(120)
    a = make_folds(y, groups, n_folds=5, seed=7)
    b = make_folds(y, groups, n_folds=5, seed=7)
    c = make_folds(y, groups, n_folds=5, seed=8)
    assert all(np.array_equal(p.test, q.test) for p, q in zip(a, b, strict=True))
    assert any(not np.array_equal(p.test, q.test) for p, q in zip(a, c, strict=True))
    overall = y.mean()
    for p in a:
        assert abs(y[p.test].mean() - overall) < 0.15


def test_leak_check_detects_a_shared_group() -> None:
    y, groups = _planted()
    plan = make_folds(y, groups, n_folds=3, seed=0)[0]
    leaky = list(groups)
    leaky[plan.test[0]] = groups[plan.train[0]]
    with pytest.raises(AssertionError, match="groups in both train and test"):
        assert_no_group_leak(plan, leaky)


def test_too_few_groups_is_a_clear_error() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    groups = ["a", "b", "c", "d", "e", "e"]
    with pytest.raises(DataError, match="class 1 has only 1 independent image group"):
        make_folds(y, groups, n_folds=2, seed=0)

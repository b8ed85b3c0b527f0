"""Stratified *grouped* folds: duplicate clusters and patients never cross a split.

For every outer fold the training part is split once more, grouped and
stratified, into the data that fits the weights and a validation part that
chooses the epoch and the temperature. The test fold is only predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastcad.errors import DataError


@dataclass(frozen=True)
class FoldPlan:
    repeat: int
    seed: int
    fold: int
    train: np.ndarray  # indices into the sample list
    val: np.ndarray
    test: np.ndarray

    @property
    def name(self) -> str:
        return f"fold-{self.fold}" if self.repeat == 0 else f"repeat-{self.repeat}/fold-{self.fold}"


def _group_codes(groups: Sequence[str]) -> np.ndarray:
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return codes


def _check_enough_groups(targets: np.ndarray, codes: np.ndarray, n_splits: int, what: str) -> None:
    for cls in np.unique(targets):
        n = len(np.unique(codes[targets == cls]))
        if n < n_splits:
            raise DataError(
                f"class {cls} has only {n} independent image group(s) in {what}; "
                f"{n_splits} are needed (lower --folds or add data)"
            )


def grouped_split(
    targets: np.ndarray, codes: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(sgkf.split(np.zeros(len(targets)), targets, codes))


def make_folds(
    targets: Sequence[int],
    groups: Sequence[str],
    n_folds: int,
    seed: int,
    val_fraction: float = 0.2,
    repeats: int = 1,
) -> list[FoldPlan]:
    """Outer grouped k-fold, ``repeats`` times (seeds ``seed + r``), each with an inner split."""
    y = np.asarray(targets)
    codes = _group_codes(groups)
    _check_enough_groups(y, codes, n_folds, "the dataset")
    n_inner = max(2, round(1.0 / val_fraction))
    plans: list[FoldPlan] = []
    for r in range(repeats):
        rseed = seed + r
        for k, (train_val, test) in enumerate(grouped_split(y, codes, n_folds, rseed)):
            yk, ck = y[train_val], codes[train_val]
            _check_enough_groups(yk, ck, n_inner, f"the training part of fold {k}")
            inner_train, inner_val = grouped_split(yk, ck, n_inner, rseed + 1000 * (k + 1))[0]
            plans.append(
                FoldPlan(
                    repeat=r,
                    seed=rseed,
                    fold=k,
                    train=np.sort(train_val[inner_train]),
                    val=np.sort(train_val[inner_val]),
                    test=np.sort(test),
                )
            )
    return plans


def assert_no_group_leak(plan: FoldPlan, groups: Sequence[str]) -> None:
    """Raise if any group appears in two of train / val / test."""
    g = np.asarray(groups, dtype=object)
    parts = {"train": set(g[plan.train]), "val": set(g[plan.val]), "test": set(g[plan.test])}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = parts[a] & parts[b]
        if shared:
            raise AssertionError(f"{plan.name}: groups in both {a} and {b}: {sorted(shared)[:5]}")

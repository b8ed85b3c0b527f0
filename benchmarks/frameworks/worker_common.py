"""What every contender's worker shares: the job, the inputs, timing, memory, the record.

Imported by the workers in *their own* environments (the Keras ones have no
breastcad, no torch, no scikit-learn), so it needs only the standard library
and numpy.

A job (``job.json``, written by ``bench_frameworks.py``) names the inputs file,
the outer folds to run, the epochs and every setting of the study's basic CNN
as breastcad's configuration holds it. The inputs file (``inputs.npz``) holds
the decoded images once for every contender: ``images`` (N, S, S) uint8,
``targets`` (N,) and, per outer fold K, ``train_K``, ``val_K`` and ``test_K``
index arrays (breastcad's grouped folds, from the run folder's ``folds.json``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Printed by a worker as its last line; the orchestrator reads the record file, not stdout.
DONE_MARK = "FRAMEWORK_BENCH_DONE"


@dataclass(frozen=True)
class Fold:
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class Inputs:
    images: np.ndarray  # (N, S, S) uint8
    targets: np.ndarray  # (N,) int64
    folds: list[Fold]


@dataclass
class EpochRecord:
    epoch: int
    images: int  # training images seen in this epoch
    seconds: float  # training loop only (no validation)
    val_auc: float
    train_loss: float


@dataclass
class FoldRecord:
    fold: int
    best_epoch: int
    val_logits: list[list[float]]  # at the chosen epoch, one row per val index
    test_logits: list[list[float]] | None = None  # at the chosen epoch, one row per test index
    test_probs: list[list[float]] | None = None  # contenders that output probabilities
    epochs: list[EpochRecord] = field(default_factory=list)


def load_job(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_inputs(job: dict[str, Any]) -> Inputs:
    with np.load(job["inputs"]) as z:
        folds = [Fold(k, z[f"train_{k}"], z[f"val_{k}"], z[f"test_{k}"]) for k in job["folds"]]
        return Inputs(images=z["images"], targets=z["targets"].astype(np.int64), folds=folds)


def class_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """breastcad's balanced weights: total / (classes x count), over the training part."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    return counts.sum() / (num_classes * np.maximum(counts, 1))


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney); NaN without both classes."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = np.asarray(score)[order]
    # average ranks over runs of equal scores
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    p = softmax(logits.astype(np.float64))
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())


class EpochChooser:
    """breastcad's rule: keep the epoch with the best validation AUC (ties: lower loss)."""

    def __init__(self, y_val: np.ndarray, positive: int = 1) -> None:
        self.y_val, self.positive = y_val, positive
        self.best_score, self.best_loss, self.best_epoch = -1.0, float("inf"), -1

    def update(self, epoch: int, val_logits: np.ndarray) -> tuple[float, bool]:
        """(val AUC, whether this epoch is the new best)."""
        auc = binary_auc(self.y_val == self.positive, softmax(val_logits)[:, self.positive])
        loss = cross_entropy(val_logits, self.y_val)
        score = auc if np.isfinite(auc) else -loss
        better = score > self.best_score or (score == self.best_score and loss < self.best_loss)
        if better:
            self.best_score, self.best_loss, self.best_epoch = score, loss, epoch
        return auc, better


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own image (VmHWM), MiB.

    Not ``ru_maxrss``: Linux carries that over ``execve`` from the process that
    forked, so a worker started by a large orchestrator would report its size.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_children_mb() -> float:
    """Largest finished child (e.g. compiler workers); 0 when there were none."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def time_inference(predict: Any, n_images: int, min_seconds: float = 2.0) -> dict[str, float]:
    """``predict()`` once untimed (warm-up), then repeatedly for at least ``min_seconds``."""
    predict()
    runs, t0 = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - t0 < min_seconds:
        predict()
        runs += 1
    seconds = time.perf_counter() - t0
    return {"images": n_images * runs, "seconds": seconds, "passes": runs}


def write_record(job: dict[str, Any], record: dict[str, Any]) -> None:
    """The worker's result file, then the done mark on stdout."""
    record = {
        **record,
        "contender": job["contender"],
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_children_mb": peak_rss_children_mb(),
        "python": sys.version.split()[0],
        "pid": os.getpid(),
    }
    record["folds"] = [asdict(f) if isinstance(f, FoldRecord) else f for f in record["folds"]]
    out = Path(job["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(out)
    print(DONE_MARK, flush=True)


def fail(message: str) -> None:
    """A worker's one-line refusal (the orchestrator shows it)."""
    print(f"{message}", file=sys.stderr)
    raise SystemExit(2)

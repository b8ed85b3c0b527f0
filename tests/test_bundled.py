"""The compact BUSI copy that ships with the package (slow: it reads 780 images)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from breastcad.data.audit import run_audit
from breastcad.data.sources import load_source

pytestmark = [pytest.mark.slow, pytest.mark.ci]


@pytest.fixture(scope="module")
def bundled_audit():
    return run_audit(load_source(None))


def test_bundled_copy_is_complete(bundled_audit) -> None:
    counts = Counter(s.label for s in bundled_audit.samples)
    assert counts == {"benign": 437, "malignant": 210, "normal": 133}
    assert not bundled_audit.bad_files
    assert sum(len(s.mask_paths) for s in bundled_audit.samples) == 798


def test_bundled_audit_finds_the_image_under_two_classes(bundled_audit) -> None:
    label_sets = [set(g.labels) for g in bundled_audit.conflict_groups]
    assert {"benign", "malignant"} in label_sets
    excluded = {s.path for s in bundled_audit.samples} - {
        s.path for s in bundled_audit.usable_samples()
    }
    assert any("benign (433)" in p for p in excluded) and any(
        "malignant (145)" in p for p in excluded
    )


def test_train_on_bundled_data_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "breastcad", "train", "--quiet", "--folds", "2", "--epochs", "1",
         "--image-size", "48", "--set", "eval.n_bootstrap=100", "--out", str(run),
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 647 - 17  # benign+malignant minus those in conflict groups
    assert metrics["pooled"]["roc_auc"]["value"] > 0.55  # one epoch already beats chance

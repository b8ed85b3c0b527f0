"""The real CLI, run as a user would, on tiny synthetic datasets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import write_busi_like

FAST = [
    "--quiet",
    "--folds", "2",
    "--epochs", "2",
    "--image-size", "32",
    "--set", "eval.n_bootstrap=50",
    "--set", "cv.val_fraction=0.34",
    "--set", "train.batch_size=8",
]  # fmt: skip


def run_cli(
    *args: str, cwd: Path | None = None, cache: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "breastcad", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        errors="backslashreplace",
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40, normals=3)
    # plant a duplicate (same pixels, re-saved) and a corrupt file
    img = Image.open(data / "benign" / "benign (1).png")
    img.save(data / "benign" / "benign (1) copy.png", optimize=True)
    (data / "malignant" / "broken.png").write_bytes(b"not really a png")
    run = tmp / "run"
    proc = run_cli("train", "--data", str(data), "--out", str(run), *FAST, cache=tmp / "cache")
    return data, run, proc


def test_train_end_to_end_writes_the_run_folder(tiny_run: tuple) -> None:
    data, run, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "audit.json", "folds.json", "env.json", "metrics.json",
                 "oof_predictions.csv", "report.html", "audit.txt"):  # fmt: skip
        assert (run / name).is_file(), name
    for plot in ("training_curves", "roc", "confusion", "reliability", "sample_predictions"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 1000
    for k in (0, 1):
        fold = run / f"fold-{k}"
        for name in ("model.safetensors", "card.json", "history.csv", "DONE"):
            assert (fold / name).is_file(), f"fold-{k}/{name}"
        card = json.loads((fold / "card.json").read_text())
        assert card["class_names"] == ["benign", "malignant"] and card["temperature"] > 0
    for name in ("audit.json", "folds.json", "env.json", "metrics.json"):
        assert json.loads((run / name).read_text())["schema_version"] == 1
    assert "Pooled out-of-fold ROC-AUC" in proc.stdout and str(run) in proc.stdout


def test_oof_predictions_cover_every_sample_once(tiny_run: tuple) -> None:
    _, run, _ = tiny_run
    rows = list(csv.DictReader((run / "oof_predictions.csv").open()))
    header = list(rows[0])
    assert header == ["path", "group", "label", "repeat", "fold", "prob", "prob_raw", "decision"]
    folds = json.loads((run / "folds.json").read_text())
    assert len(rows) == len(folds["samples"]) == 21  # 10 + 10 + the planted copy; normals out
    assert {r["label"] for r in rows} == {"benign", "malignant"}
    threshold = json.loads((run / "metrics.json").read_text())["operating_point"]["threshold"]
    for r in rows:
        p = float(r["prob"])
        assert 0 <= p <= 1
        assert r["decision"] == ("malignant" if p >= threshold else "benign")


def test_duplicates_stay_in_one_fold_and_bad_files_are_listed(tiny_run: tuple) -> None:
    data, run, proc = tiny_run
    folds = json.loads((run / "folds.json").read_text())
    test_fold = folds["repeats"][0]["test_fold"]
    by_group: dict[str, set[int]] = {}
    for s, f in zip(folds["samples"], test_fold, strict=True):
        by_group.setdefault(s["group"], set()).add(f)
    assert all(len(v) == 1 for v in by_group.values())
    paths = {Path(s["path"]).name: s["group"] for s in folds["samples"]}
    assert paths["benign (1).png"] == paths["benign (1) copy.png"]
    audit_text = (run / "audit.txt").read_text()
    assert "broken.png" in audit_text
    assert "broken.png" not in paths


def test_metrics_json_has_cis_and_an_operating_point(tiny_run: tuple) -> None:
    _, run, _ = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    for name in ("roc_auc", "sensitivity", "specificity", "accuracy", "f1", "pr_auc", "ece"):
        v = m["pooled"][name]
        assert set(v) == {"value", "low", "high"}
    auc = m["pooled"]["roc_auc"]
    assert auc["low"] <= auc["value"] <= auc["high"]
    assert m["operating_point"]["target_sensitivity"] == 0.95
    assert len(m["per_fold"]) == 2
    assert np.asarray(m["confusion"]).sum() == 21


def test_report_is_self_contained(tiny_run: tuple) -> None:
    _, run, _ = tiny_run
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert 'src="http' not in html and "Pooled out-of-fold ROC-AUC" in html


def test_audit_command_prints_and_writes(tiny_run: tuple, tmp_path: Path) -> None:
    data, _, _ = tiny_run
    out = tmp_path / "audit.json"
    proc = run_cli("audit", str(data), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1


def test_help_shows_real_examples() -> None:
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    assert "breastcad train --data" in proc.stdout and "--set" in proc.stdout


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "absent", ["absent", "no such file or folder"]),
        (lambda d: (d / "empty").mkdir() or d / "empty", ["no class folders"]),
    ],
)
def test_unusable_data_is_one_clear_line(tmp_path: Path, make, fragments: list[str]) -> None:
    data = make(tmp_path)
    assert_clean_error(run_cli("train", "--data", str(data), *FAST), *fragments)


def test_one_class_folder_is_refused(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "d", n_per_class=4, size=32)
    for f in (data / "malignant").iterdir():
        f.unlink()
    (data / "malignant").rmdir()
    assert_clean_error(
        run_cli("train", "--data", str(data), *FAST, cache=tmp_path / "c"),
        "only one class (benign)",
    )


def test_mask_only_folder_is_refused(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "d", n_per_class=3, size=32)
    for f in data.rglob("*.png"):
        if "_mask" not in f.name:
            f.unlink()
    assert_clean_error(run_cli("audit", str(data), "--quiet"), "only mask files")


def test_manifest_missing_column_is_refused(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,diagnosis\na.png,benign\n")
    assert_clean_error(run_cli("train", "--data", str(csv_path), *FAST), "m.csv", "label")


def test_unknown_setting_is_refused_with_valid_keys() -> None:
    proc = run_cli("train", "--set", "train.epoch=3")
    assert_clean_error(proc, "unknown setting 'train.epoch'", "train.epochs")


def test_three_class_with_repeats(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "d", n_per_class=8, size=32, normals=8)
    run = tmp_path / "run"
    proc = run_cli(
        "train", "--data", str(data), "--task", "three-class", "--repeats", "2", "--out", str(run),
        *FAST, cache=tmp_path / "c",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(malignant vs rest)" in proc.stdout and "AUC over 2 repeats" in proc.stdout
    rows = list(csv.DictReader((run / "oof_predictions.csv").open()))
    assert len(rows) == 2 * 24 and {r["repeat"] for r in rows} == {"0", "1"}
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("normal", "benign", "malignant")]
        assert abs(sum(probs) - 1) < 1e-4
    assert (run / "repeat-1" / "fold-1" / "DONE").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["multiclass"]["confusion_matrix"]) == 3 and m["repeats"]["n"] == 2


def test_unwritable_output_is_one_clear_line(tiny_run: tuple, tmp_path: Path) -> None:
    data, _, _ = tiny_run
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should go")
    proc = run_cli("train", "--data", str(data), "--out", str(blocker / "r"), *FAST)
    assert_clean_error(proc, "cannot create folder")
    proc = run_cli("train", "--data", str(data), "--out", "/dev/full/run", *FAST)
    assert_clean_error(proc, "/dev/full")


def test_class_folder_with_one_image_is_refused(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "d", n_per_class=6, size=32)
    for f in sorted((data / "malignant").iterdir())[2:]:
        f.unlink()  # leaves one image and its mask
    proc = run_cli("train", "--data", str(data), *FAST, cache=tmp_path / "c")
    assert_clean_error(proc, "class 1 has only 1 independent image group", "lower --folds")


def test_empty_dataset_after_exclusions_is_refused(tmp_path: Path) -> None:
    """Every image is a duplicate stored under both classes: nothing is left to train on."""
    data = write_busi_like(tmp_path / "d", n_per_class=3, size=32)
    for f in (data / "malignant").iterdir():
        f.unlink()
    for f in (data / "benign").glob("*.png"):
        if "_mask" not in f.name:
            (data / "malignant" / f.name.replace("benign", "malignant")).write_bytes(f.read_bytes())
    proc = run_cli("train", "--data", str(data), *FAST, cache=tmp_path / "c")
    assert_clean_error(proc, "no images with labels benign, malignant")


def test_predict_matches_the_run_and_skips_bad_files(tiny_run: tuple, tmp_path: Path) -> None:
    """A fold model predicting its own test images reproduces the run's out-of-fold numbers."""
    data, run, _ = tiny_run
    oof = {r["path"]: r for r in csv.DictReader((run / "oof_predictions.csv").open())}
    per_fold = {}
    for k in (0, 1):
        out = tmp_path / f"fold{k}.csv"
        proc = run_cli("predict", str(run), str(data), "--fold", str(k), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert (
            "skipped" in proc.stderr and "broken.png: not a recognised image format" in proc.stderr
        )
        per_fold[k] = {r["path"]: float(r["prob"]) for r in csv.DictReader(out.open())}
        for path, row in oof.items():
            if int(row["fold"]) == k:
                assert abs(per_fold[k][path] - float(row["prob"])) < 2e-3, path
    out = tmp_path / "ensemble.csv"
    proc = run_cli("predict", str(run), str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24  # 10 + 10 + the planted copy + 3 normal images; no masks
    threshold = json.loads((run / "metrics.json").read_text())["operating_point"]["threshold"]
    for r in rows:
        mean = (per_fold[0][r["path"]] + per_fold[1][r["path"]]) / 2
        assert abs(float(r["prob"]) - mean) < 2e-3
        assert r["decision"] == ("malignant" if float(r["prob"]) >= threshold else "benign")
        assert "basic_cnn x2" in r["model"]


def test_predict_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    assert_clean_error(run_cli("predict", str(tmp_path), "x.png"), "not a finished run folder")

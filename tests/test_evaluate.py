"""``breastcad evaluate``: a run applied unchanged to external data (folders and manifests)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.errors import BreastcadError
from breastcad.evaluate import evaluate_run
from breastcad.predict import load_ensemble, predict_images
from synthetic import write_busi_like
from test_cli import FAST, assert_clean_error, run_cli


@pytest.fixture(scope="module")
def run_and_external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny trained run, and an external dataset from another seed (+ normals, a bad file)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = write_busi_like(tmp / "train-data", n_per_class=10, size=40)
    run = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), *FAST, "--set", "train.threads=1",
        cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    external = write_busi_like(tmp / "other-site", n_per_class=8, size=48, seed=7, normals=2)
    (external / "malignant" / "broken.png").write_bytes(b"not a png at all")
    return data, run, external


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_folder_evaluation_keeps_the_runs_operating_point(run_and_external, tmp_path) -> None:
    data, run, external = run_and_external
    out = tmp_path / "eval"
    proc = run_cli(
        "evaluate", str(run), "--data", str(external), "--out", str(out), "--threads", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "External ROC-AUC" in proc.stdout and "unchanged" in proc.stdout
    doc = _json(out / "evaluation.json")
    metrics = _json(run / "metrics.json")
    # nothing re-fitted: the run's threshold and every fold's temperature, as they were
    assert doc["operating_point"]["threshold"] == metrics["operating_point"]["threshold"]
    temps = [_json(run / f"fold-{k}" / "card.json")["temperature"] for k in (0, 1)]
    assert doc["model"]["temperatures"] == temps
    # every metric of the run report, each with a CI
    assert set(doc["pooled"]) == set(metrics["pooled"])
    for m in doc["pooled"].values():
        assert set(m) == {"value", "low", "high"}
    auc = doc["pooled"]["roc_auc"]
    assert auc["low"] <= auc["value"] <= auc["high"]
    # labels the task does not know: reported and left out; the broken file listed
    assert doc["data"]["left_out"]["unknown_labels"] == {"normal": 2}
    assert [Path(b["path"]).name for b in doc["data"]["left_out"]["unreadable"]] == ["broken.png"]
    assert doc["n_images"] == 16 and doc["n_positive"] == 8
    assert doc["per_class_evaluated"] == {"benign": 8, "malignant": 8}
    # predictions: the same numbers `breastcad predict` gives, decided at the run's threshold
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 16
    ens = load_ensemble(run)
    expected, _ = predict_images(ens, [r["path"] for r in rows])
    threshold = metrics["operating_point"]["threshold"]
    for r, e in zip(rows, expected, strict=True):
        assert abs(float(r["prob"]) - e["prob"]) < 1e-5
        assert r["decision"] == ("malignant" if float(r["prob"]) >= threshold else "benign")
        assert r["correct"] == str(int(r["decision"] == r["label"]))
    # confusion at the fixed threshold matches the predictions
    tp = sum(r["label"] == "malignant" and r["decision"] == "malignant" for r in rows)
    assert doc["confusion"][1][1] == tp
    for plot in ("roc", "confusion", "reliability"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Nothing was re-fitted" in html
    assert 'src="http' not in html and "normal (2)" in html
    assert doc["segmentation"]["computed"] is False


def test_csv_manifest_with_patients_masks_and_training_overlap(run_and_external, tmp_path) -> None:
    data, run, external = run_and_external
    rows = [("path", "label", "patient_id", "mask")]
    for cls in ("benign", "malignant"):
        for i in range(1, 9):
            img = external / cls / f"{cls} ({i}).png"
            mask = external / cls / f"{cls} ({i})_mask.png"
            rows.append((str(img), cls.upper(), f"p{(i + 1) // 2}-{cls}", str(mask)))
    rows.append((str(external / "normal" / "normal (1).png"), "normal", "p99", ""))
    rows.append(("missing.png", "benign", "p98", ""))
    # a byte-identical copy of a training image is not external: listed and left out
    shutil.copy(data / "benign" / "benign (3).png", tmp_path / "seen.png")
    rows.append((str(tmp_path / "seen.png"), "benign", "p97", ""))
    manifest = tmp_path / "other.csv"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    proc = run_cli("evaluate", str(run), "--data", str(manifest), "--threads", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "external" / "other"  # the default: results stay with the model
    doc = _json(out / "evaluation.json")
    assert doc["data"]["source_kind"] == "csv-manifest"
    assert doc["n_images"] == 16
    assert doc["n_groups"] == 8  # two images per patient id: the bootstrap resamples patients
    left = doc["data"]["left_out"]
    assert left["unknown_labels"] == {"normal": 1}
    assert [Path(p).name for p in left["in_training_data"]] == ["seen.png"]
    assert any(Path(b["path"]).name == "missing.png" for b in left["unreadable"])
    assert (
        doc["operating_point"]["threshold"]
        == _json(run / "metrics.json")["operating_point"]["threshold"]
    )
    # the same data again refreshes that folder; another non-empty folder is refused
    again = evaluate_run(run, manifest, threads=1)
    assert again["pooled"]["roc_auc"] == doc["pooled"]["roc_auc"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BreastcadError, match="not empty"):
        evaluate_run(run, manifest, busy, threads=1)


def test_evaluate_refuses_to_refit_and_bad_input(run_and_external, tmp_path) -> None:
    data, run, external = run_and_external
    # there is no way to pass a threshold, a temperature or a setting
    for flag in (["--threshold", "0.5"], ["--set", "eval.target_sensitivity=0.8"]):
        proc = run_cli("evaluate", str(run), "--data", str(external), *flag)
        assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    assert_clean_error(
        run_cli("evaluate", str(tmp_path), "--data", str(external)), "not a finished run folder"
    )
    only_normal = tmp_path / "normals"
    (only_normal / "normal").mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(only_normal / "normal" / "a.png")
    Image.fromarray(np.full((40, 40), 30, np.uint8)).save(only_normal / "normal" / "b.png")
    assert_clean_error(
        run_cli(
            "evaluate",
            str(run),
            "--data",
            str(only_normal),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ),
        "no external image with a label of task benign-vs-malignant",
    )

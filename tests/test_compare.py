"""`breastcad compare`, variants, transfer-learning runs and DeLong's test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from breastcad.compare import check_same_folds, parse_variant
from breastcad.errors import BreastcadError
from breastcad.metrics import delong_auc_difference
from breastcad.models import create_model
from synthetic import write_busi_like
from test_cli import assert_clean_error, run_cli

TINY = [
    "--folds", "2",
    "--epochs", "2",
    "--image-size", "32",
    "--batch-size", "8",
    "--set", "eval.n_bootstrap=50",
    "--set", "cv.val_fraction=0.34",
    "--set", "train.threads=1",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("compare")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    out = tmp / "cmp"
    proc = run_cli(
        "compare", "--data", str(data), "--out", str(out),
        "--models", "basic_cnn",
        "--variant", "small-noaug=basic_cnn,model.width=8,model.depth=2,augment.enabled=false",
        *TINY, cache=tmp / "cache",
    )  # fmt: skip
    return out, proc


def test_compare_writes_a_table_for_every_model_on_identical_folds(tiny_comparison) -> None:
    out, proc = tiny_comparison
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("basic_cnn", "small-noaug"):
        assert (out / label / "metrics.json").exists()
        assert (out / label / "report.html").exists()
    folds = [json.loads((out / m / "folds.json").read_text()) for m in ("basic_cnn", "small-noaug")]
    assert folds[0]["repeats"] == folds[1]["repeats"]
    assert folds[0]["samples"] == folds[1]["samples"]
    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"basic_cnn", "small-noaug"}
    for r in rows:
        for key in (
            "roc_auc",
            "roc_auc_low",
            "roc_auc_high",
            "sensitivity",
            "specificity",
            "precision",
            "f1",
            "accuracy",
            "balanced_accuracy",
            "parameters",
            "train_seconds",
            "inference_images_per_second",
            "auc_diff_vs_best",
        ):
            assert r[key] != "", key
        assert float(r["roc_auc_low"]) <= float(r["roc_auc"]) <= float(r["roc_auc_high"])
        assert r["training_mode"] == "from scratch"
    small = next(r for r in rows if r["model"] == "small-noaug")
    big = next(r for r in rows if r["model"] == "basic_cnn")
    assert small["augmentation"] == "False" and big["augmentation"] == "True"
    assert int(small["parameters"]) < int(big["parameters"])
    # the best model's difference to itself is zero; the other's AUC gap is its own
    doc = json.loads((out / "comparison.json").read_text())
    best = doc["best"]
    other = next(r for r in doc["rows"] if r["model"] != best)
    best_row = next(r for r in doc["rows"] if r["model"] == best)
    assert best_row["auc_diff_vs_best"] == 0
    assert other["auc_diff_vs_best"] == pytest.approx(other["roc_auc"] - best_row["roc_auc"])
    # training computed where each model looks (the synthetic images have masks)
    for r in rows:
        assert (out / r["model"] / "lesion_agreement.json").exists()
        assert 0.0 <= float(r["pointing_game"]) <= 1.0
    md = (out / "comparison.md").read_text()
    assert "| basic_cnn |" in md and "| small-noaug |" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "small-noaug/report.html" in html
    assert "from scratch" in html


def test_models_with_different_folds_are_not_compared(tiny_comparison, tmp_path: Path) -> None:
    out, proc = tiny_comparison
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / "small-noaug" / "folds.json"
    doc = json.loads(path.read_text())
    doc["repeats"][0]["test_fold"] = doc["repeats"][0]["test_fold"][::-1]
    copy = tmp_path / "cmp"
    for label in ("basic_cnn", "small-noaug"):
        (copy / label).mkdir(parents=True)
        (copy / label / "folds.json").write_text((out / label / "folds.json").read_text())
    (copy / "small-noaug" / "folds.json").write_text(json.dumps(doc))
    with pytest.raises(BreastcadError, match="folds differ"):
        check_same_folds(copy, ["basic_cnn", "small-noaug"])


def test_resuming_a_finished_comparison_trains_nothing(tiny_comparison) -> None:
    out, proc = tiny_comparison
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (out / "basic_cnn" / "metrics.json").stat().st_mtime_ns
    again = run_cli("compare", "--resume", str(out), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already done" in again.stdout
    assert (out / "basic_cnn" / "metrics.json").stat().st_mtime_ns == before


def test_variants_may_not_change_the_folds() -> None:
    assert parse_variant("alexnet").label == "alexnet"
    v = parse_variant("noaug=basic_cnn,augment.enabled=false")
    assert v.label == "noaug"
    assert v.overrides == [("model.name", "basic_cnn"), ("augment.enabled", False)]
    for bad in ("x=basic_cnn,cv.folds=3", "x=basic_cnn,seed=2", "x=basic_cnn,data.path=/d"):
        with pytest.raises(BreastcadError, match="decides the folds"):
            parse_variant(bad)
    with pytest.raises(BreastcadError, match="label"):
        parse_variant("a/b=basic_cnn")


def test_compare_refuses_unknown_models_before_training(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "data", n_per_class=4, size=32)
    proc = run_cli(
        "compare", "--data", str(data), "--models", "basic_cnn,nosuchnet",
        "--out", str(tmp_path / "cmp"), "--quiet",
    )  # fmt: skip
    assert_clean_error(proc, "nosuchnet")
    assert not (tmp_path / "cmp").exists()


def test_frozen_backbone_run_keeps_the_pretrained_backbone(tmp_path: Path) -> None:
    """A frozen run's saved backbone equals the weights file; its head was trained."""
    stand_in = create_model("basic_cnn", 2, 3, width=8, depth=2)  # an "RGB" network
    weights = tmp_path / "stand_in.pt"
    torch.save(stand_in.state_dict(), weights)
    data = write_busi_like(tmp_path / "data", n_per_class=8, size=32)
    run = tmp_path / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), "--pretrained", str(weights),
        "--freeze-backbone", "--set", "model.width=8", "--set", "model.depth=2", *TINY,
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((run / "fold-1" / "card.json").read_text())
    assert card["training_mode"] == "stand_in.pt weights, frozen backbone + new head"
    assert card["trainable_parameters"] < card["parameters"]
    saved = load_file(run / "fold-1" / "model.safetensors")
    source = stand_in.state_dict()
    # gray first conv = the RGB filters summed; later convs unchanged
    assert torch.allclose(saved["features.0.weight"], source["features.0.weight"].sum(1, True))
    conv_keys = [k for k in source if k.endswith("weight") and source[k].ndim == 4][1:]
    assert conv_keys
    for key in conv_keys:
        assert torch.equal(saved[key], source[key]), key
    assert not torch.equal(saved["head.4.weight"], source["head.4.weight"])  # a new head
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["training_mode"] == card["training_mode"]


def test_missing_pretrained_file_fails_fast_without_a_run_folder(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "data", n_per_class=4, size=32)
    missing = tmp_path / "weights" / "resnet50.pth"
    proc = run_cli(
        "train", "--data", str(data), "--model", "resnet50", "--pretrained", str(missing),
        "--out", str(tmp_path / "run"), "--quiet",
    )  # fmt: skip
    assert_clean_error(proc, str(missing), "not found")
    assert not (tmp_path / "run").exists()


def test_unusable_data_leaves_no_run_folder(tmp_path: Path) -> None:
    proc = run_cli("train", "--data", str(tmp_path / "absent"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2
    assert not (tmp_path / "runs").exists()


def _delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong (1988) from explicit pairwise kernels: (difference, variance)."""
    pos, neg = y == 1, y == 0

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return k.mean(1), k.mean(0)

    a10, a01 = placements(a)
    b10, b01 = placements(b)
    s10, s01 = np.cov([a10, b10]), np.cov([a01, b01])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum() + (
        s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
    ) / neg.sum()
    return a10.mean() - b10.mean(), var


def test_delong_matches_its_definition_and_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    a = np.round(y + rng.normal(0, 1, 120), 1)  # rounding makes ties
    b = np.round(y + rng.normal(0, 1.6, 120), 1)
    res = delong_auc_difference(y, a, b)
    diff, var = _delong_by_definition(y, a, b)
    assert res.diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert res.diff == pytest.approx(diff)
    assert res.high - res.low == pytest.approx(2 * 1.959964 * np.sqrt(var))
    assert 0 < res.p_value < 1
    same = delong_auc_difference(y, a, a)
    assert same.diff == 0 and same.p_value == 1.0

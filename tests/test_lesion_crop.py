"""Lesion-centred classification: the crop rule, honest test-fold crops, and the whole CLI path."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from breastcad.data.cache import prepare_for_model
from breastcad.errors import ConfigError
from breastcad.lesion_crop import CropRule, build_crop_inputs, crop_input, crop_square, lesion_box
from synthetic import write_busi_like
from test_cli import FAST, assert_clean_error, run_cli


def _rect(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_box_is_centred_on_the_lesion_with_the_margin() -> None:
    box = lesion_box(_rect((200, 300), 40, 60, 100, 140), CropRule(margin=0.3, min_side=0.0))
    assert box == pytest.approx((50.0, 120.0, 40 * 1.6))


def test_box_keeps_the_largest_region_and_a_minimum_size() -> None:
    mask = _rect((200, 200), 10, 14, 10, 14) | _rect((200, 200), 100, 130, 120, 150)
    cy, cx, side = lesion_box(mask, CropRule(margin=0.0, min_side=0.0))
    assert (cy, cx, side) == pytest.approx((115.0, 135.0, 30.0))  # the 4x4 speck is ignored
    _, _, side = lesion_box(_rect((200, 300), 50, 52, 50, 52), CropRule(0.3, min_side=0.25))
    assert side == pytest.approx(50.0)  # a quarter of the shorter side, not 2 x 1.6 px


def test_crop_at_the_border_is_black_outside_and_keeps_the_lesion_centred() -> None:
    img = np.full((100, 100), 0.5, np.float32)
    img[0:10, 0:10] = 1.0  # the lesion, in the corner
    crop = crop_square(img, lesion_box(_rect((100, 100), 0, 10, 0, 10), CropRule(0.5, 0)), 20)
    assert crop.shape == (20, 20) and crop.dtype == np.uint8
    assert crop[10, 10] == 255  # the lesion fills the middle
    assert crop[:4, :4].max() == 0  # above and left of the image: black, not wrapped around
    assert 100 <= crop[-2, -2] <= 150  # below-right: the image's own grey (0.5)


def test_empty_mask_falls_back_to_the_whole_image() -> None:
    img = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    arr, found = crop_input(img, np.zeros_like(img, bool), CropRule(), 16)
    assert not found and arr.shape == (16, 16)
    assert arr[0, 0] < 10 and arr[-1, -1] > 245  # the whole gradient, stretched
    arr, found = crop_input(img, None, CropRule(), 16)
    assert not found


def test_a_lesion_crop_model_refuses_to_run_without_its_segmentation() -> None:
    card = {"input_size": 32, "preprocessing": {"mode": "lesion-crop", "margin": 0.3}}
    with pytest.raises(ConfigError, match="lesion crops"):
        prepare_for_model(np.zeros((40, 40), np.float32), card)


def test_validation_and_test_images_get_predicted_not_ground_truth_crops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segmentation model that finds nothing: every validation and test image falls back
    to the whole image, while training images keep their ground-truth crops."""
    from breastcad import segmentation

    data = write_busi_like(tmp_path / "d", n_per_class=4, size=40)
    paths = sorted(str(p) for p in data.rglob("*).png"))
    masks = [(p.replace(").png", ")_mask.png"),) for p in paths]
    seen: dict[str, list[bytes]] = {}  # segmentation fold -> the images it was shown

    def predict_nothing(model: str, x: np.ndarray, rt: object) -> np.ndarray:
        seen.setdefault(model, []).extend(a.tobytes() for a in x)
        return np.zeros(x.shape, np.float32)

    monkeypatch.setattr(segmentation, "load_model", lambda d: (d.name, {"input_size": 24}))
    monkeypatch.setattr(segmentation, "predict_probs", predict_nothing)
    plans = [
        SimpleNamespace(fold=0, train=np.arange(0, 4), val=np.array([4, 5]), test=np.array([6, 7])),
        SimpleNamespace(fold=1, train=np.arange(4, 8), val=np.array([0, 1]), test=np.array([2, 3])),
    ]  # fmt: skip
    crops = build_crop_inputs(paths, masks, plans, tmp_path, CropRule(), 32, 10**7, None)
    assert crops.gt_found.all()
    fold0 = crops.for_fold(plans[0])
    for i in range(4):  # training images: the ground-truth crop
        assert np.array_equal(fold0[i], crops.gt[i])
    for i in range(4, 8):  # validation and test: the (empty) prediction, so the whole image
        whole, _ = crop_input(_read(paths[i]), None, CropRule(), 32)
        assert np.array_equal(fold0[i], whole) and not np.array_equal(fold0[i], crops.gt[i])
    assert crops.fallbacks["test_fallbacks"] == 4
    assert crops.fallbacks["per_fold"]["fold-1"]["val_fallbacks"] == 2
    # fold K's segmentation model, which never trained on them, saw exactly fold K's
    # validation and test images (never another fold's, never a training image)
    from breastcad.data.cache import resize_to_uint8

    for plan in plans:
        shown = [resize_to_uint8(_read(paths[i]), 24).tobytes() for i in (*plan.val, *plan.test)]
        assert sorted(seen[f"fold-{plan.fold}"]) == sorted(shown)


def _read(path: str) -> np.ndarray:
    from breastcad.data.imageio import read_image

    return read_image(path)


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("lesion-crop")
    data = write_busi_like(tmp / "data", n_per_class=8, size=48)
    run = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), *FAST,
        "--set", "data.preprocess=lesion-crop", "--set", "segment.epochs=2",
        "--set", "segment.image_size=32", "--set", "train.threads=1",
        cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def test_train_segments_first_and_records_the_crop_rule(crop_run) -> None:
    _, run = crop_run
    for k in (0, 1):
        assert (run / "segmentation" / f"fold-{k}" / "FINISHED").is_file()
        card = json.loads((run / f"fold-{k}" / "card.json").read_text())
        pre = card["preprocessing"]
        assert pre["mode"] == "lesion-crop" and pre["margin"] == 0.3 and "fallback" in pre
    metrics = json.loads((run / "metrics.json").read_text())
    lc = metrics["lesion_crop"]
    assert 0 <= lc["test_fallbacks"] <= 16 and "dice" in lc["segmentation"]
    assert sum(f["n_test"] for f in lc["per_fold"].values()) == 16
    report = (run / "report.html").read_text()
    assert "Lesion-centred inputs" in report and "predicted by that fold" in report


def test_predict_and_evaluate_crop_with_the_runs_segmentation(crop_run, tmp_path) -> None:
    data, run = crop_run
    images = sorted(str(p) for p in (data / "malignant").glob("*).png"))[:3]
    out = tmp_path / "p.csv"
    proc = run_cli("predict", str(run), *images, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    assert {r["crop"] for r in rows} <= {"lesion", "whole image (no lesion found)"}
    other = write_busi_like(tmp_path / "other", n_per_class=4, size=48, seed=7)
    proc = run_cli("evaluate", str(run), "--data", str(other), "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert sum(doc["lesion_crop"]["model_inputs"].values()) == doc["n_images"] == 8


def test_export_of_a_lesion_crop_run_is_refused_clearly(crop_run, tmp_path) -> None:
    _, run = crop_run
    proc = run_cli("export", str(run), "--out", str(tmp_path / "m.onnx"))
    assert_clean_error(proc, "lesion-crop", "cannot be exported")


def test_onnx_backend_of_a_lesion_crop_run_is_refused_clearly(crop_run, tmp_path) -> None:
    data, run = crop_run
    image = data / "benign" / "benign (1).png"
    proc = run_cli("predict", str(run), str(image), "--backend", "onnx")
    assert_clean_error(proc, "lesion-crop", "ONNX")


def test_model_version_covers_the_segmentation_weights(crop_run, tmp_path) -> None:
    import shutil

    from breastcad.predict import load_ensemble

    _, run = crop_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert load_ensemble(copy).version == load_ensemble(run).version
    seg = copy / "segmentation"
    w0, w1 = seg / "fold-0" / "model.safetensors", seg / "fold-1" / "model.safetensors"
    b0, b1 = w0.read_bytes(), w1.read_bytes()
    w0.write_bytes(b1)
    w1.write_bytes(b0)  # other segmentation weights, same classifier: another model
    assert load_ensemble(copy).version != load_ensemble(run).version


def test_explain_crops_like_predict(crop_run, tmp_path) -> None:
    data, run = crop_run
    image = data / "malignant" / "malignant (1).png"
    proc = run_cli("explain", str(run), str(image), "--out", str(tmp_path / "ex"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "ex").glob("*.png"))) == 1


def test_lesion_crop_needs_masks_and_one_job(tmp_path: Path) -> None:
    from breastcad.config import load_config

    with pytest.raises(ConfigError, match="repeats 1"):
        load_config(None, [("data.preprocess", "lesion-crop"), ("cv.repeats", 2)])
    for task in ("three-class", "malignant-vs-rest"):  # normal images have no lesion to crop
        with pytest.raises(ConfigError, match="benign-vs-malignant"):
            load_config(None, [("data.preprocess", "lesion-crop"), ("data.task", task)])


def test_robustness_crops_each_test_image_with_its_folds_segmentation(crop_run, tmp_path) -> None:
    """Unshifted, the proxy battery reproduces the run's own out-of-fold probabilities: the
    test images are cropped by the same fold's segmentation model as in cross-validation."""
    from breastcad.robustness import robustness_run

    _, run = crop_run
    doc = robustness_run(run, "gain", tmp_path / "rob", threads=1)
    oof = {
        r["path"]: float(r["prob"]) for r in csv.DictReader((run / "oof_predictions.csv").open())
    }
    assert len(doc["per_image"]) == len(oof) == 16
    for row in doc["per_image"]:
        assert row["prob"]["none"] == pytest.approx(oof[row["path"]], abs=0.02)

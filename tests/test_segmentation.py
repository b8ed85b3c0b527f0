"""Lesion segmentation: learns planted blobs; trains on a run's folds; masks and overlays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.evaluate import runtime
from breastcad.segmentation import SegNet, dice_iou, fit, predict_probs, upsample
from synthetic import lesion_image, write_busi_like
from test_cli import FAST, run_cli


def test_dice_iou_and_upsampling() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert dice_iou(a, b) == (1.0, 1.0)
    a[:5] = True
    b[:, :5] = True
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert upsample(np.ones((4, 4), np.float32), (9, 13)).shape == (9, 13)


@pytest.mark.parametrize(
    "arch", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "unet"]
)
def test_models_take_one_channel_and_give_one_logit_map(arch: str) -> None:
    import torch

    model = SegNet(arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 48, 48))
    assert out.shape == (2, 1, 48, 48)


@pytest.mark.parametrize("arch", ["lraspp_mobilenet_v3_large", "unet"])
def test_segmentation_learns_planted_blobs(arch: str) -> None:
    rng = np.random.default_rng(0)
    pairs = [lesion_image(rng, 64, i % 2 == 1) for i in range(40)]
    images = np.stack([(im * 255).astype(np.uint8) for im, _ in pairs])
    masks = np.stack([m.astype(np.uint8) for _, m in pairs])
    # a few normal images train as empty masks
    images[:4] = (np.clip(0.55 + 0.15 * rng.standard_normal((4, 64, 64)), 0, 1) * 255).astype(
        np.uint8
    )
    masks[:4] = 0
    rt = runtime(1)
    model, res = fit(images, masks, range(0, 24), range(24, 32), arch=arch, epochs=18,
                     batch_size=8, rt=rt)  # fmt: skip
    test = list(range(32, 40))
    probs = predict_probs(model, images[test], rt)
    dice = [dice_iou(p >= 0.5, masks[i])[0] for p, i in zip(probs, test, strict=True)]
    assert np.mean(dice) > 0.75, dice
    assert 1 <= res.best_epoch <= 18 and res.best_val_dice > 0.7


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("seg")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    # a second lesion mask for one image: masks of one image are merged
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), ((2, 34), (2, 34)))).save(
        data / "benign" / "benign (1)_mask_1.png"
    )
    run = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), *FAST, "--set", "train.threads=1",
        cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def test_epoch_choice_split_holds_out_whole_groups_of_the_training_images() -> None:
    from breastcad.segmentation import epoch_choice_split

    samples = [{"group": f"g{i // 3}"} for i in range(90)]  # 30 groups of 3
    train = list(range(0, 80))
    fit_on, choose_on = epoch_choice_split(train, samples, seed=1)
    assert sorted(fit_on + choose_on) == train
    assert not {samples[i]["group"] for i in fit_on} & {samples[i]["group"] for i in choose_on}
    assert 0.1 * len(train) <= len(choose_on) <= 0.2 * len(train)
    assert epoch_choice_split(train, samples, seed=1) == (fit_on, choose_on)
    assert epoch_choice_split(train, samples, seed=2) != (fit_on, choose_on)
    # a large duplicate group is not drawn when it would hold out far more than asked
    big = [{"group": "big"}] * 40 + [{"group": f"g{i}"} for i in range(40)]
    for seed in range(20):  # without the rule, "big" is drawn early for about a third
        assert len(epoch_choice_split(list(range(80)), big, seed=seed)[1]) <= 24
    # a single group is never held out whole: training keeps images
    fit_one, choose_one = epoch_choice_split([0, 1, 2], samples, seed=0)
    assert fit_one == [0, 1, 2] and choose_one == []


def test_segment_trains_on_the_runs_folds_and_writes_masks(run_dir, tmp_path) -> None:
    data, run = run_dir
    proc = run_cli(
        "segment", str(run), "--train", "--epochs", "3", "--image-size", "48", "--threads", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Dice" in proc.stdout
    doc = json.loads((run / "segmentation" / "segmentation.json").read_text())
    folds = json.loads((run / "folds.json").read_text())
    test_fold = {s["path"]: f for s, f in zip(folds["samples"], folds["repeats"][0]["test_fold"],
                                              strict=True)}  # fmt: skip
    assert len(doc["per_image"]) == len(folds["samples"])
    for row in doc["per_image"]:  # every image scored by the model that never saw it
        assert row["fold"] == test_fold[row["path"]]
        assert 0 <= row["dice"] <= 1 and row["gt_fraction"] > 0
    two = next(r for r in doc["per_image"] if Path(r["path"]).name == "benign (1).png")
    m0 = np.asarray(Image.open(data / "benign" / "benign (1)_mask.png")) > 0
    assert two["gt_fraction"] == pytest.approx((m0.sum() + 16) / m0.size, abs=2e-3)
    for key in ("dice", "iou"):
        m = doc["metrics"][key]
        assert m["low"] <= m["value"] <= m["high"]
    assert [f["fold"] for f in doc["per_fold"]] == [0, 1]
    for k in (0, 1):
        card = json.loads((run / "segmentation" / f"fold-{k}" / "card.json").read_text())
        assert card["kind"] == "segmentation" and card["input_size"] == 48
        # trained and epoch-chosen on fold k's training images only: never on the images
        # that choose the classifier's epoch and threshold (inner validation) nor on test
        rep = folds["repeats"][0]
        n_fold_train = sum(
            1 for f, v in zip(rep["test_fold"], rep["inner_validation_in_folds"], strict=True)
            if f != k and f"val@{k};" not in v
        )  # fmt: skip
        assert card["n_train"] + card["n_val"] == n_fold_train and card["n_val"] >= 1
        assert (run / "segmentation" / f"fold-{k}" / "FINISHED").is_file()

    # a fold model from before that rule is trained again, a current one reused
    card_path = run / "segmentation" / "fold-0" / "card.json"
    card = json.loads(card_path.read_text())
    del card["epoch_chosen_on"]
    card_path.write_text(json.dumps(card))
    proc = run_cli(
        "segment", str(run), "--train", "--epochs", "3", "--image-size", "48", "--threads", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fold-0: trained under an earlier rule" in proc.stdout
    assert "fold-1: already done" in proc.stdout
    assert "epoch_chosen_on" in json.loads(card_path.read_text())

    # another model asked for: every finished fold is trained again, never passed off as it
    proc = run_cli("segment", str(run), "--train", "--arch", "unet", "--epochs", "2",
                   "--image-size", "48", "--threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (0, 1):
        assert f"fold-{k}: the finished model is lraspp_mobilenet_v3_large at 48 px" in proc.stdout
        card = json.loads((run / "segmentation" / f"fold-{k}" / "card.json").read_text())
        assert card["architecture"] == "unet" and card["weights"].startswith("MONAI")
    assert json.loads((run / "segmentation" / "segmentation.json").read_text())["model"] == "unet"
    proc = run_cli("segment", str(run), "--train", "--arch", "unet", "--image-size", "40",
                   "--threads", "1")  # fmt: skip
    assert proc.returncode != 0 and "multiple of 16, not 40" in proc.stderr
    assert "Traceback" not in proc.stderr

    # masks and overlays at each image's own size
    out = tmp_path / "masks"
    (tmp_path / "bad.png").write_bytes(b"nope")
    img = data / "malignant" / "malignant (2).png"
    proc = run_cli("segment", str(run), str(img), str(tmp_path / "bad.png"), "--out", str(out),
                   "--threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr and "bad.png" in proc.stderr
    mask = Image.open(out / "malignant (2)_mask.png")
    overlay = Image.open(out / "malignant (2)_overlay.png")
    assert mask.size == overlay.size == Image.open(img).size and overlay.mode == "RGB"
    rows = list(csv.DictReader((out / "segment.csv").open()))
    assert len(rows) == 1 and rows[0]["mask"] == "malignant (2)_mask.png"

    # external validation reports Dice when the data give masks and the run has the models
    ext = write_busi_like(tmp_path / "ext", n_per_class=4, size=40, seed=11)
    proc = run_cli("evaluate", str(run), "--data", str(ext), "--out", str(tmp_path / "ev"),
                   "--threads", "1", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    seg = ev["segmentation"]
    assert seg["computed"] is True and seg["n_images"] == 8 and "dice" in seg["metrics"]
    assert "Lesion segmentation Dice" in proc.stdout

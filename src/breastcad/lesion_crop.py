"""Lesion-centred model inputs: a square crop around the lesion, found by a mask.

Whole-image models learn the site (field of view, depth, burnt-in text,
calipers); a model that sees only the lesion and its immediate surroundings
has less of the site to learn. ``data.preprocess: lesion-crop`` makes every
model input such a crop.

The rule (recorded in each fold's card, so ``predict``, ``serve`` and
``evaluate`` apply exactly what training applied):

* the lesion is the largest connected region of the mask (8-connectivity);
* the box is a square centred on that region's bounding box, of side
  ``longer side x (1 + 2 x margin)`` and at least ``min_side x`` the image's
  shorter side (a tiny predicted blob still gets some context);
* pixels of the box outside the image are black (the lesion stays centred);
* the box is resized to ``input_size`` x ``input_size`` (bilinear, antialiased)
  and quantised to uint8 like every other input;
* an empty mask (no lesion found) falls back to the whole image, stretched to
  the square as the ``stretch`` mode does, and the fallback is reported.

Where the mask comes from:

* training images: the ground-truth mask; the batch augmentation's random
  shift, zoom and rotation jitter the box every epoch, so the model does not
  learn the exact framing of a manual outline;
* validation and test images of fold K in cross-validation: the mask
  predicted by the segmentation model of fold K, which never trained on them
  (so the reported number is what a user gets, not an oracle);
* new images (``predict``, ``serve``, ``evaluate``): the mean mask of the
  run's segmentation models (``RUN/segmentation/fold-*``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from breastcad.data.cache import resize_to_uint8
from breastcad.errors import BreastcadError

MODE = "lesion-crop"
CROP_VERSION = "lesion-crop-v1"
FALLBACK = "whole image (no lesion found)"
LESION = "lesion"


@dataclass(frozen=True)
class CropRule:
    margin: float = 0.3  # added on each side, as a share of the lesion's longer side
    min_side: float = 0.1  # smallest box side, as a share of the image's shorter side

    def card(self) -> dict[str, Any]:
        return {
            "crop_version": CROP_VERSION,
            "margin": self.margin,
            "min_side": self.min_side,
            "crop": "square centred on the largest lesion region's bounding box, side = longer "
            "side x (1 + 2 x margin), at least min_side x the image's shorter side; black "
            "outside the image; resized bilinear (antialiased) to input_size",
            "fallback": "no lesion found: the whole image stretched to the square",
        }

    @classmethod
    def from_card(cls, preprocessing: dict[str, Any]) -> CropRule:
        return cls(float(preprocessing["margin"]), float(preprocessing["min_side"]))


Box = tuple[float, float, float]  # centre row, centre column, side (pixels of the image)


def lesion_box(mask: np.ndarray, rule: CropRule) -> Box | None:
    """The crop box for a boolean mask at the image's size; None when the mask is empty."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0) * (1 + 2 * rule.margin)
    side = max(side, rule.min_side * min(mask.shape), 4.0)
    return (r0 + r1) / 2, (c0 + c1) / 2, float(side)


def crop_square(img: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The square ``box`` of a [0, 1] image (black outside it) as ``size`` x ``size`` uint8."""
    cy, cx, side = box
    half = side / 2
    top, left = int(round(cy - half)), int(round(cx - half))
    n = max(1, int(round(side)))
    h, w = img.shape
    out = np.zeros((n, n), np.float32)
    r0, r1 = max(top, 0), min(top + n, h)
    c0, c1 = max(left, 0), min(left + n, w)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = img[r0:r1, c0:c1]
    return resize_to_uint8(out, size)


def crop_input(
    img: np.ndarray, mask: np.ndarray | None, rule: CropRule, size: int
) -> tuple[np.ndarray, bool]:
    """The model input for an image and its lesion mask, and whether a lesion was found."""
    box = lesion_box(mask, rule) if mask is not None else None
    if box is None:
        return resize_to_uint8(img, size), False
    return crop_square(img, box, size), True


# ----------------------------------------------------------------------------- inference


class LesionCropper:
    """Segmentation models + the crop rule: the model input of a new whole image."""

    def __init__(self, seg_models: list[Any], rule: CropRule, size: int, rt: Any = None) -> None:
        if not seg_models:
            raise BreastcadError("a lesion-crop model needs at least one segmentation model")
        self.seg_models = seg_models
        self.rule = rule
        self.size = size
        self.rt = rt
        self.counts = {LESION: 0, FALLBACK: 0}  # what each call found, for reports

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        from breastcad.predict import default_runtime
        from breastcad.segmentation import MASK_THRESHOLD, ensemble_masks

        rt = self.rt or default_runtime()
        return [p >= MASK_THRESHOLD for p in ensemble_masks(self.seg_models, list(images), rt)]

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, bool]:
        arr, found = crop_input(img, self.masks([img])[0], self.rule, self.size)
        self.counts[crop_column(found)] += 1
        return arr, found

    @classmethod
    def for_run(cls, run_dir: Path, card: dict[str, Any]) -> LesionCropper:
        """The run's segmentation ensemble and the crop rule of a fold card."""
        from breastcad.segmentation import SEG_DIR, load_models

        seg = Path(run_dir) / SEG_DIR
        if not seg.is_dir():
            raise BreastcadError(
                f"{seg}: missing; this model classifies lesion crops and needs the segmentation "
                "models trained with it (keep the run folder whole)"
            )
        return cls(load_models(seg), CropRule.from_card(card["preprocessing"]),
                   int(card["input_size"]))  # fmt: skip


def crop_column(found: bool) -> str:
    return LESION if found else FALLBACK


# ----------------------------------------------------------------------------- training


@dataclass
class CropInputs:
    """Model inputs of a lesion-crop run: ground-truth crops, and per fold the predicted ones.

    ``for_fold(plan)`` is the (N, S, S) stack a fold trains on: ground-truth crops
    for its training images, its own segmentation model's crops for its
    validation and test images. ``out_of_fold`` holds each image's crop as its
    test fold saw it (for the report).
    """

    gt: np.ndarray
    gt_found: np.ndarray
    predicted: dict[int, dict[int, np.ndarray]]  # fold -> image index -> crop
    found: dict[int, dict[int, bool]]
    out_of_fold: np.ndarray
    fallbacks: dict[str, Any]

    def for_fold(self, plan: Any) -> np.ndarray:
        stack = self.gt.copy()
        for i, arr in self.predicted[plan.fold].items():
            stack[i] = arr
        return stack


def _map_threads(fn: Callable[[int], Any], n: int, workers: int = 2) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(n)))


def build_crop_inputs(
    paths: Sequence[str],
    mask_paths: Sequence[Sequence[str]],
    plans: Sequence[Any],
    seg_dir: Path,
    rule: CropRule,
    size: int,
    max_pixels: int,
    rt: Any,
) -> CropInputs:
    """Every crop a lesion-crop cross-validation needs, decoding each image twice at most.

    Pass 1 decodes each image and its ground-truth mask (ground-truth crop, image
    shape, the stretched copy the segmentation models take). Pass 2 runs fold K's
    segmentation model on fold K's validation and test images and turns each
    predicted mask, upsampled to the image's size, into a box. Pass 3 decodes the
    images that need predicted crops and cuts them.
    """
    from breastcad.data.imageio import read_image, read_mask
    from breastcad.errors import ImageReadError
    from breastcad.segmentation import MASK_THRESHOLD, load_model, predict_probs, upsample

    n = len(paths)
    models = {plan.fold: load_model(seg_dir / f"fold-{plan.fold}") for plan in plans}
    seg_size = int(next(iter(models.values()))[1]["input_size"])

    def pass1(i: int) -> tuple[np.ndarray, bool, tuple[int, int], np.ndarray]:
        img = read_image(paths[i], max_pixels=max_pixels)
        try:
            mask = read_mask(tuple(mask_paths[i]), img.shape) if mask_paths[i] else None
        except ImageReadError:  # as segmentation training skips it: no box, the whole image
            mask = None
        arr, found = crop_input(img, mask, rule, size)
        return arr, found, img.shape, resize_to_uint8(img, seg_size)  # as segmentation saw it

    first = _map_threads(pass1, n)
    gt = np.stack([r[0] for r in first]) if n else np.zeros((0, size, size), np.uint8)
    gt_found = np.array([r[1] for r in first], bool)
    shapes = [r[2] for r in first]
    small = [r[3] for r in first]

    boxes: dict[int, dict[int, Box | None]] = {}
    for plan in plans:
        model, _ = models[plan.fold]
        idx = sorted({int(i) for i in (*plan.val, *plan.test)})
        probs = predict_probs(model, np.stack([small[i] for i in idx]), rt)
        boxes[plan.fold] = {
            i: lesion_box(upsample(p, shapes[i]) >= MASK_THRESHOLD, rule)
            for i, p in zip(idx, probs, strict=True)
        }

    predicted: dict[int, dict[int, np.ndarray]] = {f: {} for f in boxes}
    found: dict[int, dict[int, bool]] = {f: {} for f in boxes}
    need = sorted({i for fold in boxes.values() for i in fold})

    def pass3(k: int) -> None:
        i = need[k]
        img = read_image(paths[i], max_pixels=max_pixels)
        for f, fold in boxes.items():
            if i in fold:
                box = fold[i]
                predicted[f][i] = (
                    crop_square(img, box, size) if box is not None else resize_to_uint8(img, size)
                )
                found[f][i] = box is not None

    _map_threads(pass3, len(need))
    oof = gt.copy()
    per_fold = {}
    for plan in plans:
        for i in plan.test:
            oof[int(i)] = predicted[plan.fold][int(i)]
        per_fold[f"fold-{plan.fold}"] = {
            "test_fallbacks": int(sum(not found[plan.fold][int(i)] for i in plan.test)),
            "val_fallbacks": int(sum(not found[plan.fold][int(i)] for i in plan.val)),
            "n_test": len(plan.test),
            "n_val": len(plan.val),
        }
    train_idx = sorted({int(i) for plan in plans for i in plan.train})
    fallbacks = {
        "train_without_mask": int(sum(not gt_found[i] for i in train_idx)),
        "test_fallbacks": sum(v["test_fallbacks"] for v in per_fold.values()),
        "per_fold": per_fold,
    }
    return CropInputs(gt, gt_found, predicted, found, oof, fallbacks)


def _copy_segmentation(source: Path, run_dir: Path, check_folds: Callable[[Path], None]) -> None:
    """``segment.reuse``: the segmentation models of a run on the same folds, copied in."""
    import shutil

    from breastcad.segmentation import SEG_DIR, has_models

    if not (source / "folds.json").is_file() or not has_models(source):
        raise BreastcadError(
            f"{source}: segment.reuse needs a run folder with folds.json and trained "
            f"segmentation models ({SEG_DIR}/fold-K)"
        )
    check_folds(source / "folds.json")
    tmp = run_dir / f".{SEG_DIR}.copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / SEG_DIR, tmp)
    shutil.rmtree(run_dir / SEG_DIR, ignore_errors=True)
    tmp.rename(run_dir / SEG_DIR)


def run_crop_inputs(
    cfg: Any,
    paths: Sequence[str],
    mask_paths: Sequence[Sequence[str]],
    plans: Sequence[Any],
    run_dir: Path,
    rt: Any,
    check_folds: Callable[[Path], None],
    log: Callable[[str], Any],
) -> CropInputs:
    """A lesion-crop run's inputs: its segmentation (trained on its folds, resumed or
    reused), then every crop its folds need."""
    from breastcad.segmentation import SEG_DIR, has_models, train_segmentation

    if not any(mask_paths):
        raise BreastcadError(
            f"{cfg.data.path or 'bundled data'}: data.preprocess lesion-crop needs lesion masks"
        )
    if cfg.segment.reuse and not has_models(run_dir):
        _copy_segmentation(Path(cfg.segment.reuse), run_dir, check_folds)
        log(f"segmentation: models copied from {cfg.segment.reuse}")
    seg = cfg.segment
    doc = train_segmentation(
        run_dir, arch=seg.model, epochs=seg.epochs, image_size=seg.image_size,
        batch_size=seg.batch_size, lr=seg.lr, threads=cfg.train.threads or None,
        device=cfg.train.device, log=log,
    )  # fmt: skip
    dice = doc["metrics"]["dice"]
    log(f"segmentation: pooled test Dice {dice['value']:.3f} ({doc['seconds']:.0f} s)")
    rule = CropRule(cfg.data.crop_margin, cfg.data.crop_min_side)
    crops = build_crop_inputs(
        paths, mask_paths, plans, run_dir / SEG_DIR, rule, cfg.data.image_size,
        cfg.data.max_pixels, rt,
    )  # fmt: skip
    crops.fallbacks["segmentation"] = {
        "model": seg.model,
        "input_size": seg.image_size,
        "dice": dice,
        "iou": doc["metrics"]["iou"],
    }
    log(
        f"lesion crops: {crops.fallbacks['test_fallbacks']} test image(s) without a predicted "
        "lesion fall back to the whole image"
    )
    return crops


def fold_cropper(run_dir: Path, fold: int, card: dict[str, Any]) -> LesionCropper | None:
    """For a lesion-crop fold model: the cropper with the segmentation model of the same fold
    (never trained on that fold's test images), as cross-validation used it; else None."""
    if (card.get("preprocessing") or {}).get("mode") != MODE:
        return None
    from breastcad.segmentation import SEG_DIR, load_model

    seg = Path(run_dir) / SEG_DIR / f"fold-{fold}"
    return LesionCropper([load_model(seg)], CropRule.from_card(card["preprocessing"]),
                         int(card["input_size"]))  # fmt: skip

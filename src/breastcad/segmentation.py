"""Lesion segmentation on a run's own grouped folds (torchvision LR-ASPP / DeepLabV3 / FCN).

``train_segmentation(run_dir)`` trains one segmentation model per outer fold of a
finished classification run, on exactly that run's folds (``folds.json``, repeat 0):
fold K's model trains on fold K's training images (neither test fold K nor the
classifier's inner-validation images of fold K), chooses its epoch by Dice on a grouped
~15% of those training images held out of its training, and is scored once on test
fold K. So every Dice is measured on images the model never saw, and a lesion-centred
classifier gets masks for its validation images (which choose its epoch and operating
point) and for its test images from a model that neither trained on nor chose anything
with them: validation crops are as good as test crops, no better.

* Models: torchvision's ``lraspp_mobilenet_v3_large`` (default),
  ``deeplabv3_mobilenet_v3_large`` or ``fcn_resnet50``, built with ``weights=None,
  weights_backbone=None`` (nothing is downloaded), the first convolution adapted to one
  grayscale channel, one output class (lesion logit per pixel), BatchNorm momentum 0.1
  (torchvision's 0.01 is too slow for a few hundred images); or ``unet``, MONAI's
  residual U-Net (channels 16-256, four stride-2 levels, two residual units each,
  instance norm) on one grayscale channel, whose skip connections keep boundaries at
  full resolution (input side a multiple of 16).
* Inputs: the image stretched to ``input_size`` x ``input_size`` (as the classifier's
  ``stretch`` preprocessing), standardised per image. Targets: the union of the image's
  masks (BUSI's ``_mask_1`` etc. merged), resized alike; an image without masks (a
  normal image, when the run's task has them) trains as an empty mask.
* Training: AdamW, cosine learning rate, BCE + soft Dice loss, the classifier's
  augmentation (``augment_with_masks``): the same random affine warp of image and
  mask; intensity, speckle, blur and lower resolution on the image only.
* Scoring: the predicted probability is upsampled bilinearly to the image's own size
  and thresholded at 0.5; Dice and IoU against the mask at that size, per image with
  a non-empty mask; means per fold and pooled, with 95% percentile bootstrap CIs over
  duplicate groups (as every other metric). Images with an empty mask report how
  often the prediction is empty too.

Files: ``RUN/segmentation/fold-K/{model.safetensors,card.json,history.csv,FINISHED}`` and
``RUN/segmentation/segmentation.json``.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from breastcad.config import SEG_ARCHS, UNET_SIDE_MULTIPLE
from breastcad.errors import BreastcadError, ConfigError

SEG_DIR = "segmentation"
FILENAME = "segmentation.json"
KIND = "segmentation"
ARCHS = SEG_ARCHS
#: MONAI's residual U-Net; four stride-2 levels, so sides divide by UNET_SIDE_MULTIPLE.
UNET_CHANNELS, UNET_STRIDES = (16, 32, 64, 128, 256), (2, 2, 2, 2)
MASK_THRESHOLD = 0.5
#: A finished segmentation fold. Not "DONE": the run's own fold finder (predict.py) takes
#: every folder under the run with DONE + card.json for a classification fold.
MARKER = "FINISHED"
METRICS = ("dice", "iou")

#: Peak learning rates: the U-Net underfits at the MobileNet heads' 2e-3 (BUSI fold 0,
#: 15 epochs: training loss 1.23 vs 0.42, test Dice 0.60 vs 0.64).
DEFAULT_LR, ARCH_LR = 2e-3, {"unet": 1e-2}


def default_lr(arch: str) -> float:
    """The peak learning rate ``arch`` trains at when none is given."""
    return ARCH_LR.get(arch, DEFAULT_LR)


# ----------------------------------------------------------------------------- model


class SegNet(nn.Module):
    """A torchvision segmentation model on one grayscale channel, one lesion logit per pixel."""

    def __init__(self, arch: str = ARCHS[0]) -> None:
        super().__init__()
        from torchvision.models import segmentation as tvseg

        if arch not in ARCHS:
            raise ConfigError(f"unknown segmentation model {arch!r}; valid: {', '.join(ARCHS)}")
        self.arch = arch
        if arch == "unet":
            from monai.networks.nets import UNet

            # Skip connections keep full-resolution boundaries (LR-ASPP predicts at 1/8).
            self.net = UNet(spatial_dims=2, in_channels=1, out_channels=1,
                            channels=UNET_CHANNELS, strides=UNET_STRIDES, num_res_units=2,
                            norm="instance")  # fmt: skip
            return
        self.net = getattr(tvseg, arch)(weights=None, weights_backbone=None, num_classes=1)
        body = self.net.backbone
        if arch == "fcn_resnet50":
            old = body.conv1
            body.conv1 = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding,
                                   bias=False)  # fmt: skip
        else:
            old = body["0"][0]
            body["0"][0] = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride,
                                     old.padding, bias=False)  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.arch == "unet" else out["out"]


def check_input_size(arch: str, image_size: int) -> None:
    """A U-Net halves its input four times and doubles it back: the side must divide by 16."""
    if arch == "unet" and image_size % UNET_SIDE_MULTIPLE:
        raise ConfigError(
            f"segmentation model unet needs an image size that is a multiple of "
            f"{UNET_SIDE_MULTIPLE}, not {image_size}"
        )


def _standardize(x_u8: torch.Tensor) -> torch.Tensor:
    from breastcad.data.augment import standardize, to_float

    return standardize(to_float(x_u8))


# ----------------------------------------------------------------------------- data


def load_pairs(
    paths: Sequence[str],
    mask_paths: Sequence[Sequence[str]],
    size: int,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray, list[int], list[dict[str, str]]]:
    """Images (N, S, S) uint8 and masks (N, S, S) uint8 {0, 1} of the files that read.

    Returns ``(images, masks, kept indices, skipped)``; several masks of one image are
    united; no mask means an empty one.
    """
    from breastcad.data.cache import resize_to_uint8
    from breastcad.data.imageio import read_image, read_mask

    imgs, masks, kept, skipped = [], [], [], []
    for i, (p, mp) in enumerate(zip(paths, mask_paths, strict=True)):
        try:
            img = read_image(p, max_pixels=max_pixels)
            m = read_mask(tuple(mp), img.shape)
        except BreastcadError as err:
            skipped.append({"path": p, "problem": str(err)})
            continue
        imgs.append(resize_to_uint8(img, size))
        masks.append((resize_to_uint8(m.astype(np.float32), size) >= 128).astype(np.uint8))
        kept.append(i)
    empty = np.zeros((0, size, size), np.uint8)
    return (np.stack(imgs) if imgs else empty, np.stack(masks) if masks else empty, kept, skipped)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


@torch.inference_mode()
def predict_probs(model: nn.Module, images_u8: np.ndarray | torch.Tensor, rt: Any,
                  batch_size: int = 32) -> np.ndarray:  # fmt: skip
    """Lesion probability (N, S, S) at the model's input size."""
    model.eval()
    model.to(rt.device)
    x_all = torch.as_tensor(np.asarray(images_u8))
    outs = []
    for b in range(0, len(x_all), batch_size):
        x = _standardize(x_all[b : b + batch_size]).to(rt.device)
        outs.append(torch.sigmoid(model(x).float())[:, 0].cpu())
    if not outs:
        return np.zeros((0,) + tuple(x_all.shape[1:]), np.float32)
    return torch.cat(outs).numpy()


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both empty: 1.0, 1.0)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = float((p & g).sum())
    total = float(p.sum() + g.sum())
    union = float((p | g).sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def upsample(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A probability map (S, S) resized bilinearly to ``shape`` (H, W) (the exact inverse of
    the stretch to a square)."""
    t = torch.from_numpy(np.ascontiguousarray(prob, np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_dice: float
    history: list[dict[str, float]]
    seconds: float


def fit(
    images: np.ndarray,
    masks: np.ndarray,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    *,
    arch: str = ARCHS[0],
    epochs: int = 30,
    batch_size: int = 16,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    seed: int = 0,
    augment: Any = None,
    rt: Any = None,
    log: Callable[[str], Any] | None = None,
) -> tuple[SegNet, FitResult]:
    """Train a :class:`SegNet` on ``train_idx``; keep the epoch with the best val Dice."""
    from breastcad.config import AugmentConfig
    from breastcad.data.augment import augment_with_masks
    from breastcad.evaluate import runtime

    rt = rt or runtime()
    lr = lr or default_lr(arch)
    aug = augment if augment is not None else AugmentConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SegNet(arch).to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train_idx = np.asarray(train_idx)
    steps = max(1, math.ceil(len(train_idx) / batch_size)) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    x_all, m_all = torch.from_numpy(images), torch.from_numpy(masks)
    best = (-1.0, 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, n = 0.0, 0
        for b in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[b : b + batch_size])
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            x = x_all[idx].float().div(255.0).unsqueeze(1)
            m = m_all[idx].float().unsqueeze(1)
            if getattr(aug, "enabled", True):
                x, m = augment_with_masks(x, m, aug, gen)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-3)
            loss = _loss(model(x.to(rt.device)), m.to(rt.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        val_dice = _mean_dice(model, images, masks, val_idx, rt)
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_dice": val_dice})
        # no lesion among the epoch-choosing images: keep the last epoch, not the untrained one
        if val_dice > best[0] or math.isnan(val_dice):
            best = (val_dice, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if log:
            log(f"    epoch {epoch}: loss {total / max(n, 1):.3f}, val Dice {val_dice:.3f}")
    model.load_state_dict(best[2])
    model.eval()
    return model, FitResult(best[2], best[1], best[0], history, time.perf_counter() - t0)


def _mean_dice(model: nn.Module, images: np.ndarray, masks: np.ndarray,
               idx: Sequence[int], rt: Any) -> float:  # fmt: skip
    idx = [i for i in idx if masks[i].any()]
    if not idx:
        return float("nan")
    probs = predict_probs(model, images[idx], rt)
    return float(np.mean([dice_iou(p >= MASK_THRESHOLD, masks[i])[0]
                          for p, i in zip(probs, idx, strict=True)]))  # fmt: skip


# ----------------------------------------------------------------------------- files


def save_model(folder: Path, model: SegNet, card: dict[str, Any]) -> None:
    from safetensors.torch import save as st_save

    from breastcad.checkpoint import CARD, WEIGHTS
    from breastcad.io import atomic_write_bytes, atomic_write_json

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, st_save(state))
    atomic_write_json(folder / CARD, card)


def load_model(folder: Path) -> tuple[SegNet, dict[str, Any]]:
    """A segmentation fold folder (safetensors + card.json; a pickle is refused)."""
    from safetensors.torch import load as st_load

    from breastcad.checkpoint import CARD, WEIGHTS
    from breastcad.io import read_json
    from breastcad.predict import check_fold_folder

    check_fold_folder(folder)
    card = read_json(folder / CARD)
    if card.get("kind") != KIND:
        raise BreastcadError(f"{folder / CARD}: not a segmentation model card")
    model = SegNet(card["architecture"])
    try:
        state = st_load((folder / WEIGHTS).read_bytes())
        model.load_state_dict(state)
    except Exception as err:  # safetensors / shape mismatches raise their own types
        msg = " ".join(str(err).split())[:160]
        raise BreastcadError(f"{folder / WEIGHTS}: not loadable ({msg})") from None
    model.eval()
    return model, card


def _fold_dirs(seg_dir: Path) -> list[Path]:
    return sorted(p.parent for p in seg_dir.glob(f"fold-*/{MARKER}"))


def has_models(run_dir: str | os.PathLike[str]) -> bool:
    return bool(_fold_dirs(Path(run_dir) / SEG_DIR))


def load_models(path: str | os.PathLike[str]) -> list[tuple[SegNet, dict[str, Any]]]:
    """A run folder (its ``segmentation/`` ensemble), a segmentation folder or one fold."""
    from breastcad.checkpoint import CARD

    p = Path(path)
    if (p / CARD).is_file():
        return [load_model(p)]
    for seg in (p / SEG_DIR, p):
        dirs = _fold_dirs(seg)
        if dirs:
            return [load_model(d) for d in dirs]
    raise BreastcadError(
        f"{p}: no segmentation model (train one with `breastcad segment RUN --train`)"
    )


def ensemble_masks(
    models: list[tuple[SegNet, dict[str, Any]]], images: list[np.ndarray], rt: Any
) -> list[np.ndarray]:
    """Mean lesion probability of the models, at each image's own size."""
    from breastcad.data.cache import resize_to_uint8

    size = int(models[0][1]["input_size"])
    stack = np.stack([resize_to_uint8(im, size) for im in images])
    mean = np.mean([predict_probs(m, stack, rt) for m, _ in models], axis=0)
    return [upsample(p, im.shape) for p, im in zip(mean, images, strict=True)]


# ----------------------------------------------------------------------------- run level


def _summary(rows: list[dict[str, Any]], n_boot: int, seed: int, level: float) -> dict[str, Any]:
    from breastcad.lesion_agreement import mean_with_ci

    lesion = [r for r in rows if r["gt_fraction"] > 0]
    empty = [r for r in rows if r["gt_fraction"] == 0]
    groups = [str(r["group"]) for r in lesion]
    out: dict[str, Any] = {
        "metrics": {
            k: mean_with_ci([r[k] for r in lesion], groups, n_boot, seed, 1 - level)
            for k in METRICS
        },
        "n_images": len(lesion),
        "n_groups": len(set(groups)),
    }
    if empty:
        out["empty_masks"] = {
            "n_images": len(empty),
            "predicted_empty": mean_with_ci(
                [float(r["pred_fraction"] == 0) for r in empty],
                [str(r["group"]) for r in empty], n_boot, seed, 1 - level,
            ),
        }  # fmt: skip
    return out


def _score(
    model: SegNet, card: dict[str, Any], items: list[tuple[int, np.ndarray, np.ndarray]], rt: Any
) -> list[tuple[int, float, float, float, float]]:
    """(index, dice, iou, gt fraction, predicted fraction) at each image's own size."""
    from breastcad.data.cache import resize_to_uint8

    size = int(card["input_size"])
    out = []
    for b in range(0, len(items), 32):
        chunk = items[b : b + 32]
        probs = predict_probs(
            model, np.stack([resize_to_uint8(im, size) for _, im, _ in chunk]), rt
        )
        for (i, im, gt), p in zip(chunk, probs, strict=True):
            pred = upsample(p, im.shape) >= MASK_THRESHOLD
            d, j = dice_iou(pred, gt)
            out.append((i, d, j, float(gt.mean()), float(pred.mean())))
    return out


EPOCH_CHOICE = (
    "the epoch is chosen on a grouped ~15% of the fold's training images, held out of its training"
)


def epoch_choice_split(
    train: Sequence[int], samples: Sequence[dict[str, Any]], seed: int, fraction: float = 0.15
) -> tuple[list[int], list[int]]:
    """Hold whole duplicate groups of ``train`` out to choose the segmentation epoch.

    Not the classifier's inner-validation images: those choose the classifier's epoch and
    operating point on *predicted* crops, which must be as unseen by segmentation as the
    test images' crops are."""
    size: dict[Any, int] = {}
    for i in train:
        size[samples[i]["group"]] = size.get(samples[i]["group"], 0) + 1
    groups = sorted(size, key=str)
    held: set[Any] = set()
    n_held, target = 0, max(1, round(fraction * len(train)))
    for j in np.random.default_rng(seed).permutation(len(groups)):
        if n_held >= target or len(held) == len(groups) - 1:
            break
        if n_held + size[groups[j]] > 2 * target:  # a big group would overshoot: next one
            continue
        held.add(groups[j])
        n_held += size[groups[j]]
    fit_on = [i for i in train if samples[i]["group"] not in held]
    choose_on = [i for i in train if samples[i]["group"] in held]
    return fit_on, choose_on


def _current_rule(fold_dir: Path, k: int, arch: str, image_size: int,
                  say: Callable[[str], Any]) -> bool:  # fmt: skip
    """A finished fold is reused only when it is the model asked for and its epoch was
    chosen as today: models from before chose it on the classifier's inner-validation
    images."""
    from breastcad.io import read_json

    card = read_json(fold_dir / "card.json")
    if (card.get("architecture"), card.get("input_size")) != (arch, image_size):
        have = f"{card.get('architecture')} at {card.get('input_size')} px"
        say(f"  fold-{k}: the finished model is {have}, not {arch} at {image_size} px; "
            "training it again")  # fmt: skip
        return False
    if card.get("epoch_chosen_on") == EPOCH_CHOICE:
        return True
    say(f"  fold-{k}: trained under an earlier rule (its epoch chosen on the classifier's "
        "validation images); training it again")  # fmt: skip
    return False


def train_segmentation(
    run_dir: str | os.PathLike[str],
    *,
    arch: str = ARCHS[0],
    epochs: int = 30,
    image_size: int = 128,
    batch_size: int = 16,
    lr: float | None = None,
    threads: int | None = None,
    device: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """One segmentation model per outer fold of the run (repeat 0); Dice/IoU on the test folds.

    Finished folds (``FINISHED``) are reused, so an interrupted call continues.
    """
    from breastcad.config import AugmentConfig
    from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image, read_mask
    from breastcad.data.sources import load_source
    from breastcad.evaluate import runtime
    from breastcad.io import (
        atomic_write_csv,
        atomic_write_json,
        atomic_write_text,
        ensure_dir,
        read_json,
    )
    from breastcad.lesion_agreement import _read_config

    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    run_dir = Path(run_dir)
    if not (run_dir / "folds.json").is_file():
        raise BreastcadError(f"{run_dir}: not a run folder (no folds.json)")
    if arch not in ARCHS:
        raise ConfigError(f"unknown segmentation model {arch!r}; valid: {', '.join(ARCHS)}")
    if epochs < 1 or image_size < 32:
        raise ConfigError("segmentation needs epochs >= 1 and an image size of at least 32")
    check_input_size(arch, image_size)
    lr = lr or default_lr(arch)
    cfg = _read_config(run_dir)
    data_cfg, eval_cfg = cfg.get("data") or {}, cfg.get("eval") or {}
    seed = int(cfg.get("seed") or 0)
    max_pixels = int(data_cfg.get("max_pixels") or DEFAULT_MAX_PIXELS)
    n_boot = int(eval_cfg.get("n_bootstrap") or 1000)
    level = float(eval_cfg.get("ci_level") or 0.95)
    aug_cfg = AugmentConfig(**{k: v for k, v in (cfg.get("augment") or {}).items()
                               if k in AugmentConfig.__dataclass_fields__})  # fmt: skip
    folds = read_json(run_dir / "folds.json")
    samples = folds["samples"]
    rep = folds["repeats"][0]
    test_fold = [int(k) for k in rep["test_fold"]]
    val_in = rep["inner_validation_in_folds"]
    source = load_source(data_cfg.get("path"))
    masks_of = {os.path.abspath(s.path): s.mask_paths for s in source.samples}
    mask_paths = [masks_of.get(os.path.abspath(s["path"]), ()) for s in samples]
    if not any(mask_paths):
        raise BreastcadError(f"{data_cfg.get('path')}: the run's data have no lesion masks")
    rt = runtime(threads, device)
    seg_dir = ensure_dir(Path(out_dir) if out_dir else run_dir / SEG_DIR)
    say(f"segmentation: {arch}, {image_size} px, {epochs} epochs, {len(samples)} images")
    images, masks, kept, skipped = load_pairs(
        [s["path"] for s in samples], mask_paths, image_size, max_pixels
    )
    pos_of = {i: k for k, i in enumerate(kept)}  # sample index -> row in images/masks
    rows: list[dict[str, Any]] = []
    per_fold = []
    for k in sorted(set(test_fold) - {-1}):
        fold_dir = ensure_dir(seg_dir / f"fold-{k}")
        test = [i for i in kept if test_fold[i] == k]
        outer_train = [i for i in kept if test_fold[i] != k and f"val@{k};" not in val_in[i]]
        train, val = epoch_choice_split(outer_train, samples, seed + k)
        if (fold_dir / MARKER).exists() and _current_rule(fold_dir, k, arch, image_size, say):
            model, card = load_model(fold_dir)
            say(f"  fold-{k}: already done, reusing it")
        else:
            say(f"  fold-{k}: training on {len(train)} images, {len(val)} choose the epoch")
            model, res = fit(
                images, masks, [pos_of[i] for i in train], [pos_of[i] for i in val], arch=arch,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + k, augment=aug_cfg,
                rt=rt,
            )  # fmt: skip
            from breastcad import __version__

            card = {
                "kind": KIND, "architecture": arch, "in_chans": 1, "input_size": image_size,
                "fold": k, "seed": seed + k, "best_epoch": res.best_epoch, "lr": lr,
                "epoch_chosen_on": EPOCH_CHOICE,
                "val_dice": res.best_val_dice, "n_train": len(train), "n_val": len(val),
                "mask_threshold": MASK_THRESHOLD,
                "preprocessing": {"mode": "stretch", "resize": "stretch to square, bilinear",
                                  "normalise": "per image: zero mean, unit variance"},
                "output": "lesion probability per pixel (sigmoid), upsampled bilinearly to the "
                "image's own size, lesion where >= mask_threshold",
                "weights": ("MONAI" if arch == "unet" else "torchvision")
                + " architecture, trained from scratch (weights=None)",
                "seconds": round(res.seconds, 1), "breastcad_version": __version__,
            }  # fmt: skip
            save_model(fold_dir, model, card)
            atomic_write_csv(
                fold_dir / "history.csv", ["epoch", "train_loss", "val_dice"],
                [[h["epoch"], f"{h['train_loss']:.5f}", f"{h['val_dice']:.5f}"]
                 for h in res.history],
            )  # fmt: skip
            atomic_write_text(fold_dir / MARKER, "done\n")
        items = []
        for i in test:  # scored at the image's own size, against the full-size mask
            img = read_image(samples[i]["path"], max_pixels=max_pixels)
            items.append((i, img, read_mask(tuple(mask_paths[i]), img.shape)))
        fold_rows = []
        for i, d, j, gtf, pf in _score(model, card, items, rt):
            fold_rows.append({"path": samples[i]["path"], "label": samples[i]["label"],
                              "group": samples[i]["group"], "fold": k, "dice": d, "iou": j,
                              "gt_fraction": gtf, "pred_fraction": pf})  # fmt: skip
        rows += fold_rows
        s = _summary(fold_rows, n_boot, seed, level)
        per_fold.append({"fold": k, "n_test": len(test), "best_epoch": card["best_epoch"],
                         "val_dice": card["val_dice"], **{m: s["metrics"][m]["value"]
                                                          for m in METRICS}})  # fmt: skip
        say(f"  fold-{k}: test Dice {s['metrics']['dice']['value']:.3f} on {s['n_images']} images")
    pooled = _summary(rows, n_boot, seed, level)
    doc = {
        "model": arch, "input_size": image_size, "epochs": epochs, "lr": lr,
        "folds": "the run's grouped folds (folds.json, repeat 0): fold K's model never saw "
        f"test fold K nor fold K's inner-validation images; {EPOCH_CHOICE}",
        "mask_threshold": MASK_THRESHOLD,
        "scored_at": "each image's own size (prediction upsampled bilinearly); masks of one "
        "image united",
        **pooled, "per_fold": per_fold, "skipped": skipped,
        "by_class": {c: _summary([r for r in rows if r["label"] == c], n_boot, seed, level)
                     ["metrics"] for c in sorted({r["label"] for r in rows})},
        "ci": {"level": level, "method": "percentile bootstrap over duplicate groups (mean of "
               "per-image values)", "n_bootstrap": n_boot},
        "seconds": round(time.perf_counter() - t0, 1), "per_image": rows,
    }  # fmt: skip
    atomic_write_json(seg_dir / FILENAME, doc)
    return doc


def evaluate_masks(
    run_dir: str | os.PathLike[str],
    samples: list[Any],
    *,
    max_pixels: int,
    rt: Any,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """Dice/IoU of the run's segmentation ensemble on external samples with masks."""
    from breastcad.data.imageio import read_image, read_mask

    models = load_models(run_dir)
    rows, skipped = [], []
    for b in range(0, len(samples), 32):
        imgs, gts, keep = [], [], []
        for s in samples[b : b + 32]:
            try:
                img = read_image(s.path, max_pixels=max_pixels)
                gts.append(read_mask(s.mask_paths, img.shape))
                imgs.append(img)
                keep.append(s)
            except BreastcadError as err:
                skipped.append({"path": s.path, "problem": str(err)})
        if not imgs:
            continue
        for s, prob, gt in zip(keep, ensemble_masks(models, imgs, rt), gts, strict=True):
            pred = prob >= MASK_THRESHOLD
            d, j = dice_iou(pred, gt)
            rows.append(
                {"path": s.path, "label": s.label, "group": s.group, "dice": d, "iou": j,
                 "gt_fraction": float(gt.mean()), "pred_fraction": float(pred.mean())}
            )  # fmt: skip
    if not rows:
        return {"computed": False, "why": "no external mask could be read", "skipped": skipped}
    return {
        "computed": True,
        "model": f"{models[0][1]['architecture']} x{len(models)}",
        "mask_threshold": MASK_THRESHOLD,
        **_summary(rows, n_boot, seed, level),
        "skipped": skipped,
        "per_image": rows,
    }


# ----------------------------------------------------------------------------- outputs


def overlay_png(image: np.ndarray, prob: np.ndarray) -> bytes:
    """The image in gray with the predicted lesion tinted and outlined (PNG bytes)."""
    from PIL import Image

    base = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    rgb = np.repeat(base[..., None], 3, axis=-1).astype(np.float32)
    lesion = prob >= MASK_THRESHOLD
    tint = np.array([255, 60, 40], np.float32)
    rgb[lesion] = 0.6 * rgb[lesion] + 0.4 * tint
    inner = lesion
    for _ in range(max(1, round(min(lesion.shape) / 200))):  # outline ~0.5% of the short side
        inner = _erode(inner)
    edge = lesion & ~inner
    rgb[edge] = tint
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def mask_png(prob: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(((prob >= MASK_THRESHOLD) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

"""Classify a whole mammogram with a patch model by sliding it over the breast.

``breastcad predict RUN IMAGES --sliding-window [--stride 0.5]`` with a run
trained on ``breastcad patches`` output. Per image:

1. The image is prepared exactly as patch extraction prepared it
   (:func:`breastcad.data.patches.prepare_image`: breast found, markers
   blanked, breast window, 8 bits).
2. Square windows of the patch side recorded in the run's cards
   (``card["patches"]["patch_side"]``, in original pixels) are placed on a grid
   with a step of ``stride`` x side; the last row and column sit flush with the
   image edge, so every pixel is covered. Windows with less than
   ``MIN_BREAST`` of their area in the breast are not scored (the rule that
   chose the normal training patches); if none qualifies, the most-breast
   windows are scored.
3. Each window becomes the model input as a patch file would (the run's card
   preprocessing, i.e. stretch to the input size), and the windows go through
   the ensemble in batches.
4. The image's probability of the positive class is the **maximum over its
   windows**; the other columns (``prob_<class>``, the decision) are those of
   that top window, and its box is reported.

The decision applies the run's threshold, which was chosen on *patch*
predictions: the maximum over a few hundred windows is higher than a single
patch's probability, so at the image level that threshold gives more positives
than its patch-level sensitivity suggests. The image-level operating point has
not been validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breastcad.data.cache import prepare_for_model
from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image
from breastcad.data.patches import MIN_BREAST, Box, PreparedImage, patch_input, prepare_image
from breastcad.data.records import BadFile
from breastcad.errors import BreastcadError, ImageReadError, printable

DEFAULT_STRIDE = 0.5


@dataclass
class SlideResult:
    """Every scored window of one image with the ensemble's probabilities."""

    boxes: list[Box]
    probs: np.ndarray  # (n_windows, n_classes), calibrated ensemble probabilities
    positive: int  # column of the positive class
    shape: tuple[int, int]  # (H, W) of the image

    @property
    def p(self) -> np.ndarray:
        return self.probs[:, self.positive]

    @property
    def top(self) -> int:
        return int(np.argmax(self.p))

    @property
    def prob(self) -> float:
        return float(self.p[self.top])

    def heatmap(self, scale: float) -> np.ndarray:
        """Per pixel (at ``scale`` x the image size) the highest p of the windows covering
        it; NaN where no scored window lies."""
        h, w = self.shape
        out = np.full((max(1, round(h * scale)), max(1, round(w * scale))), np.nan)
        for box, p in sorted(zip(self.boxes, self.p, strict=True), key=lambda t: t[1]):
            y0, y1 = max(0, round(box.y0 * scale)), max(0, round(box.y1 * scale))
            x0, x1 = max(0, round(box.x0 * scale)), max(0, round(box.x1 * scale))
            out[y0:y1, x0:x1] = p  # ascending order: the highest covering window wins
        return out


def patch_side(ens: Any) -> int:
    """The patch side the run was trained at (same in all its cards), or a one-line error."""
    sides = {(c.get("patches") or {}).get("patch_side") for c in ens.cards}
    if None in sides:
        raise BreastcadError(
            f"{printable(str(ens.source))}: not trained on patches from `breastcad patches` "
            "(its cards record no patch size); --sliding-window needs a patch model"
        )
    if len(sides) != 1:
        raise BreastcadError(f"{printable(str(ens.source))}: fold cards disagree on the patch size")
    if not {"normal", "rest"} & set(ens.card["class_names"]):
        raise BreastcadError(
            f"{printable(str(ens.source))}: task {ens.card.get('task')} has no normal class, so "
            "the model never saw normal tissue and would call every window benign or "
            "malignant; train the patches with --task three-class or malignant-vs-rest"
        )
    mode = (ens.card.get("preprocessing") or {}).get("mode", "stretch")
    if mode != "stretch":
        raise BreastcadError(
            f"{printable(str(ens.source))}: trained with data.preprocess={mode}; patch models are "
            "trained with the default (stretch)"
        )
    return int(sides.pop())


def positions(n: int, side: int, step: int) -> list[int]:
    """Window starts along an axis of ``n`` pixels: every ``step``, the last flush with the end."""
    if side >= n:
        return [(n - side) // 2]
    out = list(range(0, n - side + 1, step))
    if out[-1] != n - side:
        out.append(n - side)
    return out


def window_boxes(prep: PreparedImage, side: int, stride: float) -> list[Box]:
    """The windows to score: on the grid, at least ``MIN_BREAST`` breast (see module doc)."""
    h, w = prep.pixels.shape
    step = max(1, round(side * stride))
    grid = [Box(x, y, side) for y in positions(h, side, step) for x in positions(w, side, step)]
    frac = np.array([prep.fraction(b) for b in grid])
    keep = frac >= MIN_BREAST
    if not keep.any():
        keep = frac >= frac.max()
    return [b for b, k in zip(grid, keep, strict=True) if k]


def slide(
    ens: Any,
    img: np.ndarray,
    side: int,
    stride: float = DEFAULT_STRIDE,
    rt: Any = None,
    batch_size: int = 256,
) -> SlideResult:
    """Score every window of a decoded [0, 1] whole image with the patch ensemble."""
    if not 0.0 < stride <= 1.0:
        raise BreastcadError(f"--stride must be in (0, 1] (a share of the window), got {stride}")
    prep = prepare_image(img)
    boxes = window_boxes(prep, side, stride)
    card = ens.card
    chunks = []
    for start in range(0, len(boxes), batch_size):
        batch = [
            prepare_for_model(patch_input(prep.pixels, b), card)
            for b in boxes[start : start + batch_size]
        ]
        chunks.append(ens.probabilities(np.stack(batch), rt))
    classes = card["class_names"]
    return SlideResult(
        boxes, np.concatenate(chunks), classes.index(card["positive_class"]), img.shape
    )


def write_heatmap(path: str | Path, img: np.ndarray, res: SlideResult, title: str = "") -> Path:
    """The image beside its window map (highest p per pixel), top window outlined."""
    from breastcad.data.mammo import downsample
    from breastcad.plots import _rc, _save, plt

    small, _ = downsample(img, 600)
    k = small.shape[1] / img.shape[1]
    heat = res.heatmap(k)
    top = res.boxes[res.top]
    with _rc():
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2 * small.shape[0] / small.shape[1] + 0.5))
        try:
            axes[0].imshow(small, cmap="gray")
            axes[1].imshow(small, cmap="gray")
            shown = axes[1].imshow(
                np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1, alpha=0.6,
                extent=(-0.5, small.shape[1] - 0.5, small.shape[0] - 0.5, -0.5),
            )  # fmt: skip
            x0, y0, x1, y1 = (v * k - 0.5 for v in (top.x0, top.y0, top.x1, top.y1))
            for ax in axes:
                ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="cyan", lw=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            axes[0].set_title("image, top window", fontsize=8)
            axes[1].set_title(f"max p per pixel over {len(res.boxes)} windows", fontsize=8)
            fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
            if title:
                fig.suptitle(title, fontsize=9)
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, path)


def predict_sliding(
    ens: Any,
    paths: list[str],
    stride: float = DEFAULT_STRIDE,
    rt: Any = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    heatmaps: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[BadFile]]:
    """Rows like ``predict.predict_images`` gives, plus the top window and the window count."""
    from breastcad.predict import decide

    side = patch_side(ens)
    rows: list[dict[str, Any]] = []
    bad: list[BadFile] = []
    classes = ens.card["class_names"]
    names: set[str] = set()
    for p in paths:
        try:
            img = read_image(p, max_pixels=max_pixels)
        except ImageReadError as err:
            bad.append(BadFile(p, err.problem))
            continue
        res = slide(ens, img, side, stride, rt)
        top_probs = res.probs[res.top]
        box = res.boxes[res.top]
        row: dict[str, Any] = {
            "path": p,
            "prob": res.prob,
            "decision": decide(top_probs[None], ens)[0],
        }
        if len(classes) > 2:
            row.update({f"prob_{c}": float(top_probs[k]) for k, c in enumerate(classes)})
        row.update(
            {"window_x0": box.x0, "window_y0": box.y0, "window_x1": box.x1, "window_y1": box.y1,
             "windows": len(res.boxes)}
        )  # fmt: skip
        rows.append(row)
        if heatmaps is not None:
            name = Path(p).stem
            while name in names:  # same stem in two folders: keep both
                name += "_"
            names.add(name)
            pos = ens.card["positive_class"]
            write_heatmap(
                Path(heatmaps) / f"{name}_windows.png", img, res,
                title=f"{Path(p).name}: p({pos}) = {res.prob:.3f} (max over windows)",
            )  # fmt: skip
    return rows, bad

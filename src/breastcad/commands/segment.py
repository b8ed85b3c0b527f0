"""``breastcad segment``: lesion masks from a run's segmentation models, or train them.

``breastcad segment RUN --train`` trains one segmentation model per outer fold of the
run, on the run's own grouped folds, and reports Dice/IoU on the test folds with CIs.
``breastcad segment RUN_OR_CHECKPOINT IMAGES... --out DIR`` writes, per image, the
predicted mask (``<stem>_mask.png``, the image's own size) and an overlay
(``<stem>_overlay.png``), and ``segment.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from breastcad.errors import BreastcadError

EXAMPLES = """examples:
  breastcad segment runs/busi-full --train                       # Dice/IoU on the test folds
  breastcad segment runs/busi-full --train --epochs 40 --image-size 160
  breastcad segment runs/busi-full ~/scans/ --out masks/         # masks + overlays
  breastcad segment runs/busi-full/segmentation/fold-2 case.png --out masks/
"""


def add_parser(sub: Any) -> None:
    from breastcad.segmentation import ARCHS

    p = sub.add_parser(
        "segment",
        help="lesion segmentation: train on a run's folds, or write masks and overlays",
        description="With --train: train a torchvision segmentation model (from scratch) per "
        "outer fold of a finished run, on that run's grouped folds, and report Dice and IoU on "
        "the test folds with CIs over duplicate groups (RUN/segmentation/). Otherwise: segment "
        "images with the run's segmentation ensemble (or one fold) and write masks + overlays.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="RUN_OR_CHECKPOINT",
        help="run folder, its segmentation/ folder, or one segmentation fold folder",
    )  # fmt: skip
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--out", help="folder for the masks, overlays and segment.csv")
    p.add_argument("--train", action="store_true", help="train on the run's folds")
    p.add_argument("--arch", default=ARCHS[0], choices=ARCHS, help="segmentation model")
    p.add_argument("--epochs", type=int, default=30, help="epochs per fold (default 30)")
    p.add_argument("--image-size", type=int, default=128, help="input size (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the model's own)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")


def _train(args: argparse.Namespace) -> int:
    from breastcad.lesion_agreement import format_ci
    from breastcad.segmentation import FILENAME, SEG_DIR, train_segmentation

    if args.images:
        raise BreastcadError("--train uses the run's own folds; give no images")
    doc = train_segmentation(
        args.model, arch=args.arch, epochs=args.epochs, image_size=args.image_size,
        batch_size=args.batch_size, lr=args.lr, threads=args.threads, device=args.device,
        log=print,
    )  # fmt: skip
    m = doc["metrics"]
    print(
        f"Lesion segmentation ({doc['model']}) on {doc['n_images']} test-fold images with a mask "
        f"in {doc['n_groups']} groups (95% CI over groups):"
    )
    print(f"  Dice {format_ci(m['dice'], 3)}")
    print(f"  IoU  {format_ci(m['iou'], 3)}")
    for f in doc["per_fold"]:
        print(
            f"  fold-{f['fold']}: Dice {f['dice']:.3f}, IoU {f['iou']:.3f} ({f['n_test']} images)"
        )
    print(f"written to {Path(args.model) / SEG_DIR / FILENAME}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.train:
        return _train(args)
    if not args.images:
        raise BreastcadError("give image files or folders to segment (or --train)")
    if not args.out:
        raise BreastcadError("--out DIR is required: where the masks and overlays go")

    from breastcad.data.imageio import read_image
    from breastcad.errors import printable
    from breastcad.evaluate import runtime
    from breastcad.io import atomic_write_bytes, atomic_write_csv, ensure_dir
    from breastcad.predict import expand_inputs
    from breastcad.segmentation import (
        MASK_THRESHOLD,
        ensemble_masks,
        load_models,
        mask_png,
        overlay_png,
    )

    models = load_models(args.model)
    out = ensure_dir(args.out)
    rt = runtime(args.threads, args.device)
    paths = expand_inputs(args.images)
    table, used, n_bad = [], set(), 0
    for start in range(0, len(paths), 16):
        imgs, kept = [], []
        for p in paths[start : start + 16]:
            try:
                imgs.append(read_image(p))
                kept.append(p)
            except BreastcadError as err:
                print(f"skipped {printable(p)}: {getattr(err, 'problem', err)}", file=sys.stderr)
                n_bad += 1
        if not imgs:
            continue
        for p, img, prob in zip(kept, imgs, ensemble_masks(models, imgs, rt), strict=True):
            stem, k = Path(p).stem or "image", 2
            name = stem
            while name in used:
                name, k = f"{stem}-{k}", k + 1
            used.add(name)
            atomic_write_bytes(out / f"{name}_mask.png", mask_png(prob))
            atomic_write_bytes(out / f"{name}_overlay.png", overlay_png(img, prob))
            frac = float((prob >= MASK_THRESHOLD).mean())
            table.append([p, f"{name}_mask.png", f"{name}_overlay.png", f"{frac:.5f}",
                          int(frac == 0), img.shape[1], img.shape[0]])  # fmt: skip
    if not table:
        raise BreastcadError(f"no readable image among {len(paths)} input(s)")
    atomic_write_csv(
        out / "segment.csv",
        ["path", "mask", "overlay", "lesion_fraction", "empty", "width", "height"],
        table,
    )
    arch = models[0][1]["architecture"]
    print(f"{len(table)} mask(s) and overlay(s) written to {out} ({arch} x{len(models)}); "
          f"{n_bad} skipped")  # fmt: skip
    return 0

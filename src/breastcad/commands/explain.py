"""``breastcad explain``: Grad-CAM overlays, and how well a run's heatmaps land on the lesions.

``breastcad explain RUN IMAGES...|DIR --out DIR`` writes one PNG per image: the image,
the heatmap over it, the predicted probability and the decision at the run's
operating point, plus ``explain.csv`` listing them. ``breastcad explain RUN
--agreement`` scores the run's heatmaps against the lesion masks on its test folds
(``lesion_agreement.json``) and refreshes the run's report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from breastcad.errors import BreastcadError

EXAMPLES = """examples:
  breastcad explain runs/demo ~/scans/case17.png --out explain/      # overlay of one image
  breastcad explain runs/demo ~/scans/ --out explain/                # every image in a folder
  breastcad explain runs/demo/fold-2 case17.dcm --out explain/       # one fold model alone
  breastcad explain runs/demo --agreement                            # heatmaps vs lesion masks
"""

#: Images explained per batch (bounds memory for big folders and big models).
CHUNK = 16
#: Panels larger than this (longest side, pixels) are shown scaled down in the PNG.
MAX_PANEL = 1024


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="Grad-CAM overlays; agreement of heatmaps with lesion masks",
        description="Grad-CAM (Captum) of a run's fold ensemble, or of one fold, on each "
        "model's declared target layer. For each image a PNG with the image, the heatmap "
        "overlay, the probability and the decision at the run's threshold. With --agreement, "
        "score the run's heatmaps against the lesion masks on its test folds.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="run folder or fold folder")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--out", help="folder for the overlay PNGs and explain.csv")
    p.add_argument("--fold", type=int, help="use only fold K of the run")
    p.add_argument(
        "--agreement",
        action="store_true",
        help="score the run's heatmaps against its lesion masks on the test folds "
        "(writes RUN/lesion_agreement.json and refreshes RUN/report.html)",
    )
    p.add_argument(
        "--max-images", type=int, help="with --agreement: a seeded random subset of N images"
    )


def _caption_font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType scaling
        return ImageFont.load_default()


def compose(
    image_u8: Any, overlay: Any, lines: list[str], max_panel: int = MAX_PANEL
) -> tuple[Any, int]:
    """The PNG for one image: caption band on top, then image | overlay side by side.

    Returns ``(PIL image, band height)``. Panels keep the input's size unless its
    longest side exceeds ``max_panel`` (then both are scaled down alike).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = image_u8.shape[:2]
    scale = min(1.0, max_panel / max(h, w))
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    left = Image.fromarray(np.repeat(image_u8[..., None], 3, axis=-1))
    right = Image.fromarray(overlay)
    if scale < 1.0:
        left = left.resize((pw, ph), Image.Resampling.BILINEAR)
        right = right.resize((pw, ph), Image.Resampling.BILINEAR)
    font_px = 14
    font = _caption_font(font_px)
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(draw0.textlength(t, font=font)) for t in lines) + 16
    band = (font_px + 6) * len(lines) + 10
    gap = 6
    canvas = Image.new("RGB", (max(2 * pw + gap, text_w), band + ph), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        draw.text((8, 5 + k * (font_px + 6)), text, fill=(20, 20, 20), font=font)
    canvas.paste(left, (0, band))
    canvas.paste(right, (pw + gap, band))
    return canvas, band


def _out_name(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, k = f"{stem}_gradcam.png", 2
    while name in used:
        name, k = f"{stem}_gradcam-{k}.png", k + 1
    used.add(name)
    return name


def _agreement(args: argparse.Namespace) -> int:
    from breastcad.lesion_agreement import FILENAME, explain_run, format_ci
    from breastcad.report import rerender_report

    run_dir = Path(args.model)
    if not (run_dir / "folds.json").is_file():
        raise BreastcadError(f"{run_dir}: --agreement needs a run folder (with folds.json)")
    doc = explain_run(run_dir, max_images=args.max_images, log=print)
    m = doc["metrics"]
    print(
        f"Lesion agreement of {doc['model']} on {doc['n_images']} test images "
        f"in {doc['n_groups']} groups (95% CI over groups):"
    )
    print(f"  pointing game     {format_ci(m['pointing_game'], 3)}  (chance "
          f"{doc['chance']['pointing_game']:.3f})")  # fmt: skip
    print(f"  energy in lesion  {format_ci(m['energy_in_lesion'], 3)}  (chance "
          f"{doc['chance']['energy_in_lesion']:.3f})")  # fmt: skip
    print(f"  IoU top 20%       {format_ci(m['iou_top20'], 3)}")
    print(f"  IoU Otsu          {format_ci(m['iou_otsu'], 3)}")
    print(f"  {doc['resolution_note']}")
    print(f"written to {run_dir / FILENAME}")
    if (run_dir / "metrics.json").is_file() and (run_dir / "report.html").is_file():
        print(f"report refreshed: {rerender_report(run_dir)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.agreement:
        if args.images:
            raise BreastcadError("--agreement scores the run's own test folds; give no images")
        return _agreement(args)
    if not args.images:
        raise BreastcadError("give image files or folders to explain (or --agreement)")
    if not args.out:
        raise BreastcadError("--out DIR is required: where the overlay PNGs go")

    import io

    import numpy as np
    import torch

    from breastcad.config import TrainConfig
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import read_image
    from breastcad.engine import runtime_settings
    from breastcad.errors import printable
    from breastcad.gradcam import ensemble_gradcam, gradcam_grid, overlay_rgb
    from breastcad.io import atomic_write_bytes, atomic_write_csv, ensure_dir
    from breastcad.models import get_spec
    from breastcad.predict import expand_inputs, load_ensemble, predict_images

    out_dir = ensure_dir(args.out)
    ens = load_ensemble(args.model, args.fold)
    card = ens.card
    arch, size = card["architecture"], int(card["input_size"])
    stretch = str(card.get("preprocessing", {}).get("resize", "stretch")).startswith("stretch")
    rt = runtime_settings(TrainConfig())
    grid = gradcam_grid(ens.models[0], arch, size)
    pos = card["positive_class"]
    model_line = (
        f"Grad-CAM of p({pos}): {arch} x{len(ens.models)}, layer {get_spec(arch).gradcam_layer} "
        f"({grid[0]}x{grid[1]} grid on {size} px input)"
    )
    paths = expand_inputs(args.images)
    used: set[str] = set()
    table: list[list[Any]] = []
    n_bad = 0
    for start in range(0, len(paths), CHUNK):
        rows, bad = predict_images(ens, paths[start : start + CHUNK], rt)
        for b in bad:
            print(f"skipped {printable(b.path)}: {b.problem}", file=sys.stderr)
        n_bad += len(bad)
        images, kept = [], []
        for r in rows:
            try:  # read again at full size for the overlay (predict_images read it once)
                images.append(read_image(r["path"]))
                kept.append(r)
            except BreastcadError as err:
                print(f"skipped {printable(r['path'])}: {err}", file=sys.stderr)
                n_bad += 1
        if not kept:
            continue
        cropper = getattr(ens, "cropper", None)  # lesion-crop runs crop as predict does
        x = torch.from_numpy(np.stack([prepare_for_model(im, card, cropper) for im in images]))
        heats = ensemble_gradcam(ens, x)
        for r, img, heat, model_in in zip(kept, images, heats, x.numpy(), strict=True):
            # The heatmap covers the model input; it maps back onto the whole image only
            # when the input was the whole image stretched to a square.
            shown = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8) if stretch else model_in
            overlay = overlay_rgb(shown, heat)
            lines = [
                printable(Path(r["path"]).name),
                f"p({pos}) = {r['prob']:.3f}  ->  {r['decision']}  (threshold {ens.threshold:.3f})",
                model_line,
            ]
            png, _ = compose(shown, overlay, lines)
            buf = io.BytesIO()
            png.save(buf, format="PNG")
            name = _out_name(r["path"], used)
            atomic_write_bytes(out_dir / name, buf.getvalue())
            table.append(
                [r["path"], f"{r['prob']:.6f}", r["decision"], f"{ens.threshold:.6f}", name,
                 shown.shape[1], shown.shape[0]]
            )  # fmt: skip
    if not table:
        raise BreastcadError(f"no readable image among {len(paths)} input(s)")
    atomic_write_csv(
        out_dir / "explain.csv",
        ["path", "prob", "decision", "threshold", "overlay", "width", "height"],
        table,
    )
    print(f"{len(table)} overlay(s) written to {out_dir}; {n_bad} skipped")
    return 0

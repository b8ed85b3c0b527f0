"""``breastcad patches MANIFEST --out DIR``: lesion and normal patches for patch training."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  breastcad import mias ~/mias/Info.txt --out mias.csv
  breastcad patches mias.csv --out mias-patches                       # 256 px, 2 normal per image
  breastcad patches cbis.csv --out cbis-patches --size 512 --normal-per-image 4
  breastcad train --data mias-patches/patches.csv --task three-class --image-size 128
  breastcad predict runs/mias-patches ~/new/ --sliding-window --stride 0.5 --out preds.csv
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "patches",
        help="cut lesion patches (and random normal patches) from whole mammograms",
        description="For every image of a manifest with lesion coordinates (mask files, or "
        "mini-MIAS roi circles), cut a square patch centred on each lesion, labelled with the "
        "image's label, plus random normal patches inside the breast away from every lesion; "
        "write them as 8-bit PNG with a new CSV manifest (DIR/patches.csv; groups = the "
        "source images' patient ids) to train on. Rules: docs/mammograms.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", metavar="MANIFEST", help="CSV manifest of whole mammograms")
    p.add_argument("--out", required=True, help="new or empty folder to write the patches into")
    p.add_argument(
        "--size",
        type=int,
        default=256,
        help="patch side in original pixels; also the sliding-window size (default 256)",
    )
    p.add_argument(
        "--normal-per-image",
        type=int,
        default=2,
        help="random normal patches per image (default 2)",
    )
    p.add_argument(
        "--context",
        type=float,
        default=1.5,
        help="a lesion patch's side is at least the lesion's extent times this (default 1.5)",
    )
    p.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="move each lesion off the patch centre by up to this share of the free room "
        "(0 = centred, default; 1 = anywhere, still whole inside)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed for normal patches and jitter (default 0)"
    )
    p.add_argument("--workers", type=int, default=2, help="images processed at once (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_out(out: Any) -> None:
    from breastcad.errors import BreastcadError, printable

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BreastcadError(f"{printable(str(out))}: --out must name a new or empty folder")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from breastcad.data.patches import MANIFEST_NAME, PatchSettings, extract_patches, sidecar_path
    from breastcad.data.records import BadFile
    from breastcad.errors import printable

    out = Path(args.out)
    settings = PatchSettings(
        args.size, args.normal_per_image, args.context, args.seed, jitter=args.jitter
    )
    settings.check()
    _check_out(out)
    bar = tqdm(desc="patches", unit="image", disable=args.quiet, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    def report(bad: BadFile) -> None:
        bar.write(f"skipped {printable(bad.path)}: {bad.problem}", file=sys.stderr)

    try:
        result = extract_patches(
            args.manifest, out, settings, args.workers, progress=progress, report=report
        )
    finally:
        bar.close()
    print(result.summary())
    manifest = out / MANIFEST_NAME
    print(
        f"manifest written to {printable(str(manifest))} (settings: {sidecar_path(manifest).name})"
    )
    print(
        f"train on it: breastcad train --data {printable(str(manifest))} --task three-class; "
        f"then: breastcad predict RUN IMAGES --sliding-window"
    )
    return 0

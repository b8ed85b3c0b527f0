"""``breastcad import``: a public mammography dataset's label file -> a CSV manifest."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  breastcad import mias ~/mias/Info.txt --out mias.csv        # circles -> mias_masks/*.png
  breastcad import cbis-ddsm mass_case_description_train_set.csv \\
      calc_case_description_train_set.csv --images ~/CBIS-DDSM --out cbis.csv
  breastcad import inbreast ~/INbreast/INbreast.csv --images ~/INbreast/AllDICOMs \\
      --out inbreast.csv --examples inbreast-crops.png
  breastcad train --data mias.csv --set data.preprocess=breast-crop --image-size 256
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="convert a mammography dataset's label file (mini-MIAS, CBIS-DDSM, INbreast) "
        "to a CSV manifest",
        description="Read the dataset's own label file(s) and write a CSV manifest "
        "(path, label, patient_id, mask and informational columns) for --data. Rows that "
        "cannot be used are listed with the reason; the others are kept. Label mappings are "
        "in docs/mammograms.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", choices=("mias", "cbis-ddsm", "inbreast"), help="dataset format")
    p.add_argument("labels", nargs="+", metavar="LABEL_FILE", help="the dataset's label file(s)")
    p.add_argument("--images", help="folder holding the images (default: the label file's)")
    p.add_argument("--out", required=True, help="CSV manifest to write")
    p.add_argument(
        "--masks", help="mini-MIAS: folder for the lesion masks drawn (default OUT_masks/)"
    )
    p.add_argument(
        "--examples",
        metavar="PNG",
        help="also draw the breast-crop preprocessing of a few imported images to PNG",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(command_module="import_data")


def _examples(result: Any, out: str, n: int = 6) -> int:
    import os
    from itertools import zip_longest

    from breastcad.data.cache import preprocess
    from breastcad.data.imageio import read_image
    from breastcad.data.mammo import plot_examples
    from breastcad.errors import ImageReadError

    items = []
    by_label: dict[str, list[Any]] = {}
    for row in result.rows:
        by_label.setdefault(row.label, []).append(row)
    order = [r for rows in zip_longest(*by_label.values()) for r in rows if r is not None]
    for row in order:
        if len(items) >= n:
            break
        try:
            img = read_image(row.path)
        except ImageReadError:
            continue
        items.append(
            (
                f"{row.label}: {os.path.basename(row.path)}",
                img,
                preprocess(img, 256, "breast-crop"),
            )
        )
    if items:
        plot_examples(items, out, title="breast-crop preprocessing")
    return len(items)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from breastcad.data.importers import run_import, write_manifest
    from breastcad.errors import BreastcadError, printable

    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise BreastcadError(f"{args.out}: the manifest must be a .csv file")
    if out.exists() and not args.force:
        raise BreastcadError(f"{args.out}: already exists (use --force to replace it)")
    masks = args.masks or str(out.with_name(out.stem + "_masks"))
    result = run_import(args.format, args.labels, args.images, masks)
    for b in result.bad:
        print(f"skipped {printable(b.path)}: {b.problem}", file=sys.stderr)
    if result.missing:
        shown = ", ".join(printable(p) for p in result.missing[:3])
        more = f" and {len(result.missing) - 3} more" if len(result.missing) > 3 else ""
        print(
            f"warning: {len(result.missing)} image(s) not found (kept; the audit lists them): "
            f"{shown}{more}",
            file=sys.stderr,
        )
    write_manifest(result, out)
    print(result.summary())
    if result.masks_written:
        print(f"{result.masks_written} lesion mask(s) written to {printable(masks)}")
    print(f"manifest written to {printable(str(out))}")
    if args.examples:
        n = _examples(result, args.examples)
        print(f"{n} preprocessing example(s) drawn to {printable(args.examples)}")
    return 0

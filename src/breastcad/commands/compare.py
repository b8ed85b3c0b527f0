"""``breastcad compare``: several models on the same grouped folds, one table and report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from breastcad.errors import BreastcadError

EXAMPLES = """examples:
  breastcad compare --models basic_cnn,alexnet --out runs/cmp
  breastcad compare --models basic_cnn,alexnet,vgg16,resnet50,densenet201 \\
      --data ~/Dataset_BUSI_with_GT --device cuda --out runs/study   # the study's five, on a GPU
  breastcad compare --variant basic=basic_cnn \\
      --variant basic-noaug=basic_cnn,augment.enabled=false --out runs/aug   # the study's variants
  breastcad compare --models resnet50 --pretrained imagenet --backbone-lr-factor 0.1 --out runs/ft
  breastcad compare --resume runs/cmp                 # continue after a crash or a kill
"""


def add_parser(sub: Any) -> None:
    from breastcad.cli import add_run_options

    p = sub.add_parser(
        "compare",
        help="several models on the same grouped folds -> comparison table and report",
        description="Train every model (or variant) with grouped cross-validation on identical "
        "folds, each into OUT/<label>, then write comparison.csv, comparison.md and report.html "
        "with CIs and paired-bootstrap AUC differences against the best model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", help="comma-separated registered models (see `breastcad models`)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=MODEL[,KEY=VALUE...]",
        help="a labelled model with its own settings (repeatable)",
    )
    add_run_options(p)
    p.add_argument("--out", help="comparison folder (default runs/<timestamp>-compare)")
    p.add_argument("--resume", metavar="OUT", help="continue an interrupted comparison")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from breastcad.cli import run_overrides
    from breastcad.compare import parse_variant, run_comparison
    from breastcad.config import load_config

    if args.resume:
        if args.models or args.variant or run_overrides(args) or args.config or args.out:
            raise BreastcadError(
                "--resume OUT continues OUT with its own settings; drop other options"
            )
        run_comparison(None, None, Path(args.resume), not args.quiet, resume=True)
        return 0
    specs = [m for m in (args.models or "").split(",") if m.strip()] + list(args.variant)
    if not specs:
        raise BreastcadError("name the models to compare: --models a,b or --variant LABEL=MODEL")
    variants = [parse_variant(s) for s in specs]
    base = load_config(args.config, run_overrides(args))
    out = Path(args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-compare")
    run_comparison(base, variants, out, not args.quiet)
    return 0

"""``breastcad collect RUN``: merge the folds that fold jobs trained into one run's results."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  # a SLURM job array (or any batch system), one fold per job, one shared run folder:
  breastcad train --data /shared/busi --out /shared/runs/busi --fold $SLURM_ARRAY_TASK_ID
  breastcad collect /shared/runs/busi      # pooled metrics, predictions, report
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "collect",
        help="merge the folds of a run trained by `train --fold K` jobs into its report",
        description="Read the finished folds (those with a DONE marker) of a run folder and "
        "write what `breastcad train` writes at the end: metrics.json, oof_predictions.csv, "
        "lesion agreement, plots and report.html. Lists the folds still missing and exits 2 "
        "when there are any. Needs the run's data (its config.yaml names it).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder written by `breastcad train --fold K`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from breastcad.cli import print_summary
    from breastcad.experiment import collect_run

    summary = collect_run(Path(args.run), progress=not args.quiet)
    print_summary(summary)
    return 0

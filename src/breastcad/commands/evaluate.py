"""``breastcad evaluate RUN --data DATA``: the run, unchanged, on another labelled dataset.

External validation (docs/external-validation.md): the run's fold ensemble, its
temperatures and its threshold are applied as they are; nothing is fitted on the
external data. Writes ``evaluation.json``, ``predictions.csv``, plots and a report.
"""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  breastcad evaluate runs/busi-full --data ~/other-hospital/             # class folders
  breastcad evaluate runs/busi-full --data other.csv --out eval/other    # CSV manifest (+ masks)
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="external validation: apply a trained run, unchanged, to another dataset",
        description="Apply a run (its fold ensemble, temperatures and threshold, all fixed "
        "during training) to another labelled dataset (folder layout or CSV manifest) and "
        "report every metric of the run report with CIs over the external data's "
        "duplicate/patient groups. Nothing is re-fitted. Unreadable files are listed and "
        "the others evaluated; labels the run's task does not know are reported and left out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="RUN", help="a finished run folder")
    p.add_argument(
        "--data", required=True, help="folder of class folders, BUSI folder or CSV manifest"
    )
    p.add_argument("--out", help="folder for the results (default RUN/external/<name of the data>)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("low"), m.get("high")
    ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{m['value']:.3f}{ci}"


def run(args: argparse.Namespace) -> int:
    from breastcad.evaluate import evaluate_run

    log = (lambda _m: None) if args.quiet else print
    doc = evaluate_run(
        args.model,
        args.data,
        args.out,
        threads=args.threads,
        device=args.device,
        progress=not args.quiet,
        log=log,
    )
    op, pooled, cv = doc["operating_point"], doc["pooled"], doc["cross_validated"]["pooled"]
    lo = doc["data"]["left_out"]
    print()
    print(
        f"External ROC-AUC {_fmt(pooled['roc_auc'])}  (cross-validated {_fmt(cv.get('roc_auc'))})"
    )
    print(
        f"  {doc['n_images']} images in {doc['n_groups']} groups, {doc['n_positive']} "
        f"{doc['positive_class']}; left out: {len(lo['unreadable'])} unreadable, "
        f"{lo['unknown_label_images']} with labels the task does not know, "
        f"{len(lo['in_training_data'])} identical to the run's data"
    )
    print(f"Run's threshold {op['threshold']:.3f} (unchanged; target sensitivity "
          f"{op['target_sensitivity']}):")  # fmt: skip
    print(f"  sensitivity {_fmt(pooled['sensitivity'])}")
    print(f"  specificity {_fmt(pooled['specificity'])}")
    seg = doc.get("segmentation") or {}
    if seg.get("computed"):
        print(f"Lesion segmentation Dice {_fmt(seg['metrics']['dice'])}")
    print(f"Results: {doc['out_dir']}")
    print(f"Report:  {doc['out_dir']}/report.html")
    return 0

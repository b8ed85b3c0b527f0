"""``breastcad robustness RUN``: the site-shift proxy on the run's test folds.

Each test image is scored by the fold model that did not train on it, under a
battery of appearance shifts (gain, gamma, blur, speckle, resolution, field of
view, calipers, text); AUC per shift and level with CIs -> ``robustness.json`` and
``plots/robustness.png`` (docs/external-validation.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  breastcad robustness runs/busi-full                        # the whole battery
  breastcad robustness runs/busi-full --shifts text,calipers,fov
  breastcad robustness runs/busi-full --max-images 200 --out robustness/
"""


def add_parser(sub: Any) -> None:
    from breastcad.shifts import BATTERY

    p = sub.add_parser(
        "robustness",
        help="site-shift proxy: test-fold AUC under realistic appearance shifts",
        description="Score every test-fold image of a run with the fold model that did not "
        "train on it, under appearance shifts that another hospital's images show, and report "
        "the AUC under each with CIs over duplicate groups. Shifts act on the decoded image; "
        "the run's preprocessing follows, as for a real image. Training images are never "
        "shifted and nothing is re-fitted.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="RUN", help="a finished run folder")
    p.add_argument(
        "--shifts",
        help=f"comma-separated subset of: {', '.join(BATTERY)} (default: all)",
    )
    p.add_argument(
        "--out",
        help="folder for robustness.json and robustness.png (default: the run folder, "
        "plot in RUN/plots/)",
    )
    p.add_argument("--max-images", type=int, help="a seeded random subset of N test images")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")


def _fmt(m: dict[str, Any] | None, signed: bool = False) -> str:
    if not m:
        return "n/a"
    v = m.get("value", m.get("diff"))
    lo, hi = m.get("low"), m.get("high")
    if v is None:
        return "n/a"
    f = "+.3f" if signed else ".3f"
    ci = f" ({lo:{f}} to {hi:{f}})" if lo is not None and hi is not None else ""
    return f"{v:{f}}{ci}"


def run(args: argparse.Namespace) -> int:
    from breastcad.robustness import FILENAME, robustness_run

    doc = robustness_run(
        args.model, args.shifts, args.out, max_images=args.max_images, threads=args.threads,
        device=args.device, log=print,
    )  # fmt: skip
    print()
    print(
        f"Unshifted test-fold AUC {_fmt(doc['reference']['roc_auc'])} on {doc['n_images']} "
        f"images in {doc['n_groups']} groups (95% CI over groups)"
    )
    print(f"{'shift':<12}{'level':>8}  {'AUC (95% CI)':<24}{'change (95% CI)':<26}")
    for s in doc["shifts"]:
        for r in s["levels"]:
            print(
                f"{s['name']:<12}{r['level']:>8g}  {_fmt(r['roc_auc']):<24}"
                f"{_fmt(r['auc_change'], signed=True):<26}"
            )
    out = args.out or args.model
    print(f"written to {out}/{FILENAME}; plot {doc['plot']}")
    run_dir = Path(args.model)
    if args.out is None and (run_dir / "report.html").is_file():
        from breastcad.report import rerender_report

        print(f"report refreshed: {rerender_report(run_dir)}")
    return 0

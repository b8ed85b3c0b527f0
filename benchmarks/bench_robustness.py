"""Site-shift proxy on a finished run: test-fold AUC under realistic appearance shifts, recorded.

    python benchmarks/bench_robustness.py --run runs/bench-busi-full          # basic_cnn, full BUSI
    python benchmarks/bench_robustness.py --run RUN --name robustness-x --shifts text,fov

Calls :func:`breastcad.robustness.robustness_run` (every test image scored by the
fold model that did not train on it, under each shift and level; AUC with 95% CIs
over duplicate groups, AUC change from the unshifted images with a paired bootstrap).
The full document (with per-image probabilities) goes to ``--scratch`` (never into
the run folder, which stays as it was); ``benchmarks/results/<name>.json`` records
the summary, the time taken and the machine, and ``benchmarks/results/<name>.png``
the robustness curve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", default="runs/bench-busi-full", help="a finished run folder")
    ap.add_argument("--name", default="robustness-busi", help="results/<name>.json and .png")
    ap.add_argument("--shifts", help="comma-separated subset (default: the whole battery)")
    ap.add_argument("--max-images", type=int, help="a seeded random subset of test images")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument(
        "--scratch", default="/tmp/bench-robustness", help="where the full document goes"
    )
    args = ap.parse_args()

    from breastcad.robustness import robustness_run

    run = Path(args.run)
    t0 = time.perf_counter()
    doc = robustness_run(
        run, args.shifts, args.scratch, max_images=args.max_images, threads=args.threads, log=print
    )
    seconds = time.perf_counter() - t0
    png = HERE / "results" / f"{args.name}.png"
    shutil.copyfile(doc["plot"], png)
    n_conditions = 1 + sum(len(s["levels"]) for s in doc["shifts"])
    record = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/bench_robustness.py", *sys.argv[1:]]),
        "run": str(run),
        "model": doc["model"],
        "input_size": doc["input_size"],
        "scored_by": doc["scored_by"],
        "applied_to": doc["applied_to"],
        "n_images": doc["n_images"],
        "n_groups": doc["n_groups"],
        "n_positive": doc["n_positive"],
        "threshold": doc["threshold"],
        "preprocessing": (doc.get("preprocessing") or {}).get("mode"),
        "reference": doc["reference"],
        "run_pooled_roc_auc": doc["run_pooled_roc_auc"],
        "shifts": doc["shifts"],
        "ci": doc["ci"],
        "skipped": len(doc["skipped"]),
        "seconds": round(seconds, 1),
        "image_conditions_per_second": round(doc["n_images"] * n_conditions / seconds, 1),
        "threads": args.threads,
        "plot": str(png.relative_to(HERE.parent)),
        "machine": machine_info(),
    }
    path = write_json(HERE / "results" / f"{args.name}.json", record)
    ref = doc["reference"]["roc_auc"]
    print(f"unshifted AUC {ref['value']:.3f} ({ref['low']:.3f}-{ref['high']:.3f})")
    for s in doc["shifts"]:
        for r in s["levels"]:
            a, d = r["roc_auc"], r["auc_change"]
            print(
                f"{s['name']:<11}{r['level']:>6g}  AUC {a['value']:.3f} ({a['low']:.3f}-"
                f"{a['high']:.3f})  change {d['diff']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})"
                f"  sens {r['sensitivity']['value']:.2f} spec {r['specificity']['value']:.2f}"
            )
    print(f"written {path} and {png} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

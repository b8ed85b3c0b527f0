"""Quality and speed of a whole cross-validation run, recorded in benchmarks/results/.

    python benchmarks/bench_cv.py --name demo                      # bundled copy (= make demo)
    python benchmarks/bench_cv.py --name busi-full --data ../shared/data/busi
    python benchmarks/bench_cv.py --name leaky --data ../shared/data/busi --leaky

Runs ``breastcad train`` as a user would, times it, and writes
``benchmarks/results/<name>.json`` with the pooled AUC (CI), sensitivity and
specificity at the operating point, time per fold, throughput and machine.
``--leaky`` runs the same protocol with every image its own group (the
random image-level split most BUSI papers use) so the inflation is visible.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--data", help="dataset (default: the bundled copy)")
    ap.add_argument("--leaky", action="store_true", help="image-level split (labelled leaky)")
    ap.add_argument("extra", nargs="*", help="more arguments for breastcad train (after --)")
    args = ap.parse_args()
    out = Path("runs") / f"bench-{args.name}"
    cmd = [sys.executable, "-m", "breastcad", "train", "--quiet", "--out", str(out), *args.extra]
    if args.data:
        cmd += ["--data", args.data]
    if args.leaky:
        cmd += ["--set", "data.leaky_image_split=true"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    m = json.loads((out / "metrics.json").read_text())
    env = json.loads((out / "env.json").read_text())
    record = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["breastcad", *cmd[3:]]),
        "data": args.data or "bundled",
        "leaky": args.leaky,
        "wall_seconds": round(wall, 1),
        "n_images": m["n_images"],
        "n_groups": m["n_groups"],
        "roc_auc": m["pooled"]["roc_auc"],
        "sensitivity": m["pooled"]["sensitivity"],
        "specificity": m["pooled"]["specificity"],
        "threshold": m["operating_point"]["threshold"],
        "fold_seconds": m["timing"]["fold_seconds"],
        "train_images_per_second": m["timing"]["train_images_per_second"],
        "per_fold_auc": [f["roc_auc"] for f in m["per_fold"]],
        "machine": {"cpu": env["cpu"], "threads": env["torch_threads"], "bf16": env.get("bf16")},
        "stdout_tail": proc.stdout.strip().splitlines()[-9:],
    }
    dest = HERE / "results" / f"{args.name}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(record["stdout_tail"]))
    print(f"wall {wall:.0f} s -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

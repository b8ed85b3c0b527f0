"""Nested-tuned basic CNN versus the default configuration, on the same outer grouped folds.

    python benchmarks/bench_tune.py --data ../shared/data/busi --trials 10

Runs ``breastcad train`` (default settings) and ``breastcad tune`` (nested
search, same seed and cv settings, hence the same outer folds) into
``runs/bench-tune-<name>/{default,tuned}``, then compares them with the same
code as ``breastcad compare`` (paired bootstrap over duplicate groups), and
writes ``benchmarks/results/tune-<name>.json``. Both runs continue where they
stopped when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "breastcad", *args], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", default="busi")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--trial-epochs", type=int, default=12)
    args = ap.parse_args()
    out = Path("runs") / f"bench-tune-{args.name}"
    default, tuned = out / "default", out / "tuned"
    seconds = {}
    if not (default / "report.html").exists():
        resume = ["--resume", str(default)] if (default / "config.yaml").exists() else None
        seconds["default"] = _run(
            ["train", "--quiet", *(resume or ["--data", args.data, "--out", str(default)])]
        )
    if not (tuned / "report.html").exists():
        if (tuned / "tune.json").exists():
            seconds["tuned"] = _run(["tune", "--quiet", "--resume", str(tuned)])
        else:
            seconds["tuned"] = _run(
                ["tune", "--quiet", "--data", args.data, "--out", str(tuned),
                 "--trials", str(args.trials), "--trial-epochs", str(args.trial_epochs)]
            )  # fmt: skip
    from breastcad.compare import write_comparison

    doc = write_comparison(out, ["default", "tuned"], log=print)
    metrics = json.loads((tuned / "metrics.json").read_text())
    record = {
        "name": f"tune-{args.name}",
        "date": time.strftime("%Y-%m-%d"),
        "commands": [
            f"breastcad train --data {args.data}",
            f"breastcad tune --data {args.data} --trials {args.trials} "
            f"--trial-epochs {args.trial_epochs}",
        ],
        "wall_seconds_this_call": seconds,
        "tuning": metrics["tuning"],
        "nested_search_seconds": metrics["timing"].get("nested_search_seconds"),
        "environment": json.loads((tuned / "env.json").read_text()),
        "comparison": doc,
    }
    path = HERE / "results" / f"tune-{args.name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

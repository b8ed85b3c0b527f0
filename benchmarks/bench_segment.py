"""Lesion segmentation Dice/IoU on a finished run's own grouped folds.

    python benchmarks/bench_segment.py --run runs/bench-compare-busi-nobf16/basic_cnn \
        --name busi --epochs 15
    python benchmarks/bench_segment.py --run runs/bench-lesion-crop-busi --name busi-unet \
        --arch unet --epochs 15

Copies the run's fold plan (``folds.json``, ``config.yaml``, the audit) to
``runs/bench-segment-<name>`` (the source run is not touched), then runs
``breastcad segment RUN --train`` there as a user would: one segmentation model per
outer fold, trained on that fold's training images (its epoch chosen on a grouped
holdout of them), scored once on the test fold at each image's own size. Continues
an interrupted call (finished folds are reused). Writes
``benchmarks/results/segment-<name>.json``: pooled and per-fold Dice and IoU with
95% CIs over duplicate groups, by class, the settings, time and machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402

PLAN_FILES = ("folds.json", "config.yaml", "audit.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run on data with lesion masks")
    ap.add_argument("--name", default="busi")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--arch", default="lraspp_mobilenet_v3_large", help="segmentation model")
    args = ap.parse_args()
    src, run = Path(args.run), Path("runs") / f"bench-segment-{args.name}"
    run.mkdir(parents=True, exist_ok=True)
    for name in PLAN_FILES:
        if (src / name).exists() and not (run / name).exists():
            shutil.copy2(src / name, run / name)
    cmd = ["segment", str(run), "--train", "--epochs", str(args.epochs),
           "--image-size", str(args.image_size), "--arch", args.arch]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "breastcad", *cmd])
    if proc.returncode != 0:
        return proc.returncode
    seg = json.loads((run / "segmentation" / "segmentation.json").read_text())
    record = {
        "name": f"segment-{args.name}",
        "date": time.strftime("%Y-%m-%d"),
        "command": f"breastcad segment RUN --train --epochs {args.epochs} "
        f"--image-size {args.image_size} --arch {args.arch}",
        "folds_from": str(src),
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
        **{k: seg[k] for k in ("model", "input_size", "epochs", "folds", "mask_threshold",
                               "metrics", "per_fold", "by_class", "ci", "seconds")},
        "n_images": seg.get("n_images"),
        "lr": seg.get("lr"),
    }  # fmt: skip
    path = write_json(HERE / "results" / f"segment-{args.name}.json", record)
    d = seg["metrics"]["dice"]
    print(f"pooled Dice {d['value']:.3f} ({d['low']:.3f}-{d['high']:.3f}); recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

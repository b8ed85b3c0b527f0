"""Lesion-centred classification on BUSI, beside the whole-image model and their average.

    python benchmarks/bench_lesion_crop.py --data ../shared/data/busi
    python benchmarks/bench_lesion_crop.py --data DATA --whole runs/bench-busi-full
    python benchmarks/bench_robustness.py --run runs/bench-lesion-crop-busi \
        --name robustness-lesion-crop-busi          # the site-shift proxy on the crop model

Trains (or continues) ``breastcad train --set data.preprocess=lesion-crop`` into
``runs/bench-lesion-crop-<name>``: the run first trains its lesion segmentation on
its own grouped folds, then classifies crops (ground-truth boxes for training,
fold K's *predicted* masks for fold K's validation and test images). With
``--whole RUN`` (a whole-image run on the same data and seed, so the same folds)
the record also holds the whole-image model's pooled out-of-fold AUC and the
average of both models' probabilities, each with a 95% CI over duplicate groups,
and paired bootstrap differences. The site-shift proxy battery runs on the
lesion-crop run with bench_robustness.py (each test image cropped by its own
fold's segmentation), beside the whole-image run's recorded drops.

Writes ``benchmarks/results/lesion-crop-<name>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402


def _oof(run: Path) -> dict[str, dict[str, str]]:
    with (run / "oof_predictions.csv").open(newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _ci(m: Any) -> dict[str, float]:
    return {"value": m.value, "low": m.low, "high": m.high}


def combine(crop_run: Path, whole_run: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Each model alone and their average, on the same images, groups and folds."""
    from breastcad.metrics import bootstrap_metrics, paired_bootstrap_auc_difference

    a, b = (
        json.loads((crop_run / "folds.json").read_text()),
        json.loads((whole_run / "folds.json").read_text()),
    )
    if a["samples"] != b["samples"] or a["repeats"] != b["repeats"]:
        raise SystemExit(f"{whole_run}: not the same folds as {crop_run}; cannot combine")
    crop, whole = _oof(crop_run), _oof(whole_run)
    paths = sorted(crop)
    y = np.array([crop[p]["label"] == "malignant" for p in paths], int)
    groups = np.array([crop[p]["group"] for p in paths])
    probs = {
        "lesion-crop": np.array([float(crop[p]["prob"]) for p in paths]),
        "whole-image": np.array([float(whole[p]["prob"]) for p in paths]),
    }
    probs["average"] = (probs["lesion-crop"] + probs["whole-image"]) / 2
    out: dict[str, Any] = {"n_images": len(paths), "n_groups": len(set(groups.tolist()))}
    for name, p in probs.items():
        out[name] = {"roc_auc": _ci(bootstrap_metrics(y, p, groups, 0.5, n_boot)["roc_auc"])}
    for a_name, b_name in (("lesion-crop", "whole-image"), ("average", "whole-image"),
                           ("average", "lesion-crop")):  # fmt: skip
        d = paired_bootstrap_auc_difference(y, probs[a_name], probs[b_name], groups, n_boot)
        out[f"{a_name} - {b_name}"] = {"auc_difference": d.diff, "low": d.low,
                                       "high": d.high, "p_value": d.p_value}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", default="busi")
    ap.add_argument("--whole", help="a whole-image run on the same data and seed")
    ap.add_argument(
        "extra",
        nargs="*",
        help="more breastcad train options after --, e.g. -- --set segment.epochs=15",
    )
    args = ap.parse_args()
    run = Path("runs") / f"bench-lesion-crop-{args.name}"
    if (run / "config.yaml").exists():
        cmd = ["train", "--resume", str(run), "--quiet"]
    else:
        cmd = ["train", "--data", args.data, "--out", str(run), "--quiet",
               "--set", "data.preprocess=lesion-crop", *args.extra]  # fmt: skip
    machine = machine_info()  # before the run: its load average is the one the run met
    t0 = time.perf_counter()
    if not (run / "metrics.json").exists():
        proc = subprocess.run([sys.executable, "-m", "breastcad", *cmd])
        if proc.returncode != 0:
            return proc.returncode
    train_seconds = time.perf_counter() - t0
    metrics = json.loads((run / "metrics.json").read_text())
    seg = json.loads((run / "segmentation" / "segmentation.json").read_text())
    record: dict[str, Any] = {
        "name": f"lesion-crop-{args.name}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["breastcad train --data DATA --set data.preprocess=lesion-crop", *args.extra]
        ),
        "wall_seconds_this_call": round(train_seconds, 1),
        "machine": machine,
        "pooled": metrics["pooled"],
        "operating_point": metrics["operating_point"],
        "lesion_crop": metrics["lesion_crop"],
        "segmentation": {
            k: seg[k]
            for k in ("model", "input_size", "epochs", "metrics", "per_fold", "n_images", "seconds")
        },  # fmt: skip
    }
    if args.whole:
        record["combined"] = combine(run, Path(args.whole))
    path = write_json(HERE / "results" / f"lesion-crop-{args.name}.json", record)
    auc = metrics["pooled"]["roc_auc"]
    print(f"lesion-crop pooled AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}); "
          f"segmentation Dice {seg['metrics']['dice']['value']:.3f}; recorded {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

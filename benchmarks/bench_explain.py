"""Where a run's Grad-CAM heatmaps land: lesion agreement on the test folds, recorded.

    python benchmarks/bench_explain.py --run runs/bench-busi-full          # basic_cnn, full BUSI
    python benchmarks/bench_explain.py --run RUN --name explain-x --max-images 200

Calls :func:`breastcad.lesion_agreement.explain_run` on a finished run (every test
image with a mask, explained by the fold model that did not train on it, for its
true class), which writes ``RUN/lesion_agreement.json`` and refreshes the report,
then records in ``benchmarks/results/<name>.json``: the pointing-game hit rate,
energy in the lesion, IoU (top 20%, Otsu) with 95% CIs over duplicate groups, the
chance levels, the heatmap grid, where the heatmap maxima sit compared with the
lesions (top band of the image = near field / skin, where BUSI's annotation text
and probe marks also are), the time taken, and ``breastcad explain`` timing on a
few images. It also draws ``<overlay-dir>/<name>-{benign,malignant}.png``: the most
and least agreeing test images of each class with their test-fold overlays and
the lesion outlined, to be looked at.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402


def _overlay_grid(run: Path, rows: list[dict], out: Path, title: str) -> Path:
    import torch

    from breastcad import plots
    from breastcad.checkpoint import load_fold_model
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import read_image, read_mask
    from breastcad.data.sources import MASK_RE
    from breastcad.gradcam import compute_gradcam, overlay_rgb, resize_heat

    images, overlays, masks, titles, hits = [], [], [], [], []
    for r in rows:
        model, card = load_fold_model(run / f"fold-{r['fold']}")
        img = read_image(r["path"])
        target = card["class_names"].index(r["label"])
        x = torch.from_numpy(prepare_for_model(img, card)[None])
        tta = card["preprocessing"].get("tta", "none") != "none"
        heat = resize_heat(
            compute_gradcam(model, card["architecture"], x, target, tta)[0], img.shape
        )
        p = Path(r["path"])
        mask_paths = sorted(
            str(f) for f in p.parent.iterdir()
            if (m := MASK_RE.match(f.stem)) and m.group("stem") == p.stem
        )  # fmt: skip
        # shown at 256 px: enough to see calipers and text
        scale = 256 / max(img.shape)
        shape = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)))
        small = resize_heat(img, shape)
        images.append(small)
        overlays.append(overlay_rgb((small * 255).astype(np.uint8), resize_heat(heat, shape)))
        masks.append(read_mask(mask_paths, shape))
        titles.append(f"{p.name} hit={int(r['pointing_game'])} energy={r['energy_in_lesion']:.2f}")
        hits.append(bool(r["pointing_game"]))
    return plots.plot_sample_grid(
        images,
        titles,
        hits,
        out,
        heading=title,
        overlays=overlays,
        masks=masks,
        frame_note="green frame = pointing-game hit, red = miss",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", default="runs/bench-busi-full", help="a finished run folder")
    ap.add_argument("--name", default="explain-busi", help="results/<name>.json")
    ap.add_argument("--max-images", type=int, help="a seeded random subset")
    ap.add_argument("--overlay-dir", default="runs/bench-explain", help="where grids are drawn")
    args = ap.parse_args()

    from breastcad.lesion_agreement import explain_run
    from breastcad.report import rerender_report

    run = Path(args.run)
    t0 = time.perf_counter()
    doc = explain_run(run, max_images=args.max_images, log=print)
    seconds = time.perf_counter() - t0
    rerender_report(run)
    rows = doc["per_image"]

    peak_y = np.array([r["peak_yx"][0] for r in rows])
    lesion_y = np.array([r["lesion_centroid_yx"][0] for r in rows])
    location = {
        "share_of_peaks_in_top_quarter": float(np.mean(peak_y < 0.25)),
        "share_of_lesion_centroids_in_top_quarter": float(np.mean(lesion_y < 0.25)),
        "median_peak_y": float(np.median(peak_y)),
        "median_lesion_centroid_y": float(np.median(lesion_y)),
        "note": "y as a fraction of image height, 0 = top (skin / near field, where BUSI's "
        "annotation text and probe marks sit); the lesion is usually mid-image",
    }
    by_class_location = {}
    for label in sorted({r["label"] for r in rows}):
        py = np.array([r["peak_yx"][0] for r in rows if r["label"] == label])
        by_class_location[label] = {
            "share_of_peaks_in_top_quarter": float(np.mean(py < 0.25)),
            "median_peak_y": float(np.median(py)),
        }
    location["by_class"] = by_class_location

    out_dir = Path(args.overlay_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = []
    for label in sorted({r["label"] for r in rows}):
        sub = sorted((r for r in rows if r["label"] == label), key=lambda r: r["energy_in_lesion"])
        pick = sub[-4:][::-1] + sub[len(sub) // 2 - 2 : len(sub) // 2 + 2] + sub[:4]
        grids.append(str(_overlay_grid(
            run, pick, out_dir / f"{args.name}-{label}.png",
            f"{label}: best 4, middle 4, worst 4 by energy in lesion (test-fold model, true class)",
        )))  # fmt: skip

    # the user-facing command on a handful of images (fold ensemble, positive class)
    few = [r["path"] for r in rows[:: max(1, len(rows) // 8)][:8]]
    cli_out = out_dir / f"{args.name}-cli"
    t1 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "breastcad", "explain", str(run), *few, "--out", str(cli_out)],
        capture_output=True,
        text=True,
    )
    cli_seconds = time.perf_counter() - t1
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)

    record = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/bench_explain.py", *sys.argv[1:]]),
        "run": str(run),
        "explained_by": doc["explained_by"],
        "model": doc["model"],
        "layer": doc["layer"],
        "input_size": doc["input_size"],
        "heatmap_grid": doc["heatmap_grid"],
        "resolution_note": doc["resolution_note"],
        "target": doc["target"],
        "n_images": doc["n_images"],
        "n_groups": doc["n_groups"],
        "n_empty_heatmap": doc["n_empty_heatmap"],
        "skipped": len(doc["skipped"]),
        "metrics": doc["metrics"],
        "by_class": doc["by_class"],
        "chance": doc["chance"],
        "ci": doc["ci"],
        "peak_location": location,
        "seconds_agreement": round(seconds, 1),
        "cli_explain": {
            "images": len(few),
            "seconds_wall": round(cli_seconds, 1),
            "returncode": proc.returncode,
            "stdout": proc.stdout.strip()[-300:],
        },
        "overlay_grids": grids,
        "machine": machine_info(),
    }
    path = write_json(HERE / "results" / f"{args.name}.json", record)
    m = doc["metrics"]
    for k in ("pointing_game", "energy_in_lesion", "iou_top20", "iou_otsu"):
        print(f"{k:18s} {m[k]['value']:.3f} ({m[k]['low']:.3f}-{m[k]['high']:.3f})")
    print(f"chance {doc['chance']['pointing_game']:.3f}; {doc['resolution_note']}")
    print(json.dumps(location, indent=1))
    print(f"written {path}; grids {grids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

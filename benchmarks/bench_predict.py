"""``predict`` throughput on a folder of BUSI images: PyTorch vs ONNX Runtime.

    .venv/bin/python benchmarks/bench_predict.py --run runs/bench-demo
    .venv/bin/python benchmarks/bench_predict.py --run RUN --images ../shared/data/busi --reps 3

What ``breastcad predict RUN DIR`` does after loading the model, timed in one
process: every image in the folder (masks left out) is read, preprocessed
(``prepare_for_model``) and predicted by ``predict.predict_images``, for the
run's fold ensemble and for fold 0 alone, with the PyTorch backend (the run's
safetensors; bf16 autocast where the CPU has it, as ``predict`` does) and the
ONNX backend (the graph ``breastcad export`` writes, run by onnxruntime,
float32). Images/s is the best of ``--reps`` passes, after one untimed warm-up
batch; the time to decode and preprocess alone is measured the same way, so
the model's share is visible. The largest difference in probability between
the two backends on these images is recorded (bf16 vs float32 accounts for it).
The export itself (dynamo exporter, parity check included) is timed once.
``--json PATH`` writes every number with the date, CPU, versions and load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "breastcad" / "data" / "bundled" / "busi"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder (e.g. runs/bench-demo)")
    p.add_argument("--images", default=str(BUNDLED), help="folder of images")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch and onnxruntime (default: all cores; on a machine "
        "shared with other work 1 avoids threads waiting for each other)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def best_of(reps: int, fn: Any) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = common.machine_info()
    import torch

    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import read_image
    from breastcad.export import export_model
    from breastcad.predict import (
        default_runtime,
        expand_inputs,
        load_ensemble,
        load_onnx,
        predict_images,
    )

    rt = default_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine["torch_threads"] = torch.get_num_threads()
    machine["onnxruntime_threads"] = args.threads or "default (all cores)"
    machine["bf16_autocast"] = rt.bf16
    paths = expand_inputs([args.images])
    results: dict[str, Any] = {"n_images": len(paths)}
    card = load_ensemble(args.run, 0).card
    secs, _ = best_of(args.reps, lambda: [prepare_for_model(read_image(p), card) for p in paths])
    results["decode_preprocess"] = {
        "seconds": round(secs, 3),
        "images_per_second": round(len(paths) / secs, 1),
    }
    print(f"{len(paths)} images; decode + preprocess alone {len(paths) / secs:.0f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name, fold in (("ensemble", None), ("fold0", 0)):
            ens = load_ensemble(args.run, fold)
            t0 = time.perf_counter()
            onnx_path, _, side = export_model(ens, "onnx", Path(tmp) / f"{name}.onnx")
            export_s = time.perf_counter() - t0
            onnx_model = load_onnx(onnx_path, threads=args.threads)
            row: dict[str, Any] = {
                "members": len(ens.models),
                "tta": ens.card["preprocessing"].get("tta", "none") != "none",
                "export_seconds": round(export_s, 2),
                "export_parity_max_abs_diff": side["parity"]["max_abs_diff"],
            }
            probs = {}
            for backend, model in (("torch", ens), ("onnx", onnx_model)):
                predict_images(model, paths[:16])  # warm-up
                secs, (rows, bad) = best_of(args.reps, lambda m=model: predict_images(m, paths))
                probs[backend] = np.array([r["prob"] for r in rows])
                row[backend] = {
                    "seconds": round(secs, 3),
                    "images_per_second": round(len(rows) / secs, 1),
                    "skipped": len(bad),
                }
                print(
                    f"{name:9s} {backend:5s} {len(rows) / secs:7.1f} images/s "
                    f"({secs:.2f} s for {len(rows)})",
                    flush=True,
                )
            row["max_abs_diff_torch_vs_onnx"] = float(np.abs(probs["torch"] - probs["onnx"]).max())
            row["onnx_speedup"] = round(
                row["onnx"]["images_per_second"] / row["torch"]["images_per_second"], 2
            )
            results[name] = row
    machine["load_average_at_end"] = common.load_average()
    doc = {
        "schema_version": 1,
        "benchmark": "predict",
        "date": machine["date"],
        "settings": {
            "run": args.run,
            "images": args.images,
            "reps": args.reps,
            "threads": args.threads,
        },
        "machine": machine,
        "results": results,
    }
    if args.json:
        common.write_json(args.json, doc)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()

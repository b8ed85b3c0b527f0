"""ROI patches: extraction and sliding-window prediction speed on 2000 x 3000 16-bit mammograms.

    .venv/bin/python benchmarks/bench_patches.py                     # 4 images, 256 px patches
    .venv/bin/python benchmarks/bench_patches.py --n 4 --json benchmarks/results/bench_patches.json

Writes ``--n`` synthetic full-field mammograms (tests/synthetic_mammo.py; 2000
wide, 3000 high, 12 bits in a 16-bit PNG, each with a lesion mask PNG) and a
manifest to a temporary folder, then times:

* extraction (file -> patch PNGs + manifest): ``extract_patches`` with
  ``--size`` patches, 2 normal patches per image, 1 and 2 worker threads;
* sliding window, decoded image -> probability: ``sliding_window.slide`` with
  ``--stride``, a patch side of ``--size`` px and a ``basic_cnn`` at
  ``--input`` px (random weights, mirror TTA as trained runs use), for an
  ensemble of 1 and of 5 fold models;
* sliding window, file -> probability: ``predict_sliding`` (decode included),
  5-fold ensemble, as ``breastcad predict RUN --sliding-window`` runs it.

Best of ``--reps`` passes, one process. ``--json PATH`` writes every number
with the machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from breastcad.data.imageio import read_image  # noqa: E402
from breastcad.data.patches import PatchSettings, extract_patches  # noqa: E402
from breastcad.sliding_window import predict_sliding, slide  # noqa: E402
from synthetic_mammo import write_mammo_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="images (even; default 4)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256, help="patch side in image pixels")
    ap.add_argument("--input", type=int, default=128, help="model input side (default 128)")
    ap.add_argument("--stride", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def ensemble(k: int, size: int, side: int) -> Any:
    import torch

    from breastcad.data.cache import preprocessing_card
    from breastcad.models import create_model
    from breastcad.predict import Ensemble

    card = {
        "architecture": "basic_cnn",
        "num_classes": 3,
        "in_chans": 1,
        "input_size": size,
        "preprocessing": {**preprocessing_card("stretch"), "tta": "mirror"},
        "class_names": ["normal", "benign", "malignant"],
        "positive_class": "malignant",
        "temperature": 1.0,
        "patches": {"patch_side": side},
    }
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(create_model("basic_cnn", 3).eval())
    return Ensemble(models=models, cards=[card] * k, threshold=0.5, source=f"bench x{k}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from breastcad.config import TrainConfig
    from breastcad.engine import runtime_settings

    rt = runtime_settings(TrainConfig())
    tmp = Path(tempfile.mkdtemp(prefix="bench-patches-"))
    try:
        t0 = time.perf_counter()
        manifest = write_mammo_dataset(tmp / "data", max(1, args.n // 2), args.height, args.width)
        print(f"{args.n} synthetic {args.width} x {args.height} mammograms written in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        settings = PatchSettings(size=args.size, normal_per_image=2)
        rates: dict[str, float] = {}
        n_patches = 0
        for workers in (1, 2):
            k = 0

            def run(workers: int = workers) -> None:
                nonlocal k, n_patches
                k += 1
                res = extract_patches(manifest, tmp / f"out-{workers}-{k}", settings, workers)
                n_patches = len(res.rows)

            rates[f"extract_file_to_patches_workers{workers}"] = args.n / common.best_seconds(
                run, args.reps
            )

        paths = sorted(
            str(p) for p in (tmp / "data" / "images").glob("*.png") if "_roi" not in p.name
        )
        decoded = [read_image(p) for p in paths]
        windows = {}
        for k in (1, 5):
            ens = ensemble(k, args.input, args.size)
            slide(ens, decoded[0], args.size, args.stride, rt)  # warm-up
            counts = []

            def run_slide(ens: Any = ens, counts: list[int] = counts) -> None:
                counts[:] = [len(slide(ens, a, args.size, args.stride, rt).boxes) for a in decoded]

            secs = common.best_seconds(run_slide, args.reps)
            rates[f"slide_decoded_to_probability_{k}fold"] = len(decoded) / secs
            windows[k] = sum(counts) / len(counts)
            rates[f"windows_per_second_{k}fold"] = sum(counts) / secs
        ens5 = ensemble(5, args.input, args.size)
        secs = common.best_seconds(lambda: predict_sliding(ens5, paths, args.stride, rt), args.reps)
        rates["predict_sliding_file_to_probability_5fold"] = len(paths) / secs

        doc = {
            "benchmark": "bench_patches",
            "command": "python benchmarks/bench_patches.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": common.machine_info(),
            "torch_threads": torch.get_num_threads(),
            "n_images": len(paths),
            "input": f"{args.width} x {args.height}, 12 bits in 16-bit PNG, one lesion mask each",
            "patch_side": args.size,
            "patches_written": n_patches,
            "model_input_size": args.input,
            "stride": args.stride,
            "windows_per_image": windows[1],
            "model": "basic_cnn (random weights), 3 classes, TTA on, bf16 "
            + ("on" if rt.bf16 else "off"),
            "images_per_second": {k: round(v, 3) for k, v in rates.items()},
        }
        rows_out = [[k, f"{v:.3f}"] for k, v in rates.items()]
        print(common.fmt_table(["step (one process)", "images/s (windows/s)"], rows_out))
        print(f"{windows[1]:.0f} windows per image, {n_patches} patches from {len(paths)} images")
        if args.json:
            common.write_json(args.json, doc)
            print(f"written to {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

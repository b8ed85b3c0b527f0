"""Mammogram throughput: preprocessing and prediction on 2000 x 3000 16-bit inputs.

    .venv/bin/python benchmarks/bench_mammo.py                       # 8 images, 128 px
    .venv/bin/python benchmarks/bench_mammo.py --n 8 --size 256 --json benchmarks/results/mammo.json

Writes ``--n`` synthetic full-field mammograms (tests/synthetic_mammo.py: a
breast against one edge, a lesion, a label marker; 2000 wide, 3000 high, 12
bits stored in a 16-bit PNG, half of them also as 16-bit MONOCHROME1 DICOM)
to a temporary folder, then times, per image, on one process:

* decode: ``read_image`` (file -> [0, 1] float32);
* breast-crop: ``find_breast`` + crop, blank, mirror, resize, pad (decoded input);
* stretch: today's whole-image resize, for comparison (decoded input);
* preprocess (file -> model input): decode + breast-crop, images/s;
* predict (file -> probability): ``predict.predict_images`` with a one-fold
  ensemble of ``basic_cnn`` (random weights) whose card says ``breast-crop``:
  decode, preprocessing and the forward pass with TTA, images/s.

Best of ``--reps`` passes. ``--json PATH`` writes every number with the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from breastcad.data import mammo  # noqa: E402
from breastcad.data.cache import preprocess, preprocessing_card, resize_to_uint8  # noqa: E402
from breastcad.data.imageio import read_image  # noqa: E402
from synthetic_mammo import save_16bit_png, synthetic_mammogram  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="images (default 8)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--size", type=int, default=128, help="model input side (default 128)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def write_dicom_16(path: Path, img: np.ndarray) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality = "MG"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (65535 - np.rint(img * 65535)).astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def best_rate(fn: Any, items: list[Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from breastcad.config import TrainConfig
    from breastcad.engine import runtime_settings
    from breastcad.models import create_model
    from breastcad.predict import Ensemble, predict_images

    rt = runtime_settings(TrainConfig())
    tmp = Path(tempfile.mkdtemp(prefix="bench-mammo-"))
    pngs, dcms = [], []
    t0 = time.perf_counter()
    for i in range(args.n):
        m = synthetic_mammogram(args.height, args.width, seed=i, chest_right=bool(i % 2))
        pngs.append(str(save_16bit_png(tmp / f"m{i:02d}.png", m.image, bits=12)))
        if i % 2 == 0:
            dcms.append(str(write_dicom_16(tmp / f"m{i:02d}.dcm", m.image)))
    make_s = time.perf_counter() - t0
    print(f"{args.n} synthetic {args.width} x {args.height} mammograms written in {make_s:.1f} s")

    decoded = [read_image(p) for p in pngs]
    rates = {
        "decode_png16": best_rate(read_image, pngs, args.reps),
        "decode_dicom16_monochrome1": best_rate(read_image, dcms, args.reps),
        "breast_crop_from_decoded": best_rate(
            lambda a: mammo.breast_crop(a, args.size), decoded, args.reps
        ),
        "stretch_from_decoded": best_rate(
            lambda a: resize_to_uint8(a, args.size), decoded, args.reps
        ),
        "preprocess_file_to_input": best_rate(
            lambda p: preprocess(read_image(p), args.size, "breast-crop"), pngs, args.reps
        ),
    }
    torch.manual_seed(0)
    model = create_model("basic_cnn", 2).eval()
    card = {
        "architecture": "basic_cnn",
        "num_classes": 2,
        "in_chans": 1,
        "input_size": args.size,
        "preprocessing": {**preprocessing_card("breast-crop"), "tta": "mirror"},
        "class_names": ["benign", "malignant"],
        "positive_class": "malignant",
        "temperature": 1.0,
    }
    ens = Ensemble(models=[model], cards=[card], threshold=0.5, source="bench")
    predict_images(ens, pngs[:1], rt)  # warm-up
    best = float("inf")
    for _ in range(args.reps):
        t0 = time.perf_counter()
        rows, bad = predict_images(ens, pngs, rt)
        best = min(best, time.perf_counter() - t0)
        assert len(rows) == len(pngs) and not bad
    rates["predict_file_to_probability"] = len(pngs) / best

    doc = {
        "benchmark": "bench_mammo",
        "command": "python benchmarks/bench_mammo.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": common.machine_info(),
        "torch_threads": torch.get_num_threads(),
        "n_images": args.n,
        "input": f"{args.width} x {args.height}, 12 bits in 16-bit PNG; DICOM 16-bit MONOCHROME1",
        "model_input_size": args.size,
        "model": "basic_cnn (random weights), TTA on, bf16 " + ("on" if rt.bf16 else "off"),
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
    }
    rows_out = [[k, f"{v:.2f}"] for k, v in rates.items()]
    print(common.fmt_table(["step (one process)", "images/s"], rows_out))
    if args.json:
        common.write_json(args.json, doc)
        print(f"written to {args.json}")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

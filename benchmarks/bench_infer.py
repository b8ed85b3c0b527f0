"""Inference throughput: from image files vs from breastcad's cache; fp32 vs bf16; layouts.

    .venv/bin/python benchmarks/bench_infer.py                      # basic_cnn, 128 px, batch 64
    .venv/bin/python benchmarks/bench_infer.py --n 128 --json /tmp/infer.json
    .venv/bin/python benchmarks/bench_infer.py --data ../shared/data/busi --tta

On ``--n`` benign + malignant images (a seeded sample of the bundled BUSI copy
by default), for every combination of precision (fp32, bf16 autocast) and
memory layout (channels-first, channels_last):

* files: per image, PIL open + grayscale + resize + ToImage/ToDtype/Normalize
  (torchvision.transforms.v2), stacked into batches, then the forward pass;
* cache: ``engine.predict_logits`` (inference_mode) on the uint8 stack that
  ``load_stack`` returns; the time of that (warm) load is reported apart and
  in an end-to-end figure.

Images/s is the best of ``--reps`` passes over all images, after one
untimed batch. Also reported: achieved GFLOP/s (forward FLOPs per image from
FlopCounterMode, 2 FLOPs per multiply-add, x images/s) and the largest
absolute difference of softmax probabilities between fp32 and bf16 on the
same cached inputs. The model has random weights (seeded) with batch-norm
statistics calibrated on the images, so its outputs are not degenerate.
``--json PATH`` writes every number with the date, CPU, torch version and threads.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from PIL import Image
from torch import nn

from breastcad.data.augment import standardize, to_float
from breastcad.data.cache import default_cache_dir, load_stack
from breastcad.data.imageio import file_sha256
from breastcad.engine import Runtime, autocast, cpu_has_bf16, predict_logits, prepare
from breastcad.models import create_model

CPU = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="basic_cnn")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="images to score (default 256)")
    ap.add_argument("--reps", type=int, default=2, help="timed passes; the best is reported")
    ap.add_argument("--tta", action="store_true", help="cache rows: mean over image + mirror")
    ap.add_argument("--data", help="dataset folder or CSV (default: the bundled BUSI copy)")
    ap.add_argument("--cache-dir", help="breastcad image cache (default: breastcad's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write all numbers as JSON")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.reps < 1 or args.size < 16:
        ap.error("need --n, --batch, --reps >= 1 and --size >= 16")
    return args


def calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Set batch-norm running statistics to those of ``x`` (random weights, real activations)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in x.split(32):
            model(chunk)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    model.eval()


def decode_naive(paths: list[str], size: int) -> torch.Tensor:
    """The usual per-image way: PIL decode, grayscale, resize, transforms to a float batch."""
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([common.NAIVE_MEAN], [common.NAIVE_STD]),
        ]
    )
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(tf(im.convert("L")))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine_info()
    torch.set_num_threads(common.cores())
    pairs = common.dataset_pairs(args.data)
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(pairs))
    pick = np.resize(pick, args.n)  # repeats images only when --n exceeds the dataset
    paths = [pairs[i][0] for i in pick]

    hashes = [file_sha256(p) for p in paths]
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    load_stack(paths, hashes, args.size, cache_dir, workers=common.cores())  # fill the cache
    t0 = time.perf_counter()
    stack = load_stack(paths, hashes, args.size, cache_dir, workers=common.cores())
    cache_load_s = time.perf_counter() - t0
    images = torch.from_numpy(stack)
    indices = np.arange(len(paths))

    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=2, in_chans=1)
    fwd_flops = common.forward_flops(base, args.size)
    calibrate_batch_norm(base, standardize(to_float(images[: min(len(images), 128)])))

    rows: list[dict[str, Any]] = []
    probs: dict[tuple[bool, bool], np.ndarray] = {}
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(base).to(memory_format=fmt).eval()
        for bf16 in (False, True):
            rt = Runtime(device=CPU, bf16=bf16, channels_last=channels_last)

            def from_files(limit: int | None = None, rt: Runtime = rt, model: nn.Module = model):
                todo = paths[:limit] if limit else paths
                with torch.inference_mode():
                    for b in range(0, len(todo), args.batch):
                        x = prepare(decode_naive(todo[b : b + args.batch], args.size), rt)
                        with autocast(rt):
                            model(x).float()

            def from_cache(rt: Runtime = rt, model: nn.Module = model) -> np.ndarray:
                return predict_logits(model, images, indices, rt, args.batch, tta=args.tta)

            from_files(limit=args.batch)  # untimed: first-call kernel selection
            predict_logits(model, images, indices[: args.batch], rt, args.batch, tta=args.tta)
            t_files = common.best_seconds(from_files, args.reps)
            t_cache = common.best_seconds(from_cache, args.reps)
            logits = torch.from_numpy(from_cache())
            probs[(channels_last, bf16)] = torch.softmax(logits, dim=1).numpy()
            for source, secs in (("files", t_files), ("cache", t_cache)):
                ips = len(paths) / secs
                rows.append(
                    {
                        "source": source,
                        "precision": "bf16" if bf16 else "fp32",
                        "layout": "channels_last" if channels_last else "channels-first",
                        "seconds": secs,
                        "images_per_s": ips,
                        "images_per_s_incl_cache_load": (
                            len(paths) / (secs + cache_load_s) if source == "cache" else None
                        ),
                        "achieved_flops": ips
                        * fwd_flops
                        * (2 if args.tta and source == "cache" else 1),
                    }
                )

    def max_diff(a: tuple[bool, bool], b: tuple[bool, bool]) -> float:
        return float(np.abs(probs[a] - probs[b]).max())

    diffs = {
        "fp32_vs_bf16_channels_first": max_diff((False, False), (False, True)),
        "fp32_vs_bf16_channels_last": max_diff((True, False), (True, True)),
        "fp32_channels_last_vs_channels_first": max_diff((False, False), (True, False)),
    }
    doc: dict[str, Any] = {
        "benchmark": "infer",
        "date": machine["date"],
        "settings": {
            k: getattr(args, k)
            for k in ("model", "size", "batch", "n", "reps", "tta", "data", "seed")
        },
        "machine": {
            **machine,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": common.load_average(),
        },
        "conventions": {
            "flops": "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add; "
            "convolutions and matrix products only; inference = 1x forward (2x with --tta)",
            "images_per_s": f"best of {args.reps} passes over {len(paths)} images",
            "prob_diff": "max abs difference of softmax probabilities, same cached inputs",
        },
        "forward_flops_per_image": fwd_flops,
        "cache_load_seconds_warm": cache_load_s,
        "rows": rows,
        "softmax_max_abs_diff": diffs,
    }
    print(report(args, doc, cpu_has_bf16()))
    if args.json:
        common.write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


def report(args: argparse.Namespace, doc: dict[str, Any], native_bf16: bool) -> str:
    m, d = doc["machine"], doc["softmax_max_abs_diff"]
    n = args.n
    out = [
        f"bench_infer: {args.model}, {args.size} px, batch {args.batch}, {n} images, "
        f"{m['torch_threads']} threads, tta {'on' if args.tta else 'off'}",
        f"CPU: {m['cpu']} ({m['cores']} cores, native bf16: {'yes' if native_bf16 else 'no'}), "
        f"torch {m['torch']}; load average at start {m['load1_at_start']:.2f}",
        f"forward {doc['forward_flops_per_image'] / 1e9:.3f} GFLOP/image (FlopCounterMode: "
        "2 FLOPs per multiply-add); random weights, batch-norm statistics calibrated",
        "",
    ]
    rows = sorted(
        doc["rows"],
        key=lambda r: (
            r["source"] != "files",
            r["precision"] != "fp32",
            r["layout"] != "channels-first",
        ),
    )

    def files_row(r: dict[str, Any]) -> dict[str, Any]:
        return next(
            f
            for f in rows
            if f["source"] == "files"
            and (f["precision"], f["layout"]) == (r["precision"], r["layout"])
        )

    table = [
        [
            r["source"],
            r["precision"],
            r["layout"],
            r["images_per_s"],
            r["achieved_flops"] / 1e9,
            r["images_per_s_incl_cache_load"],
            f"{r['images_per_s'] / files_row(r)['images_per_s']:.2f}x"
            if r["source"] == "cache"
            else None,
        ]
        for r in rows
    ]
    headers = [
        "source",
        "precision",
        "layout",
        "images/s",
        "GFLOP/s",
        "incl. cache load",
        "vs files",
    ]
    out.append(common.fmt_table(headers, table, left=3))
    naive = rows[0]  # files, fp32, channels-first
    ours = next(
        r
        for r in rows
        if r["source"] == "cache"
        and r["precision"] == ("bf16" if native_bf16 else "fp32")
        and r["layout"] == "channels_last"
    )
    out += [
        "",
        f"breastcad's default (cache, {ours['precision']}, channels_last) / naive (files, fp32, "
        f"channels-first): {ours['images_per_s'] / naive['images_per_s']:.2f}x images/s, "
        f"{ours['images_per_s_incl_cache_load'] / naive['images_per_s']:.2f}x counting the warm "
        f"load_stack of {n} images ({doc['cache_load_seconds_warm']:.3f} s)",
        f"max |softmax fp32 - softmax bf16| over {n} images: {d['fp32_vs_bf16_channels_first']:.4f}"
        f" (channels-first), {d['fp32_vs_bf16_channels_last']:.4f} (channels_last); fp32 "
        f"channels_last vs channels-first: {d['fp32_channels_last_vs_channels_first']:.1e}",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

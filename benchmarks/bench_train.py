"""Training throughput: a typical torchvision pipeline vs breastcad's, side by side.

    .venv/bin/python benchmarks/bench_train.py                       # basic_cnn, 128 px, batch 32
    .venv/bin/python benchmarks/bench_train.py --steps 10 --warmup 2 --json /tmp/train.json
    .venv/bin/python benchmarks/bench_train.py --data ../shared/data/busi --size 224

Same model class, optimizer (AdamW, lr 3e-3, weight decay 5e-4), loss
(cross-entropy, label smoothing 0.05), resolution, batch size and number of
timed steps on the benign + malignant images (bundled BUSI copy by default):

* naive: an ImageFolder-style Dataset that per sample opens the file with
  PIL, converts it to grayscale and applies torchvision.transforms.v2
  (RandomHorizontalFlip, RandomAffine(20 deg, shear 10, scale 0.85-1.15,
  translate 0.08), ColorJitter, Resize, ToImage + ToDtype, Normalize) in a
  DataLoader with num_workers=2 (and 0 as another row); fp32, channels-first.
* breastcad: the decode-once cache (``load_stack``) as one uint8 tensor,
  batches indexed from a seeded permutation and augmented as a whole
  (``augment_batch`` + ``standardize``), channels_last, bf16 autocast when the
  CPU has native bf16 -- i.e. ``engine.train_one_epoch`` itself.

Each pipeline runs in its own subprocess (so peak RSS is its own), after
``--warmup`` untimed steps, with torch.set_num_threads(cores). Reported per
pipeline: images/s; data wait (time to get the next batch ready / step time);
peak RSS (ru_maxrss); achieved FLOP/s = forward FLOPs per image
(FlopCounterMode, 2 FLOPs per multiply-add, convs and matmuls only) x 3
(training step = 3x forward) x images/s, and that as a percentage of the
peak FLOP/s of a large fp32 matmul timed in the same run (and, for a bf16
pipeline, of the bf16 matmul peak as well). ``--json PATH`` writes every
number with the date, CPU model, torch version and thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

RESULT_MARK = "BENCH_RESULT "
NAIVE_WORKERS = (2, 0)
SETTINGS = (
    "model",
    "size",
    "batch",
    "steps",
    "warmup",
    "data",
    "bf16",
    "matmul_n",
    "matmul_reps",
    "seed",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="basic_cnn")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    ap.add_argument("--data", help="dataset folder or CSV (default: the bundled BUSI copy)")
    ap.add_argument("--cache-dir", help="breastcad image cache (default: breastcad's own)")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="breastcad pipeline: auto = when the CPU has native bf16")  # fmt: skip
    ap.add_argument("--matmul-n", type=int, default=4096, help="side of the peak-FLOP/s matmul")
    ap.add_argument("--matmul-reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write all numbers as JSON")
    # Internal: run one measurement in this (sub)process and print its result.
    ap.add_argument("--worker", choices=("peak", "naive", "breastcad"), help=argparse.SUPPRESS)
    ap.add_argument("--loader-workers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0 or args.size < 16:
        ap.error("need --batch >= 2, --steps >= 1, --warmup >= 0, --size >= 16")
    return args


# ---------------------------------------------------------------- workers (subprocesses)


def worker_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Machine peak (fp32 and bf16 matmul) and the model's FLOPs per image."""
    import torch

    from breastcad.engine import cpu_has_bf16
    from breastcad.models import count_parameters, create_model

    torch.set_num_threads(common.cores())
    model = create_model(args.model, num_classes=2, in_chans=1)
    fwd = common.forward_flops(model, args.size)
    return {
        "threads": torch.get_num_threads(),
        "matmul_n": args.matmul_n,
        "peak_fp32_flops": common.peak_matmul_flops("fp32", args.matmul_n, args.matmul_reps),
        # Without native bf16 the matmul is emulated (about 1 GFLOP/s here: minutes for one
        # 4096 product) and no pipeline runs in bf16, so there is no bf16 peak to compare with.
        "peak_bf16_flops": (
            common.peak_matmul_flops("bf16", args.matmul_n, args.matmul_reps)
            if cpu_has_bf16()
            else None
        ),
        "forward_flops_per_image": fwd,
        "train_step_flops_per_image": 3 * fwd,
        "train_step_flops_per_image_counted": common.train_step_flops_counted(model, args.size),
        "parameters": count_parameters(model),
    }


def naive_transform(size: int) -> Any:
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=20, translate=(0.08, 0.08), scale=(0.85, 1.15), shear=10),
            v2.ColorJitter(brightness=0.15, contrast=0.2),
            v2.Resize((size, size), antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([common.NAIVE_MEAN], [common.NAIVE_STD]),
        ]
    )


def worker_naive(args: argparse.Namespace) -> dict[str, Any]:
    """The torchvision way: PIL decode + per-sample transforms in a DataLoader, fp32."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from breastcad.models import create_model

    rss_import = common.rss_mb()
    torch.set_num_threads(common.cores())
    torch.manual_seed(args.seed)

    class ImageFolderStyle(Dataset):
        """(path, target) pairs; every access decodes and transforms one image."""

        def __init__(self, pairs: list[tuple[str, int]], transform: Any) -> None:
            self.pairs, self.transform = pairs, transform

        def __len__(self) -> int:
            return len(self.pairs)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, target = self.pairs[i]
            with Image.open(path) as im:
                img = im.convert("L")
            return self.transform(img), target

    t0 = time.perf_counter()
    pairs = common.dataset_pairs(args.data)
    loader = DataLoader(
        ImageFolderStyle(pairs, naive_transform(args.size)),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.loader_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    setup_s = time.perf_counter() - t0

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:  # a new epoch (and new workers) whenever one ends, as a training loop does
            yield from loader

    model = create_model(args.model, num_classes=2, in_chans=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=common.LR, weight_decay=common.WEIGHT_DECAY)
    it = batches()
    t_data = t_total = 0.0
    seen = 0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=common.LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())
        int((logits.detach().argmax(1) == y).sum())
        if step >= args.warmup:
            t_data += t1 - t0
            t_total += time.perf_counter() - t0
            seen += len(y)
    it.close()  # shuts the DataLoader workers down, so their peak RSS is recorded
    del it
    gc.collect()
    return {
        "pipeline": f"naive, workers={args.loader_workers}",
        "images": seen,
        "seconds": t_total,
        "seconds_data": t_data,
        "setup_seconds": setup_s,
        "n_dataset": len(pairs),
        "bf16": False,
        "channels_last": False,
        "threads": torch.get_num_threads(),
        "rss_after_import_mb": rss_import,
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_rss_worker_mb": common.peak_rss_children_mb() if args.loader_workers else None,
    }


@dataclass
class BreastcadLoop:
    """breastcad's training loop over the cached uint8 stack, set up once (the model,
    optimizer, data and seeded generator); :meth:`run` trains whole batches with
    ``engine.train_one_epoch`` itself. profile_train.py profiles the same loop."""

    model: Any
    images: Any
    targets: Any
    optimizer: Any
    fixed: tuple[Any, ...]  # class weights, TrainConfig, AugmentConfig, generator, Runtime
    rt: Any
    batch: int
    warmup: int
    total_steps: int
    setup_seconds: float
    cache_hits_before: int
    step: int = 0

    def run(self, n_steps: int) -> Any:
        """``n_steps`` full batches (the engine shuffles them with the generator)."""
        import numpy as np

        from breastcad.engine import train_one_epoch

        idx = np.resize(np.arange(len(self.targets)), n_steps * self.batch)
        stats, self.step = train_one_epoch(
            self.model, self.images, self.targets, idx, self.optimizer, *self.fixed,
            self.step, self.total_steps, self.warmup,
        )  # fmt: skip
        return stats


def breastcad_loop(args: argparse.Namespace) -> BreastcadLoop:
    """Set up breastcad's pipeline for ``args`` (model, size, batch, data, bf16, seed)."""
    import torch

    from breastcad.config import AugmentConfig, TrainConfig
    from breastcad.data.cache import default_cache_dir, entry_key, load_stack
    from breastcad.data.imageio import file_sha256
    from breastcad.engine import runtime_settings
    from breastcad.models import create_model

    cfg = TrainConfig(
        batch_size=args.batch,
        lr=common.LR,
        weight_decay=common.WEIGHT_DECAY,
        label_smoothing=common.LABEL_SMOOTHING,
        device="cpu",
        bf16=args.bf16,
        channels_last=True,
        threads=common.cores(),
    )
    rt = runtime_settings(cfg)  # sets torch.set_num_threads(cores)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    pairs = common.dataset_pairs(args.data)
    paths = [p for p, _ in pairs]
    hashes = [file_sha256(p) for p in paths]
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    hits = sum((cache_dir / f"{entry_key(h, args.size)}.npy").is_file() for h in hashes)
    stack = load_stack(paths, hashes, args.size, cache_dir, workers=common.cores())
    setup_s = time.perf_counter() - t0

    model = create_model(args.model, num_classes=2, in_chans=1)
    model = model.to(memory_format=torch.channels_last) if rt.channels_last else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
    gen = torch.Generator().manual_seed(args.seed)
    return BreastcadLoop(
        model=model,
        images=torch.from_numpy(stack),
        targets=torch.tensor([t for _, t in pairs], dtype=torch.int64),
        optimizer=opt,
        fixed=(None, cfg, AugmentConfig(), gen, rt),
        rt=rt,
        batch=args.batch,
        warmup=args.warmup,
        total_steps=args.warmup + args.steps,
        setup_seconds=setup_s,
        cache_hits_before=hits,
    )


def worker_breastcad(args: argparse.Namespace) -> dict[str, Any]:
    """breastcad's own loop: ``engine.train_one_epoch`` over the cached uint8 stack."""
    import torch

    rss_import = common.rss_mb()
    loop = breastcad_loop(args)
    if args.warmup:
        loop.run(args.warmup)
    stats = loop.run(args.steps)
    return {
        "pipeline": "breastcad" + (", bf16" if loop.rt.bf16 else ", fp32"),
        "images": stats.images,
        "seconds": stats.seconds_total,
        "seconds_data": stats.seconds_data,
        "setup_seconds": loop.setup_seconds,
        "cache_hits_before": loop.cache_hits_before,
        "n_dataset": len(loop.targets),
        "bf16": loop.rt.bf16,
        "channels_last": loop.rt.channels_last,
        "threads": torch.get_num_threads(),
        "rss_after_import_mb": rss_import,
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_rss_worker_mb": None,
    }


# ---------------------------------------------------------------- orchestration


def run_worker(
    args: argparse.Namespace, worker: str, loader_workers: int = 0, bf16: str | None = None
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return the dict it printed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    cmd += ["--model", args.model, "--size", str(args.size), "--batch", str(args.batch)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    cmd += ["--bf16", bf16 or args.bf16, "--loader-workers", str(loader_workers)]
    cmd += ["--matmul-n", str(args.matmul_n), "--matmul-reps", str(args.matmul_reps)]
    if args.data:
        cmd += ["--data", args.data]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark worker {worker!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def derive(row: dict[str, Any], peak: dict[str, Any]) -> dict[str, Any]:
    ips = row["images"] / row["seconds"]
    flops = ips * peak["train_step_flops_per_image"]
    row.update(
        images_per_s=ips,
        data_wait_share=row["seconds_data"] / row["seconds"],
        achieved_flops=flops,
        pct_of_fp32_peak=100 * flops / peak["peak_fp32_flops"],
        pct_of_bf16_peak=100 * flops / peak["peak_bf16_flops"] if row["bf16"] else None,
    )
    return row


def progress(row: dict[str, Any]) -> dict[str, Any]:
    """Print one pipeline's figures as soon as they exist, so a cut-off run still leaves them."""
    print(
        f"{row['pipeline']}: {row['images_per_s']:.1f} images/s, data wait "
        f"{100 * row['data_wait_share']:.0f}%, {row['pct_of_fp32_peak']:.1f}% of fp32 peak, "
        f"peak RSS {row['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return row


def ratios(ours: dict[str, Any], naive: dict[str, Any]) -> dict[str, float]:
    def ratio(key: str) -> float:
        return ours[key] / naive[key] if naive[key] else float("nan")

    keys = ("images_per_s", "data_wait_share", "peak_rss_mb", "achieved_flops")
    return {k: ratio(k) for k in keys}


def report(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    m, pk, rows = doc["machine"], doc["peak"], doc["pipelines"]
    g = 1e9
    n_data = rows[0]["n_dataset"]
    out = [
        f"bench_train: {args.model}, {args.size} px, batch {args.batch}, {args.steps} timed steps "
        f"(+{args.warmup} warm-up), {n_data} images (benign+malignant), {pk['threads']} threads",
        f"CPU: {m['cpu']} ({m['cores']} cores, native bf16: {'yes' if m['cpu_bf16'] else 'no'}), "
        f"torch {m['torch']}; load average at start {m['load1_at_start']:.2f}",
        f"peak matmul {pk['matmul_n']}x{pk['matmul_n']}: fp32 {pk['peak_fp32_flops'] / g:.1f} "
        "GFLOP/s, bf16 "
        + (
            f"{pk['peak_bf16_flops'] / g:.1f} GFLOP/s"
            if pk["peak_bf16_flops"]
            else "not timed (no native bf16: emulated, and no pipeline uses it)"
        ),
        f"model: {pk['parameters']:,} parameters, forward {pk['forward_flops_per_image'] / g:.3f} "
        f"GFLOP/image (FlopCounterMode: 2 FLOPs per multiply-add, convs+matmuls only); "
        f"training step taken as 3x forward = {pk['train_step_flops_per_image'] / g:.3f} GFLOP "
        f"(fwd+bwd counted: {pk['train_step_flops_per_image_counted'] / g:.3f})",
        "",
    ]
    table = [
        [
            r["pipeline"] + (", channels_last" if r["channels_last"] else ""),
            r["images_per_s"],
            f"{100 * r['data_wait_share']:.0f}%",
            r["peak_rss_mb"],
            r["peak_rss_worker_mb"],
            r["achieved_flops"] / g,
            f"{r['pct_of_fp32_peak']:.1f}%",
            f"{r['pct_of_bf16_peak']:.1f}%" if r["pct_of_bf16_peak"] is not None else None,
            r["setup_seconds"],
        ]
        for r in rows
    ]
    headers = ["pipeline", "images/s", "data wait", "peak RSS MiB", "worker RSS MiB",
               "GFLOP/s", "% fp32 peak", "% bf16 peak", "setup s"]  # fmt: skip
    out.append(common.fmt_table(headers, table))
    out.append("")
    ours = next(r for r in rows if r["role"] == "breastcad")
    for name, rat in doc["ratios"].items():
        out.append(
            f"breastcad / {name}: {rat['images_per_s']:.2f}x images/s, "
            f"{rat['achieved_flops']:.2f}x FLOP/s, {rat['peak_rss_mb']:.2f}x peak RSS, "
            f"data wait {100 * ours['data_wait_share']:.0f}% vs "
            f"{100 * next(r for r in rows if r['pipeline'] == name)['data_wait_share']:.0f}%"
        )
    out.append(
        f"breastcad setup: {ours['cache_hits_before']}/{ours['n_dataset']} images already "
        "cached (setup = listing + sha256 of every file + load_stack); naive setup = listing."
    )
    baseline = ", ".join(f"{r['rss_after_import_mb']:.0f}" for r in rows)
    out.append(
        f"RSS after imports, before any data: {baseline} MiB (same row order). Worker RSS: "
        "largest DataLoader worker (forked: shares pages with its main process, so not additive)."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        fn = {"peak": worker_peak, "naive": worker_naive, "breastcad": worker_breastcad}
        result = fn[args.worker](args)
        print(RESULT_MARK + common.dumps_line(result), flush=True)
        return 0
    machine = common.machine_info()
    peak = run_worker(args, "peak")
    print(
        f"peak fp32 matmul {peak['peak_fp32_flops'] / 1e9:.1f} GFLOP/s; "
        f"{peak['forward_flops_per_image'] / 1e9:.3f} GFLOP forward per image",
        flush=True,
    )
    naive = [
        progress(derive(run_worker(args, "naive", w), peak) | {"role": "naive"})
        for w in NAIVE_WORKERS
    ]
    ours = progress(derive(run_worker(args, "breastcad"), peak) | {"role": "breastcad"})
    rows = [*naive, ours]
    if ours["bf16"]:  # the same pipeline in fp32: how much of the gain is bf16 alone
        extra = derive(run_worker(args, "breastcad", bf16="off"), peak)
        rows.append(progress(extra | {"role": "breastcad-fp32 (for comparison)"}))
    doc: dict[str, Any] = {
        "benchmark": "train",
        "date": machine["date"],
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "machine": {**machine, "load_average_at_end": common.load_average()},
        "conventions": {
            "flops": "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add; "
            "convolutions and matrix products only",
            "train_step": "3x forward FLOPs per image",
            "peak": f"best of {args.matmul_reps} {args.matmul_n}x{args.matmul_n} matmuls",
            "data_wait_share": "time to get the next batch ready / total step time",
            "peak_rss": "ru_maxrss of the pipeline's own subprocess (MiB)",
        },
        "peak": peak,
        "pipelines": rows,
        "ratios": {r["pipeline"]: ratios(ours, r) for r in naive},
    }
    print(report(args, doc))
    if args.json:
        common.write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

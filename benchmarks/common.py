"""Helpers shared by the micro-benchmarks (bench_train.py, bench_infer.py).

Not a script. Importing this module does not import torch (the functions that
need it import it themselves), so an orchestrating process can stay small and
the peak-memory figures of the subprocesses it starts are their own: on Linux
``ru_maxrss`` survives ``execve``, so a child started from a process that had
already grown to gigabytes would report the parent's size.

Conventions used by every figure derived here:

* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts
  2 FLOPs per multiply-add and counts only matrix products and convolutions
  (batch norm, ReLU, pooling and the optimizer are not counted).
* A training step is taken as 3x the forward FLOPs (the backward pass costs
  about twice the forward: gradients for the inputs and for the weights).
* The machine's peak is a large square matmul timed in the same run (best of
  a few repetitions): a practical ceiling for this CPU, torch build and thread
  count, not the vendor's theoretical number.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# The study's task: the benchmarks train and score benign vs malignant only.
CLASSES = ("benign", "malignant")

# Settings both training pipelines share (the defaults of breastcad's TrainConfig).
LR = 3e-3
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.05

# Intensity normalisation for the torchvision pipelines (roughly BUSI's mean and std).
NAIVE_MEAN = 0.33
NAIVE_STD = 0.22


def cores() -> int:
    """CPU cores this process may run on (what breastcad uses for its thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    # Same as breastcad.envinfo.cpu_model, which cannot be imported here: it imports torch,
    # and the parent process must stay torch-free so children's peak RSS is their own.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Date, CPU, versions and threads; importing torch is not needed for any of it."""

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    flags = cpu_flags()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_model(),
        "cores": cores(),
        "threads": cores(),  # both pipelines call torch.set_num_threads(cores())
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "avx512": "avx512f" in flags,
        "load_average_at_start": load_average(),  # other work on the machine lowers results
        "load1_at_start": (load_average() or (float("nan"),))[0],
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "numpy": version("numpy"),
        "pillow": version("pillow"),
        "breastcad": version("breastcad"),
    }


def rss_mb() -> float:
    """Current resident memory of this process (VmRSS), MiB."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_rss_children_mb() -> float:
    """ru_maxrss of the largest terminated child (e.g. DataLoader workers), MiB; not a sum."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def dataset_pairs(data: str | None) -> list[tuple[str, int]]:
    """(path, target) for every benign (0) and malignant (1) image; ``None``: bundled BUSI."""
    from breastcad.data.sources import load_source

    source = load_source(data)
    pairs = [(s.path, CLASSES.index(s.label)) for s in source.samples if s.label in CLASSES]
    if not pairs:
        raise SystemExit(f"no benign or malignant images found in {source.root}")
    return pairs


def peak_matmul_flops(dtype_name: str, n: int = 4096, reps: int = 3) -> float:
    """FLOP/s of the best of ``reps`` (n x n) @ (n x n) products (2 n^3 FLOPs each), one warm-up."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: lets oneDNN/BLAS pick and cache its kernel
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def forward_flops(model: Any, size: int, in_chans: int = 1) -> int:
    """FLOPs of one forward pass on one ``size`` x ``size`` image (eval mode, fp32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, size, size))
    model.train(was_training)
    return int(counter.get_total_flops())


def train_step_flops_counted(model: Any, size: int, in_chans: int = 1) -> int:
    """FLOPs of a forward + backward pass on one image as FlopCounterMode counts them.

    Reported next to the 3x-forward convention as a check on it (the first
    layer needs no input gradient, so the count is a little under 3x).
    """
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train()
    x = torch.zeros(2, in_chans, size, size)  # batch norm cannot train on one image
    counter = FlopCounterMode(display=False)
    with counter:
        m(x).float().sum().backward()
    return int(counter.get_total_flops()) // 2


def best_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Shortest wall time of ``reps`` calls: the run least disturbed by other processes."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_json(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write ``doc`` atomically as indented JSON (NaN written as null)."""
    from breastcad.io import atomic_write_json

    return atomic_write_json(path, doc)


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain aligned text table: the first ``left`` columns left-aligned, the rest right."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def dumps_line(doc: dict[str, Any]) -> str:
    """One JSON line (used by the subprocess workers to hand results back)."""
    return json.dumps(doc, allow_nan=True)

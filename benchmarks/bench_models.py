"""Training and inference throughput of every registered model, one table, one machine.

    .venv/bin/python benchmarks/bench_models.py                       # the study's five models
    .venv/bin/python benchmarks/bench_models.py --models resnet50 --sizes 224,112 --steps 4

Per model and input size: breastcad's own training step (engine.train_one_epoch:
uint8 batches from memory, batched augmentation, per-image standardisation, bf16
autocast where the CPU has it, channels_last, AdamW, class-weighted loss) at the
model's registered batch size, and inference (engine.predict_logits, inference
mode, no test-time mirror) at batch 64. Images are random uint8 (throughput does not
depend on content). Images/s over ``--steps`` timed batches after ``--warmup``
untimed ones; forward GFLOPs per image from FlopCounterMode (2 per multiply-add).
Writes ``benchmarks/results/bench_models.json`` with the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

STUDY = ("basic_cnn", "alexnet", "vgg16", "resnet50", "densenet201")


def measure(name: str, size: int, steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    from breastcad.config import AugmentConfig, TrainConfig
    from breastcad.engine import predict_logits, runtime_settings, train_one_epoch
    from breastcad.models import count_parameters, create_model, get_spec

    torch.manual_seed(seed)
    spec = get_spec(name)
    bs = spec.batch_size
    cfg = TrainConfig(batch_size=bs)
    rt = runtime_settings(cfg)
    model = create_model(name, 2, 1).to(memory_format=torch.channels_last)
    flops = common.forward_flops(model, size)
    n = bs * (steps + warmup)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (max(n, 64 * 3), size, size), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 2, (len(images),), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    aug = AugmentConfig()
    train_one_epoch(model, images, targets, np.arange(bs * warmup), opt, None, cfg, aug, gen, rt,
                    0, 10**6, 0)  # fmt: skip
    stats, _ = train_one_epoch(
        model, images, targets, np.arange(bs * warmup, n), opt, None, cfg, aug, gen, rt, 0, 10**6, 0
    )
    predict_logits(model, images, np.arange(64), rt)  # warm-up
    t0 = time.perf_counter()
    predict_logits(model, images, np.arange(64, 64 * 3), rt, batch_size=64)
    infer = 128 / (time.perf_counter() - t0)
    train = stats.images / stats.seconds_total
    return {
        "model": name,
        "input_size": size,
        "batch_size": bs,
        "parameters": count_parameters(model),
        "forward_gflops_per_image": round(flops / 1e9, 3),
        "train_images_per_second": round(train, 1),
        "data_wait_share": round(stats.seconds_data / stats.seconds_total, 3),
        "infer_images_per_second": round(infer, 1),
        "bf16": rt.bf16,
        "timed_train_images": stats.images,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(STUDY))
    ap.add_argument("--sizes", help="comma-separated input sizes (default: each model's own)")
    ap.add_argument("--steps", type=int, default=6, help="timed training batches")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training batches")
    ap.add_argument("--json", default=str(HERE / "results" / "bench_models.json"))
    args = ap.parse_args()
    from breastcad.models import get_spec

    rows = []
    for name in args.models.split(","):
        own = [get_spec(name).input_size]
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else own
        for size in sizes:
            row = measure(name, size, args.steps, args.warmup)
            rows.append(row)
            print(common.dumps_line(row), flush=True)
    doc = {
        "benchmark": "bench_models",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/bench_models.py", *sys.argv[1:]]),
        "machine": common.machine_info(),
        "rows": rows,
    }
    common.write_json(args.json, doc)
    headers = ["model", "px", "batch", "params (M)", "GFLOP/img", "train img/s", "infer img/s"]
    table = [[r["model"], r["input_size"], r["batch_size"], f"{r['parameters'] / 1e6:.1f}",
              r["forward_gflops_per_image"], r["train_images_per_second"],
              r["infer_images_per_second"]] for r in rows]  # fmt: skip
    print(common.fmt_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

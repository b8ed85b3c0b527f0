"""Where a breastcad training step spends its time: torch.profiler over ``train_one_epoch``.

    .venv/bin/python benchmarks/profile_train.py                      # basic_cnn, 128 px, batch 32
    .venv/bin/python benchmarks/profile_train.py --model resnet50 --size 224 --batch 16 --steps 4

The same loop as bench_train.py's breastcad pipeline (``bench_train.breastcad_loop``:
the decoded-once uint8 stack of the bundled benign + malignant images, batched
augmentation, channels_last, bf16 when the CPU has it), ``--warmup`` untimed steps, then
``--steps`` steps under the profiler.
Operators are summed by self CPU time and put in groups (convolution forward and
backward, dense layers, batch norm, pooling, optimizer, augmentation, pointwise and
activation, copies and layout, other); the top operators are listed too. ``--json PATH``
records it all with the machine. The profiler adds a little overhead per operator, so
shares, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# First match wins: (group, pattern on the aten operator name).
GROUPS: tuple[tuple[str, str], ...] = (
    ("convolution backward", r"convolution_backward|conv.*backward"),
    ("convolution forward", r"convolution|conv2d|mkldnn_conv"),
    ("matmul (dense layers)", r"addmm|^aten::mm$|^aten::bmm$|linear"),
    ("batch norm", r"batch_norm"),
    ("pooling", r"pool"),
    ("optimizer (AdamW)", r"_foreach|addcdiv|lerp|adam"),
    ("augmentation (warp, noise)", r"grid_sampler|affine_grid|randn|normal_|uniform_|pow|flip"),
    ("pointwise and activation", r"relu|threshold|mul|add|div|sub|clamp|exp|log|sqrt|where"),
    ("copies and layout", r"copy_|contiguous|to_copy|clone|empty_strided|cat|index"),
)


def group_of(name: str) -> str:
    return next((g for g, pat in GROUPS if re.search(pat, name)), "other")


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from bench_train import breastcad_loop
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    loop = breastcad_loop(args)
    if args.warmup:
        loop.run(args.warmup)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        stats = loop.run(args.steps)
    ops = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    self_total = sum(t for _, t, _ in ops) or 1.0
    groups: dict[str, float] = {}
    for name, t, _ in ops:
        g = group_of(name)
        groups[g] = groups.get(g, 0.0) + t
    top = sorted(ops, key=lambda o: -o[1])[: args.top]
    return {
        "settings": {k: getattr(args, k) for k in ("model", "size", "batch", "steps", "warmup")},
        "bf16": loop.rt.bf16,
        "threads": torch.get_num_threads(),
        "images_per_s_under_profiler": stats.images / stats.seconds_total,
        "data_wait_share": stats.seconds_data / stats.seconds_total,
        "groups_share": {g: t / self_total for g, t in sorted(groups.items(), key=lambda x: -x[1])},
        "top_ops": [{"op": n, "share": t / self_total, "calls": c} for n, t, c in top],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="basic_cnn")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="profiled training steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data", help="dataset folder or CSV (default: the bundled BUSI copy)")
    ap.add_argument("--cache-dir", help="breastcad image cache (default: breastcad's own)")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--top", type=int, default=12, help="operators listed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = ap.parse_args(argv)
    doc = {"benchmark": "profile_train", "machine": common.machine_info(), **profile(args)}
    print(f"profile of {args.steps} training steps: {args.model}, {args.size} px, batch "
          f"{args.batch}, bf16 {'on' if doc['bf16'] else 'off'}, {doc['threads']} threads; "
          f"{doc['images_per_s_under_profiler']:.1f} images/s under the profiler, data wait "
          f"{100 * doc['data_wait_share']:.0f}%")  # fmt: skip
    shares = [[g, f"{100 * v:.1f}%"] for g, v in doc["groups_share"].items()]
    print(common.fmt_table(["group", "share of operator self time"], shares))
    print()
    print(common.fmt_table(["operator", "share", "calls"],
                           [[o["op"], f"{100 * o['share']:.1f}%", o["calls"]]
                            for o in doc["top_ops"]]))  # fmt: skip
    if args.json:
        print(f"wrote {common.write_json(args.json, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
